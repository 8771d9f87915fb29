"""Stage 4, reporting: result tables (``tables``), paired statistics of a change (``paired``),
``dpo-align compare`` (``compare``) and the HTML/Markdown report (``html``).

Reads what the other stages wrote; imports only ``dpo_align.core`` and ``dpo_align.data``."""
