"""``dpo-lm-eval``: lm-eval's own command line, with ``--model dpo-hf`` registered first.

lm-eval looks its ``--model`` up before it imports any task code and has no plug-in entry
point for models, so ``lm_eval --model dpo-hf`` cannot find ours. This is the same CLI
(every option, same output) after one import. ``python -m dpo_align.score.lm_eval_cli`` works too.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import dpo_align.score.lm_eval_model  # noqa: F401  (registers dpo-hf)

    cli_evaluate()


if __name__ == "__main__":
    main()
