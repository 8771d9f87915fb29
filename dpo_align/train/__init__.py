"""Stage 2, training: ``dpo-align train`` top to bottom (``run``), its settings (``config``), the run
folder and resuming (``run_folder``), trainer callbacks, the shared-prompt DPO trainer (``fast_dpo``),
the reference log-prob cache (``ref_logps``), the model card, and ``dpo-align merge``.

Imports ``dpo_align.core`` and ``dpo_align.data``, never ``score`` or ``report``."""
