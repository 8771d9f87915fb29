"""Stage 3, scoring: ``dpo-align eval`` through lm-eval (``evaluate``), the ``--model dpo-hf`` lm-eval
model (``lm_eval_model``) and ``dpo-lm-eval`` (``lm_eval_cli``), the token-weighted metrics the
tasks aggregate with (``metrics``), held-out preference accuracy (``preference``), ``dpo-align
generate`` (``generate``) and the learning curve over checkpoints (``learning_curve``).

Imports ``dpo_align.core`` and ``dpo_align.data``, never ``train`` or ``report``."""
