"""``dpo-lm-eval``: lm-eval's own command line, with ``--model dpo-hf`` registered first.

lm-eval looks its ``--model`` up before it imports any task code and has no plug-in entry
point for models, so ``lm_eval --model dpo-hf`` cannot find ours. This is the same CLI
(every option, same output) after one import. ``python -m dpo_align.score.lm_eval_cli`` works too.
"""

from __future__ import annotations


def _check_metadata_argument(argv: list[str]) -> None:
    """lm-eval merges --metadata into a dict before any task code runs: JSON that is not an object fails there."""
    import json

    from dpo_align.core.errors import UserError

    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--metadata" and i + 1 < len(argv) else arg.partition("=")[2] if arg.startswith("--metadata=") else None
        if value is None:
            continue
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise UserError(f"--metadata {value!r}: not valid JSON ({err}).") from None
        if not isinstance(parsed, dict):
            raise UserError(f"--metadata {value!r}: a JSON object is needed, such as '{{\"data_dir\": \"../shared/data\"}}'.")


def main() -> None:
    """lm-eval's CLI inside dpo-align's error boundary: a UserError (bad --metadata, broken data) is one line, exit 2."""
    import sys

    from dpo_align.core.errors import install_error_boundary

    install_error_boundary()
    _check_metadata_argument(sys.argv[1:])
    from lm_eval.__main__ import cli_evaluate

    import dpo_align.score.lm_eval_model  # noqa: F401  (registers dpo-hf)

    cli_evaluate()


if __name__ == "__main__":
    main()
