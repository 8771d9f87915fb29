"""The ``dpo-align`` command line: one Typer app, one sub-app or command per job."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from dpo_align.core.errors import UserError
from dpo_align.core.files import WRITE_ERRNOS
from dpo_align.core.models import DEFAULT_MODEL
from dpo_align.options import given_settings, settings_of, with_settings
from dpo_align.score.evaluate import ScoreOptions

app = typer.Typer(
    help=(
        "Align small causal language models with DPO + LoRA, and measure whether it worked "
        "with a templated response-only cross-entropy on TruthfulQA, WinoGrande and hh-rlhf."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
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
    from dpo_align.core.provenance import at_start

    at_start()  # the commit and start time results files record: the code this process loads now, not what is there hours later
    if debug:  # the error boundary inside the lm-eval tasks (core.errors.install_error_boundary) reads it
        os.environ["DPO_ALIGN_DEBUG"] = "1"


def _refuse_non_finite(kwargs: dict) -> None:
    """No command has a use for nan or inf in a float option (--temperature inf samples noise, nan fails deep inside
    transformers): refused at the option, before any work, for every command."""
    import math

    # the command's context, where it takes one (Typer passes its vendored click's Context, so it is recognised by shape)
    ctx = next((v for v in kwargs.values() if hasattr(v, "command") and hasattr(v, "get_parameter_source")), None)
    params = {p.name: p for p in ctx.command.params} if ctx else {}
    for name, value in kwargs.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                opts = getattr(params.get(name), "opts", None) or ["--" + name.replace("_", "-")]
                flag = next((o for o in opts if o.startswith("--")), opts[0])  # as declared first: --lr, not --learning-rate
                raise UserError(f"{flag} must be a finite number (got {item}).")


def user_errors(fn):
    """Print a UserError as one paragraph and exit 2; keep tracebacks for --debug. Float options are checked first."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _refuse_non_finite(kwargs)
            return fn(*args, **kwargs)
        except UserError as err:
            if _state["debug"]:
                raise
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            # a full or read-only disk: every command writes into staging and moves its outputs
            # into place only once all are written, so what exists is either finished or absent
            if err.errno not in WRITE_ERRNOS or _state["debug"]:
                raise
            typer.secho(f"error: cannot write {err.filename or 'the output'}: {err.strerror}. Nothing that looks finished "
                        "was left behind; free some space (or choose a writable folder) and run the command again.",
                        fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


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
    from dpo_align.core.models import BUILTIN_MODELS, check_model_source, prepare_builtin

    def progress(message: str) -> None:
        typer.echo(message, err=True)

    if name in BUILTIN_MODELS:
        path = prepare_builtin(name, force=force, progress=progress)
    else:
        path = check_model_source(name)
    typer.echo(str(path))


# --------------------------------------------------------------------------- data


@data_app.command("inspect")
@user_errors
@with_settings(ScoreOptions, include=("template",))
def data_inspect(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Files (.jsonl, .jsonl.gz, .json, .parquet), directories or hub ids (owner/name[:data_dir]).")],
    model: ModelOption = DEFAULT_MODEL,
    split: Annotated[str, typer.Option(help="Split to read for hub datasets.")] = "train",
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="Count and skip broken rows instead of stopping at the first.")] = False,
    example: Annotated[int, typer.Option(help="Index of the kept pair to print rendered.")] = 0,
) -> None:
    """Count rows, skips and token lengths, and print one pair exactly as the model sees it."""
    from dpo_align.data.inspect import inspect_data

    template = ScoreOptions(**settings_of(ctx, ScoreOptions)).validate().template
    inspect_data(paths, model=model, template=template, split=split, skip_bad_rows=skip_bad_rows, example=example)


# --------------------------------------------------------------------------- eval


SCORING = ("limit", "data_dir", "pku_path", "template", "controls", "batch_size", "device", "dtype", "lm_eval_model", "trust_remote_code",
           "allow_pickle")


@app.command("eval")
@user_errors
@with_settings(ScoreOptions, include=SCORING)
def eval_command(
    ctx: typer.Context,
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to score, in table order: hub ids, local checkpoints, adapter directories, "
                       f"or the built-in {DEFAULT_MODEL!r}. The first is the baseline of the Δ columns."),
    ] = None,
    peft: Annotated[
        list[str] | None,
        typer.Option("--peft", help="A LoRA adapter directory, scored on its base model (repeatable)."),
    ] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", help="Score only these: truthfulqa, winogrande, pku (repeatable).")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.json, table.md/csv/png and per-document samples.")]
    = Path("runs/eval"),
    dataset_revision: Annotated[list[str] | None, typer.Option("--dataset-revision", help=(
        "Pin a scoring set read from the hub: NAME=REVISION (truthfulqa, winogrande or pku; a branch, tag or commit; "
        "repeatable). The commit read is recorded in results.json either way."))] = None,
) -> None:
    """Score models with the dpo_ppl suite and its controls (lm-eval) and write a reference-style table.

    Each model gets the templated response-only cross-entropy (nats per response token),
    perplexity and bits per byte on TruthfulQA, WinoGrande and PKU/hh-rlhf, with standard
    errors; and, unless --no-controls, the same for each document's foils (wrong answers
    scored the same way) and how often the reference beats them (acc), so that `dpo-align
    compare` can tell a better model from a change of format. Example, offline:

        dpo-align eval smollm2-135m-instruct --peft runs/dpo --data-dir ../shared/data --pku-path ../shared/data/splits/heldout.jsonl.gz
    """
    from dpo_align.data.suite import DATASETS
    from dpo_align.eval_run import run_eval
    from dpo_align.report.tables import controls_tables, markdown_table, truncation_section

    options = ScoreOptions(**settings_of(ctx, ScoreOptions)).validate()
    for name in dataset or []:
        if name not in DATASETS:
            raise UserError(f"--dataset {name!r} is not one of: {', '.join(DATASETS)}.")
    revisions = {}
    for item in dataset_revision or []:
        name, _, revision = item.partition("=")
        if name not in DATASETS or not revision:
            raise UserError(f"--dataset-revision {item!r}: write NAME=REVISION with NAME one of {', '.join(DATASETS)}.")
        revisions[name] = revision
    from dpo_align.core.folder_lock import locked

    first = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch` the first process holds the folder and writes it
    with locked(output, "dpo-align eval") if first else contextlib.nullcontext():
        runs = run_eval(
            models or [], adapters=peft or [], output=output, datasets=dataset, progress=lambda m: typer.echo(m, err=True),
            **{k: getattr(options, k) for k in SCORING}, dataset_revisions=revisions or None,
        )
    if not runs:
        return
    typer.echo("\n".join([markdown_table(runs), *controls_tables(runs), *truncation_section(runs)]))
    typer.echo(f"Wrote {output}/results.json, table.md, table.csv, table.png and samples/.")


# --------------------------------------------------------------------------- tasks-path


@app.command("tasks-path")
def tasks_path_command() -> None:
    """Print the folder of the installed lm-eval tasks, for `lm_eval --include_path`.

    Works without a clone of the repository:

        lm_eval --model hf --model_args pretrained=MODEL --include_path "$(dpo-align tasks-path)" --tasks dpo_ppl_suite
    """
    from dpo_align.score.evaluate import include_path

    typer.echo(include_path())


# --------------------------------------------------------------------------- compare


@app.command("compare")
@user_errors
def compare_command(
    results: Annotated[list[str], typer.Argument(help=(
        "Scored results: folders written by `dpo-align eval` or `sweep`, or `lm_eval --log_samples --output_path` folders "
        "of the suite. The first model found is the baseline, unless --baseline names another."))],
    baseline: Annotated[str | None, typer.Option(help=(
        "The model to compare the others against, by its label (as compare prints it), a word of it (split at spaces "
        "and '-') or a part of it that names one model: e.g. --baseline sigmoid (the label 'DPO loss_type-sigmoid', not "
        "'loss_type-sigmoid+sft') to read a sweep's arms against plain DPO instead of the base model."))] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help=(
        "Also write compare.md, compare.json and compare.png there (and scorecard.png with a preference table)."))] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap replicates (resampling documents).")] = 10_000,
    permutations: Annotated[int, typer.Option(help="Paired permutations for the p-values.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the permutations.")] = 0,
) -> None:
    """Is the difference real, and is it better or only cheaper? Compare models scored on the same documents, paired per document.

    For each dataset and the mean, in ce and bpb: the change against the baseline, a paired
    bootstrap 95% interval (each document's NLL and token count resampled together), a paired
    permutation p-value (Holm-adjusted across the datasets). Where both were scored with their
    controls (the default of `eval` and `sweep`), ce is read beside its foils: the specific
    change Δlog ce − Δlog ce_foil decides between better (the reference got cheaper than its
    foils), format shift (the foils got as cheap), worse, and no detectable change; Δacc has an
    exact McNemar test of its own. Without controls the verdict reads ce alone, and says so.
    On a sweep folder with held-out preference data the output opens with the scorecard: per
    adapter, does ce fall specifically, does held-out preference accuracy rise, does the chosen
    likelihood hold, and the pick of the rule in dpo_align/report/scorecard.py (made only when
    the baseline is the base model). Inputs scored on different documents, templates or suite
    versions are refused. Example:

        dpo-align compare runs/eval-base runs/eval-dpo -o runs/compare

        dpo-align compare results/objectives --baseline sigmoid
    """
    from dpo_align.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
    from dpo_align.report import compare, scorecard

    if bootstrap < 100 or permutations < 100:
        raise UserError("--bootstrap and --permutations need at least 100 draws each.")
    if seed < 0:
        raise UserError(f"--seed {seed}: a seed is a whole number >= 0.")
    from dpo_align.core.folder_lock import check_output_folder, locked

    if output is not None:
        check_output_folder(output)
    from dpo_align.grid import sweep_recipe_labels

    models = compare.with_baseline(compare.load(results, relabel=sweep_recipe_labels), baseline)
    changes = compare.compare(models, replicates=bootstrap, permutations=permutations, seed=seed)
    preference = compare.preference_rows(models)  # each folder's preference.json, read once for the text and the JSON
    displacement = compare.displacement_rows(models, preference)
    card = compare.scorecard_of(models, changes, preference)  # None without a preference table
    text = compare.markdown(models, changes, replicates=bootstrap, permutations=permutations, displacement=displacement,
                            card=card)
    typer.echo(text)
    if output is None:
        return
    # the plots first: a plot that cannot be drawn leaves no compare.md without its compare.png
    plots = {"compare.png": compare.plot(changes), **({"scorecard.png": scorecard.plot(card[0])} if card else {})}
    with locked(output, "dpo-align compare"):
        atomic_write_text(output / "compare.md", text)
        atomic_write_json(output / "compare.json", {"baseline": models[0].label, "sources": [m.source for m in models],
                                                    "bootstrap": bootstrap, "permutations": permutations, "seed": seed,
                                                    **compare.as_json(changes), "displacement": displacement,
                                                    "scorecard": scorecard.as_json(card[0], baseline_is_reference=card[1])
                                                    if card else None})
        for name, data in plots.items():
            atomic_write_bytes(output / name, data)
    typer.echo(f"Wrote {output}/compare.md, compare.json and compare.png" + (" and scorecard.png." if card else "."))


# --------------------------------------------------------------------------- generate


@app.command("generate")
@user_errors
@with_settings(ScoreOptions, include=("template", "device", "trust_remote_code", "allow_pickle"))
def generate_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=f"Base model: hub id, local checkpoint, or the built-in {DEFAULT_MODEL!r}.")] = DEFAULT_MODEL,
    peft: Annotated[list[str] | None, typer.Option("--peft", help="A LoRA adapter trained on MODEL; its responses go beside the base's (repeatable).")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="An instruction to answer (repeatable).")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help="A file of instructions: one per line, or JSON/JSONL strings or {\"prompt\": ...}.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per response.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding (the default); above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling, reset before each model.")] = 0,
    output_format: Annotated[str, typer.Option("--format", help="md or json.")] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")] = None,
) -> None:
    """Side by side: the base model's and each adapter's responses to the same prompts.

    Prompts are rendered with the training template. Greedy by default. Without --prompt or
    --prompts, a fixed handful of hh-rlhf held-out instructions is used (none starts a
    training-pool conversation). Example, offline:

        dpo-align generate --peft runs/dpo --max-new-tokens 96
    """
    import json as json_module

    from dpo_align.core.files import atomic_write_text
    from dpo_align.core.models import adapter_base, check_adapter_folder, check_weights_safe, resolve_model
    from dpo_align.core.provenance import same_model, template_warning
    from dpo_align.score import generate as gen
    from dpo_align.score.evaluate import resolve_device

    if output_format not in ("md", "json"):
        raise UserError(f"--format {output_format!r} is not one of: md, json.")
    if prompt and prompts:
        raise UserError("Give --prompt or --prompts, not both.")
    if output is not None:
        from dpo_align.core.folder_lock import check_output_file

        check_output_file(output)
    options = ScoreOptions(**settings_of(ctx, ScoreOptions)).validate()
    template = options.template
    sampling = gen.Sampling(max_new_tokens, temperature, top_p, seed).validate()
    path = resolve_model(model, progress=lambda m: typer.echo(m, err=True))
    for adapter in peft or []:
        check_adapter_folder(adapter)
        check_weights_safe(adapter, options.allow_pickle)
        trained_on = adapter_base(adapter)
        if trained_on and not same_model(trained_on, path):  # LoRA deltas learned for other weights: noise, or a shape error
            if Path(trained_on).exists() == Path(path).exists():  # two folders here, or two hub ids: two models
                raise UserError(f"--peft {adapter} was trained on {trained_on}, and MODEL is {path}. Its responses beside "
                                f"another model's would not be the adapter's: pass {trained_on} as MODEL.")
            typer.echo(f"Warning: --peft {adapter} was trained on {trained_on} (a hub id or a folder not on this machine); "
                       f"it is applied to MODEL {path} as given. If that is not the same model, its responses are not the adapter's.",
                       err=True)
        if warning := template_warning(adapter, template):
            typer.echo(warning, err=True)
    texts = list(prompt) if prompt else gen.read_prompts(prompts) if prompts else list(gen.DEFAULT_PROMPTS)
    rows = gen.generate(path, peft or [], texts, template=template, sampling=sampling, device=resolve_device(options.device),
                        trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)
    if output_format == "json":
        text = json_module.dumps({"model": model, "adapters": peft or [], "template": template, "sampling": sampling.__dict__,
                                  "rows": rows}, indent=2, ensure_ascii=False) + "\n"
    else:
        text = gen.markdown(rows, model=model, template=template, sampling=sampling)
    if output is None:
        typer.echo(text)
    else:
        atomic_write_text(output, text)
        typer.echo(f"Wrote {output}.", err=True)


# --------------------------------------------------------------------------- report


@app.command("report")
@user_errors
def report_command(
    folder: Annotated[Path, typer.Argument(help="A run folder (`dpo-align train -o`) or a sweep output folder (`dpo-align sweep -o`).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file (default FOLDER/report.html); the Markdown goes beside it.")] = None,
    generations: Annotated[int, typer.Option(help="Default prompts answered by the base model and each adapter (0: none).")] = 3,
) -> None:
    """One self-contained HTML page (images inlined) and the same as Markdown, for a run or a sweep.

    A run: configuration and manifest summary, training curves, generations side by side. A
    sweep: the result table with standard errors, the paired comparison with the baseline,
    held-out preference accuracies, the learning curve, training curves and generations.
    `train` and `sweep` write it at the end; run this to rebuild it.
    """
    from dpo_align.core.folder_lock import check_output_file, locked
    from dpo_align.report.html import write_report
    from dpo_align.score.generate import report_generations

    if not folder.is_dir():
        raise UserError(f"{folder}: a file, not a folder. Give a run or sweep folder." if folder.exists() else f"{folder}: no such folder.")
    if generations < 0:
        raise UserError("--generations must be 0 or more.")
    if output is not None:
        check_output_file(output)
    with locked(folder, "dpo-align report", "FOLDER"):  # a folder a train or sweep is writing is refused, not reported half-way
        path = write_report(folder, output, generations=generations, generate=report_generations, progress=lambda m: typer.echo(m, err=True))
    typer.echo(f"Wrote {path} and {path.with_suffix('.md')}.")


# --------------------------------------------------------------------------- train

@app.command("train")
@user_errors
@with_settings()
def train_command(
    ctx: typer.Context,
    *,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of settings (e.g. a previous run's config.yaml); options given here override it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --output-dir.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its latest complete checkpoint.")] = False,
) -> None:
    """Fine-tune a causal LM with DPO and a LoRA adapter on preference pairs.

    Writes to --output-dir: the adapter (safetensors) and tokenizer, config.yaml (repeat the
    run with --config), manifest.json (versions, data hashes, seed, device, times),
    metrics.jsonl, plots/*.png and a model card README.md. Ctrl-C saves a checkpoint;
    --resume continues it. Example, offline:

        dpo-align train --data ../shared/data/splits/train-pool.jsonl.gz --max-steps 20 -o runs/try
    """
    from dpo_align.train.config import resolve_settings

    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other: choose one.")
    settings = resolve_settings(config, given_settings(ctx), resume=resume)  # every setting checked before a model loads
    from dpo_align.train.run import Interrupted, train

    try:
        manifest = train(settings, resume=resume, overwrite=overwrite, progress=lambda m: typer.echo(m, err=True))
    except Interrupted as stop:
        typer.secho(str(stop), fg="yellow", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, mid-step
        typer.secho(f"Stopped. The latest complete checkpoint in {settings.output_dir} is intact; resume with:\n"
                    f"    dpo-align train --output-dir {settings.output_dir} --resume", fg="yellow", err=True)
        raise typer.Exit(130) from None
    from dpo_align.train.model_card import SUMMARY_KEYS

    if not manifest:  # a non-main process under `accelerate launch`: the main one reports
        return
    from dpo_align.report.html import write_report_safely
    from dpo_align.score.generate import report_generations

    write_report_safely(settings.output_dir, lambda m: typer.echo(m, err=True), generations=settings.report_generations,
                        generate=report_generations)
    typer.echo(f"Done in {manifest['wall_time_s']} s, {manifest['global_steps']} steps. Adapter and report in {settings.output_dir}/")
    for name, row, prefix in (("train", manifest["final_train"], ""), ("held-out", manifest["final_eval"], "eval_")):
        shown = {k: row[prefix + k] for k in SUMMARY_KEYS if prefix + k in row}
        if shown:
            typer.echo(f"Final {name}: " + ", ".join(f"{k.removeprefix('rewards/')}={v:.4f}" for k, v in shown.items()))


# --------------------------------------------------------------------------- merge


@app.command("merge")
@user_errors
@with_settings(ScoreOptions, include=("trust_remote_code", "allow_pickle"))
def merge_command(
    ctx: typer.Context,
    adapter: Annotated[Path, typer.Argument(help="The adapter folder `dpo-align train` wrote.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged safetensors checkpoint.")],
    base: Annotated[str | None, typer.Option(help="Base model, if not the one named in adapter_config.json.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output folder.")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a standalone checkpoint.

    The output holds safetensors weights and the tokenizer. Score it like any model:
    `lm_eval --model hf --model_args pretrained=OUTPUT ...` gives the same numbers as
    `pretrained=BASE,peft=ADAPTER`.
    """
    from dpo_align.core.folder_lock import locked
    from dpo_align.train.merge import merge

    options = ScoreOptions(**settings_of(ctx, ScoreOptions)).validate()
    with locked(output, "dpo-align merge"):
        path = merge(adapter, output, base=base, overwrite=overwrite, trust_remote_code=options.trust_remote_code,
                     allow_pickle=options.allow_pickle, progress=lambda m: typer.echo(m, err=True))
    typer.echo(str(path))


# --------------------------------------------------------------------------- sweep


@app.command("sweep")
@user_errors
@with_settings(ScoreOptions, include=("limit", "batch_size"), prefix="eval_")
@with_settings(ScoreOptions, include=("controls",))
@with_settings(exclude=("learning_rate", "output_dir"))
def sweep_command(
    ctx: typer.Context,
    *,
    lr: Annotated[str, typer.Option("--lr", help="Learning rates to train, comma-separated: the shortcut for --grid learning_rate=... "
                                         "(without --grid, the default 5e-6,1e-5 applies).")] = "5e-6,1e-5",
    grid: Annotated[list[str] | None, typer.Option("--grid", help=(
        "Vary any training setting: NAME=V1,V2,... (repeatable; every combination is one run, named by what differs). "
        "'+' joins the items of one list value: --grid loss_type=sigmoid,ipo,sigmoid+sft --grid loss_weights=1+1. "
        "The settings not in the grid are the other options'."))] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML of training settings; options given here override it.")] = None,
    preference_data: Annotated[list[str] | None, typer.Option("--preference-data", help=(
        "Held-out pairs on which to measure every model's preference accuracy (implicit DPO reward; length-normalised "
        "likelihood), e.g. ../shared/data/splits/heldout.jsonl.gz."))] = None,
    curve_docs: Annotated[int, typer.Option(help=(
        "Learning curve: keep a checkpoint every 10% of each run and score those of the best run on N fixed documents "
        "per dataset (0: no curve)."))] = 0,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap replicates for the intervals of the change against the baseline.")] = 10_000,
    runs_dir: Annotated[Path, typer.Option(help="Where the adapters and checkpoints go (not for git).")] = Path("runs/sweep"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the tables, curves, each run's record and the cached scores go (commit it whole).")] = Path("results/sweep"),
) -> None:
    """Train one adapter per learning rate, score the base model and every adapter, and write the reference table.

    Reproduces the reference experiment (one epoch at lr 5e-6 and 1e-5) in one command.

    Each run is scored as soon as it is trained, so an interrupted sweep keeps every finished run's
    numbers, and resumes when run again: finished runs and models already scored are kept. The
    output folder holds each run's record (manifests/: settings, adapter sha256, training log) and
    every cached score: with it, the same command on a machine without the adapters (an empty
    --runs-dir, a fresh clone) trains nothing and rebuilds the tables.

        dpo-align sweep --lr 5e-6,1e-5 --data ../shared/data/splits/train-pool.jsonl.gz --data-dir ../shared/data --pku-path ../shared/data/splits/heldout.jsonl.gz
    """
    from dpo_align.core.folder_lock import check_run_folders
    from dpo_align.grid import parse_grid
    from dpo_align.sweep import sweep
    from dpo_align.train.config import resolve_settings

    check_run_folders(runs_dir, output)  # before hours of training
    scoring = ScoreOptions(**settings_of(ctx, ScoreOptions, prefix="eval_"), controls=ctx.params["controls"]).validate()  # before hours of training
    lr_given = ctx.get_parameter_source("lr").name not in ("DEFAULT", "DEFAULT_MAP")
    from dpo_align.train.config import load_config_file

    config_lr = load_config_file(config).get("learning_rate") if config is not None else None
    if not lr_given and not grid and config_lr is not None:  # --config's learning rate, not the default pair, is the sweep's one point
        lr = str(config_lr)
    spanned = parse_grid(grid or [], lr=lr if (lr_given or not grid) else None)  # --grid alone: the learning rate of --config/default
    given = given_settings(ctx)
    both = sorted(set(given) & set(spanned))
    if both:
        raise UserError(f"{', '.join(both)}: given as an option and in --grid; give each setting in one place.")
    base = resolve_settings(config, given)
    data_dir, pku_path = base.eval_suite_data_dir, base.eval_suite_pku_path  # the suite scored is the one checked for overlap
    from dpo_align.core.folder_lock import locked
    from dpo_align.train.run import Interrupted

    try:
        with locked(runs_dir, "dpo-align sweep", "--runs-dir"), locked(output, "dpo-align sweep"):
            runs = sweep(base, spanned, runs_dir=runs_dir, output=output, eval_limit=scoring.limit, data_dir=data_dir, pku_path=pku_path,
                         batch_size=scoring.batch_size, controls=scoring.controls, preference_data=preference_data, curve_docs=curve_docs, replicates=bootstrap,
                         progress=lambda m: typer.echo(m, err=True))
    except (Interrupted, KeyboardInterrupt):  # finished runs and scores are kept; the run cut short resumes from its checkpoint
        typer.secho("Sweep interrupted. Run the same command again to continue: finished runs and scores are kept, and the "
                    "run that was cut short resumes from its latest checkpoint.", fg="yellow", err=True)
        raise typer.Exit(130) from None
    from dpo_align.report.tables import markdown_table

    typer.echo(markdown_table(runs))
    typer.echo(f"Wrote {output}/: table.md, table.csv, table.png, results.json, comparison.json, curves/, manifests/, samples/"
               + (", preference.md" if preference_data else "") + (", learning-curve.png" if curve_docs else "") + ".")


# --------------------------------------------------------------------------- search


@app.command("search")
@user_errors
@with_settings(ScoreOptions, include=("batch_size", "dtype"), prefix="eval_")
@with_settings(exclude=("output_dir",))
def search_command(
    ctx: typer.Context,
    *,
    space: Annotated[Path | None, typer.Option("--space", help="YAML search space: each setting a range {low, high, log} or a list of choices.")] = None,
    trials: Annotated[int, typer.Option("--trials", help="Trials this worker runs (Optuna's n_trials).")] = 8,
    max_trials: Annotated[int | None, typer.Option("--max-trials", help="Stop when the study holds this many finished or pruned trials, "
                                                  "whichever worker ran them (running the command again then continues up to it).")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="SQLAlchemy URL of the study database, the same on every worker "
                                                "(postgresql://user@host/db). Default: a SQLite file OUTPUT/study.db.")] = None,
    study: Annotated[str, typer.Option("--study", help="Study name in the database.")] = "dpo-align",
    sampler: Annotated[str, typer.Option("--sampler", help="tpe (Optuna's TPE, seeded from --seed and the worker, Q2 and Q3 as constraints) or grid "
                                         "(every combination of the choices and --grid-points values per range).")] = "tpe",
    grid_points: Annotated[int, typer.Option("--grid-points", help="With --sampler grid: values per range.")] = 3,
    search_docs: Annotated[int, typer.Option("--search-docs", help="Documents per dataset scored for every trial (the same for all, "
                                             "with their foils).")] = 150,
    search_pairs: Annotated[int, typer.Option("--search-pairs", help="Held-out pairs of --preference-data for Q2 and Q3 (the same for all).")] = 200,
    preference_data: Annotated[list[str] | None, typer.Option("--preference-data", help="Held-out pairs for Q2 and Q3.")] = None,
    prune_every: Annotated[float, typer.Option("--prune-every", help="Score a checkpoint every this fraction of a trial's steps and let "
                                               "the median pruner stop trials behind the others (0: no pruning).")] = 0.25,
    config: Annotated[Path | None, typer.Option("--config", help="YAML of the settings every trial shares; options given here override it.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the trials' adapters go (not for git).")] = Path("runs/search"),
    output: Annotated[Path, typer.Option("--output", "-o", help="The study's folder: its database (by default), tables and plots.")] = Path("results/search"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue a study of this name although its space or settings differ.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Print the study's trials and the best so far, and exit (any machine, any time).")] = False,
    report_only: Annotated[bool, typer.Option("--report", help="Write the report from the database and exit.")] = False,
    requeue: Annotated[bool, typer.Option("--requeue", help="Queue again the settings of trials that failed only because their workers "
                                          "died, after Optuna's retries; each continues in its first attempt's folder. Then exit.")] = False,
) -> None:
    """Search training settings with Optuna: each trial trains, and is scored by its controlled verdict.

    The value minimised is the mean's specific change against the base model (ce beside its foils) on
    --search-docs fixed documents per dataset; Q2 and Q3 of the scorecard are constraints. Run the same
    command on several machines with one --storage to share the study. Example, offline:

        dpo-align search --space configs/search-space.yaml --data ../shared/data/splits/train-pool.jsonl.gz \\
          --max-pairs 1000 --pair-sample random --data-dir ../shared/data --pku-path ../shared/data/splits/heldout.jsonl.gz \\
          --preference-data ../shared/data/splits/heldout.jsonl.gz -o results/search
    """
    from dpo_align.core.folder_lock import check_run_folders
    from dpo_align.search import study as studies
    from dpo_align.search.space import load_space
    from dpo_align.train.config import resolve_settings

    url = storage or studies.default_storage(output)
    base = resolve_settings(config, given_settings(ctx))

    def echo(message: str) -> None:
        typer.echo(message, err=True)

    if status or report_only or requeue:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            # --requeue first fails the trials of workers silent past the grace period, as a starting worker would
            found = optuna.load_study(study_name=study, storage=studies.open_storage(url, heartbeat=requeue))
        except KeyError:
            raise UserError(f"--study {study}: no such study in {studies.hidden_url(url)}.") from None
        from dpo_align.search import report

        base = studies.shared_settings(found, config, given_settings(ctx))
        if status:
            typer.echo(report.markdown(found, report.rows(found, base), *report.ranking(found), base))
            return
        if requeue:
            again = studies.requeue(found)
            for first, attempts in again:
                echo(f"trial {first}'s settings (attempts {', '.join(map(str, attempts))}, all ended with their worker) are queued again; "
                     f"the next worker continues them in trial-{first}'s folder.")
            echo(f"{len(again)} trial(s) queued again. Study: {studies.state_line(found)}")
            return
        report.write(found, None, base, output, progress=echo)
        return
    if space is None:
        raise UserError("--space FILE is needed: a YAML search space, such as configs/search-space.yaml.")
    check_run_folders(runs_dir, output)
    search_space = load_space(space)
    options = ScoreOptions(**settings_of(ctx, ScoreOptions, prefix="eval_")).validate()
    output.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    from dpo_align.train.run import Interrupted

    try:
        studies.run_worker(space=search_space, base=base, storage_url=url, study_name=study, output=output, runs_dir=runs_dir, trials=trials,
                           max_trials=max_trials, search_docs=search_docs, search_pairs=search_pairs, preference_data=preference_data,
                           prune_every=prune_every, sampler=sampler, grid_points=grid_points, resume=resume, score_options=options, progress=echo)
    except (Interrupted, KeyboardInterrupt):
        typer.secho("Search interrupted: the trial that was running is recorded as failed. Run the same command again to continue the "
                    "study.", fg="yellow", err=True)
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
