"""The ``dpo-align`` command line: one Typer app, one sub-app or command per job."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
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


# --------------------------------------------------------------------------- eval


@app.command("eval")
@user_errors
def eval_command(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to score, in table order: hub ids, local checkpoints, adapter directories, "
                       f"or the built-in {DEFAULT_MODEL!r}. The first is the baseline of the Δ columns."),
    ] = None,
    peft: Annotated[
        list[str] | None,
        typer.Option("--peft", help="A LoRA adapter directory, scored on its base model (repeatable)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N documents of each dataset.")] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Offline data folder laid out like ../shared/data (default: env DPO_ALIGN_DATA_DIR, else the hub)."),
    ] = None,
    pku_path: Annotated[
        str | None,
        typer.Option(help="PKU processed-hh-rlhf file(s), or hh-rlhf transcripts, e.g. ../shared/data/splits/heldout.jsonl.gz."),
    ] = None,
    template: TemplateOption = DEFAULT_TEMPLATE,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="Score only these: truthfulqa, winogrande, pku (repeatable).")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.json, table.md/csv/png and per-document samples.")]
    = Path("runs/eval"),
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights dtype for scoring: float32, bfloat16, float16 or auto.")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow code shipped with a checkpoint to run.")]
    = False,
) -> None:
    """Score models with the dpo_ppl suite (lm-eval) and write a reference-style table.

    Each model gets the templated response-only cross-entropy (nats per response token),
    perplexity and bits per byte on TruthfulQA, WinoGrande and PKU/hh-rlhf, with standard
    errors. Example, offline:

        dpo-align eval smollm2-135m-instruct --peft runs/dpo --data-dir ../shared/data
        --pku-path ../shared/data/splits/heldout.jsonl.gz
    """
    from dpo_align.eval_data import DATASETS
    from dpo_align.evaluate import markdown_table, run_eval

    for name in dataset or []:
        if name not in DATASETS:
            raise UserError(f"--dataset {name!r} is not one of: {', '.join(DATASETS)}.")
    runs = run_eval(
        models or [], adapters=peft or [], output=output, limit=limit, data_dir=data_dir, pku_path=pku_path,
        template=template, batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        datasets=dataset, progress=lambda m: typer.echo(m, err=True),
    )
    typer.echo(markdown_table(runs))
    typer.echo(f"Wrote {output}/results.json, table.md, table.csv, table.png and samples/.")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
