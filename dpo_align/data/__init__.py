"""Stage 1, the data: preference pairs read from files or the hub (``pairs``), hh-rlhf transcripts
(``transcripts``), the prompt templates shared by training and scoring (``templates``), pinned hub
reads (``hub``), the ``--max-pairs`` sample and length fitting (``fitting``), ``dpo-align data
inspect`` (``inspect``), the scoring suite's registry (``suite``) and its documents (``suite_docs``),
and decontamination of training data against the suite (``decontaminate``).

Imports only ``dpo_align.core``."""
