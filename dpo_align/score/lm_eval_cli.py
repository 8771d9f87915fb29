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


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _check_batch_size_argument(argv: list[str]) -> None:
    """``--batch_size auto`` probes batch sizes at the model's full context (8,192 for SmolLM2): on a CPU that alone took
    10 minutes for 9 documents, with the bar at 0. Refused there, with the reason; a GPU probes in seconds."""
    from dpo_align.core.errors import UserError

    batch = _option(argv, "--batch_size") or ""
    device = (_option(argv, "--device") or "").lower()
    if batch.startswith("auto") and not device.startswith("cuda"):
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            raise UserError(f"--batch_size {batch}: on a CPU lm-eval's probe runs forward passes at the model's whole context "
                            "length before the first document (measured: 631 s for 9 documents, 36 s at batch 16). Give a number, "
                            "such as --batch_size 16.")


def main() -> None:
    """lm-eval's CLI inside dpo-align's error boundary: a UserError (bad --metadata, broken data) is one line, exit 2."""
    import sys

    from dpo_align.core.errors import install_error_boundary

    install_error_boundary()
    _check_metadata_argument(sys.argv[1:])
    _check_batch_size_argument(sys.argv[1:])
    from lm_eval.__main__ import cli_evaluate

    import dpo_align.score.lm_eval_model  # noqa: F401  (registers dpo-hf)

    cli_evaluate()


if __name__ == "__main__":
    main()
