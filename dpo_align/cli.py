"""The ``dpo-align`` command line: one Typer app, one sub-app or command per job."""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer

from dpo_align.errors import UserError
from dpo_align.models import DEFAULT_MODEL
from dpo_align.templates import DEFAULT_TEMPLATE, TEMPLATES

app = typer.Typer(
    help=(
        "Align small causal language models with DPO + LoRA, and measure whether it worked "
        "with a templated response-only cross-entropy on TruthfulQA, WinoGrande and hh-rlhf."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Prepare and locate models (the built-in offline default included).", no_args_is_help=True)
data_app = typer.Typer(help="Read and check preference data before training on it.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def user_errors(fn):
    """Print a UserError as one paragraph and exit 2; keep tracebacks for --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if _state["debug"]:
                raise
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


def check_template_option(value: str) -> str:
    if value not in TEMPLATES:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(TEMPLATES)}.")
    return value


TemplateOption = Annotated[
    str,
    typer.Option(
        "--template",
        help=f"Prompt template: {', '.join(TEMPLATES)}. alpaca is what the reference SFT model was trained with.",
        callback=check_template_option,
    ),
]
ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help=f"Hub id, local checkpoint directory, or the built-in {DEFAULT_MODEL!r}."),
]


# --------------------------------------------------------------------------- models


@models_app.command("prepare")
@user_errors
def models_prepare(
    name: Annotated[str, typer.Argument(help="Model name; the built-in offline default is converted once and cached.")] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cached checkpoint even if it is intact.")] = False,
) -> None:
    """Make a model loadable offline and print the path to pass to other tools (e.g. lm_eval)."""
    from dpo_align.models import BUILTIN_MODELS, prepare_builtin, resolve_model

    def progress(message: str) -> None:
        typer.echo(message, err=True)

    if name in BUILTIN_MODELS:
        path = prepare_builtin(name, force=force, progress=progress)
    else:
        path = resolve_model(name, progress=progress)
    typer.echo(str(path))


# --------------------------------------------------------------------------- data


@data_app.command("inspect")
@user_errors
def data_inspect(
    paths: Annotated[list[str], typer.Argument(help="Files (.jsonl, .jsonl.gz, .json, .parquet), directories or hub ids (owner/name[:data_dir]).")],
    model: ModelOption = DEFAULT_MODEL,
    template: TemplateOption = DEFAULT_TEMPLATE,
    split: Annotated[str, typer.Option(help="Split to read for hub datasets.")] = "train",
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Count and skip broken rows instead of stopping at the first.")] = False,
    example: Annotated[int, typer.Option(help="Index of the kept pair to print rendered.")] = 0,
) -> None:
    """Count rows, skips and token lengths, and print one pair exactly as the model sees it."""
    from dpo_align.data_inspect import inspect_data

    inspect_data(paths, model=model, template=template, split=split, skip_bad_rows=skip_bad_rows, example=example)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
