"""Scoring one model with the suite through lm-eval: what ``dpo-align eval`` and the sweep run.

The scoring itself is lm-eval's (``simple_evaluate`` with ``--model dpo-hf`` or ``hf`` and the
tasks in ``lm_eval_tasks/``), so these numbers are the ones ``lm_eval --include_path
lm_eval_tasks`` prints. This module picks the models (``model_specs``), holds the scoring
settings (``ScoreOptions``), runs one model (``score_spec``) and turns lm-eval's results into
per-dataset rows (``summarize``) and per-document values (``per_document``). Writing the
output folder is ``report.tables.write_outputs``'; ``dpo_align/eval_run.py`` joins the two.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.models import (
    BUILTIN_MODELS,
    adapter_base,
    check_adapter_folder,
    check_tokenizer_files,
    check_weights_safe,
    locate_model,
)
from dpo_align.core.provenance import git_commit, machine, model_revision, package_versions, same_model, started
from dpo_align.core.settings import setting
from dpo_align.data.suite import CONTRAST, PPL, document_row
from dpo_align.data.templates import DEFAULT_TEMPLATE, TEMPLATES, check_template

SUITE = PPL.group
TASKS = PPL.tasks
METRICS = PPL.metrics
CONTROL_METRICS = tuple(m for m in CONTRAST.metrics if m not in PPL.metrics)  # ce_foil, acc, acc_norm


@dataclass(frozen=True)
class ModelSpec:
    label: str  # what tables, plots and the report show
    pretrained: str  # what lm-eval loads: a hub id or a local directory
    peft: str | None = None
    key: str | None = None  # what its cached results are filed and keyed under, where not the label (a sweep's run name)

    @property
    def cache_name(self) -> str:
        return self.key or self.label


def include_path() -> str:
    """The task folder as installed with the package (works outside the repo)."""
    return str(files("dpo_align.lm_eval_tasks"))


def model_specs(models: list[str], adapters: list[str], progress=print) -> list[ModelSpec]:
    """Positional models (hub ids, directories, built-in names, or adapter directories),
    then one column per --peft adapter on its own base (or on the first model)."""
    specs: list[ModelSpec] = []
    for name in models:
        path = Path(name).expanduser()
        base = adapter_base(path) if path.is_dir() else None
        if base:
            check_adapter_folder(path, "MODEL")
            specs.append(ModelSpec(f"{path.name} (LoRA)", _base(base, progress), str(path)))
        else:
            label = name if (name in BUILTIN_MODELS or not path.exists()) else path.name
            specs.append(ModelSpec(label, _base(name, progress)))
    for adapter in adapters:
        path = Path(adapter).expanduser()
        check_adapter_folder(path)
        base = adapter_base(path) or (specs[0].pretrained if specs else None)
        if base is None:
            raise UserError(f"--peft {adapter}: the adapter names no base model; pass the base as MODEL.")
        on = _base(base, progress)
        label = f"{path.name} (LoRA)"
        if specs and not same_model(on, specs[0].pretrained):  # scored on its own base, and its row says which
            label = f"{path.name} (LoRA on {Path(on).name})"
            progress(f"Warning: --peft {adapter} was trained on {on}, not on {specs[0].pretrained}: it is scored on its own base "
                     "and its row is labelled with it. A change against the first model compares two bases, not the adapter.")
        specs.append(ModelSpec(label, on, str(path)))
    if not specs:
        raise UserError("Nothing to score: pass at least one MODEL or --peft ADAPTER.")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):  # keep columns and folders distinct
        specs = [ModelSpec(f"{s.label} [{i + 1}]", s.pretrained, s.peft) for i, s in enumerate(specs)]
    return specs


def _base(name: str, progress) -> str:
    """A model to score, checked before anything loads: a missing folder, config or tokenizer is named."""
    path = locate_model(name, progress)
    check_tokenizer_files(path)
    return path


DTYPES = ("float32", "bfloat16", "float16", "auto")
LM_EVAL_MODELS = ("dpo-hf", "hf")


def suite_tasks(datasets: list[str] | None = None, *, controls: bool = True) -> tuple[str, ...]:
    """The groups of the suite (or, for ``datasets``, their tasks): dpo_ppl, and dpo_contrast with the controls."""
    families = (PPL, CONTRAST) if controls else (PPL,)
    if not datasets:
        return tuple(family.group for family in families)
    return tuple(family.tasks[d] for family in families for d in datasets)


@dataclass(frozen=True)
class ScoreOptions:
    """How models are scored: the same for every model of one table.

    Its fields with help text are the scoring options of ``eval``, ``generate``, ``merge``, ``data
    inspect`` and ``sweep`` (generated by dpo_align/options.py); ``validate`` checks them all, before
    any model loads, each error naming its option."""

    tasks: tuple[str, ...] | None = None  # None: the suite's groups (see task_list)
    limit: int | None = setting(None, "Score only the first N documents of each dataset.")
    data_dir: str | None = setting(None, "Offline data folder laid out like ../shared/data (default: env DPO_ALIGN_DATA_DIR, else the hub).")
    pku_path: str | None = setting(None, "PKU processed-hh-rlhf file(s), or hh-rlhf transcripts, e.g. ../shared/data/splits/heldout.jsonl.gz.")
    template: str = setting(DEFAULT_TEMPLATE, f"Prompt template: {', '.join(TEMPLATES)}. alpaca is what the reference SFT model was trained with.")
    batch_size: int = setting(16, "Requests per forward pass.")
    device: str = setting("auto", "cpu, cuda, cuda:N, or auto.")
    dtype: str = setting("float32", "Weights dtype for scoring: float32, bfloat16, float16 or auto. bfloat16 is faster on CPUs that have "
                         "it but moves ce (see results/eval-throughput.md).")
    trust_remote_code: bool = setting(False, "Allow code shipped with a checkpoint to run.")
    allow_pickle: bool = setting(False, "Load pickle (.bin/.pt) weights through torch's weights_only loader; safetensors only otherwise.")
    # dpo-hf: the LM head at continuation positions only (same numbers, a fraction of the memory)
    controls: bool = setting(True, "Score every document's foils beside it (the dpo_contrast tasks: TruthfulQA's incorrect answers, "
                             "WinoGrande's other option, PKU's rejected response), so that a verdict can tell a better model from "
                             "a change of format. --no-controls scores the reference responses alone.", "--controls/--no-controls")
    lm_eval_model: str = setting("dpo-hf", "lm-eval model class: dpo-hf (the LM head at response positions only: same numbers, "
                                 "less memory) or lm-eval's own hf.")
    # {task: [doc indices]} to score only those documents (benchmarks); None scores all (or --limit)
    samples: dict | None = None
    # hub sets pinned to a branch, tag or commit: {"winogrande": "SHA", ...}; the commits read are recorded
    dataset_revisions: dict | None = None

    def task_list(self) -> tuple[str, ...]:
        """The lm-eval tasks scored: ``tasks`` if given, else the suite's groups (with the controls unless they are off)."""
        return self.tasks or suite_tasks(controls=self.controls)

    def validate(self) -> ScoreOptions:
        import torch

        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: give at least 1 request per forward pass.")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: give at least 1 document per dataset, or leave it out to score them all.")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not one of: {', '.join(DTYPES)}.")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"--device {self.device!r} is not one of: auto, cpu, cuda, cuda:N, mps.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: this machine has no CUDA device (torch {torch.__version__}). Use --device cpu or auto.")
        if self.lm_eval_model not in LM_EVAL_MODELS:
            raise UserError(f"--lm-eval-model {self.lm_eval_model!r} is not one of: {', '.join(LM_EVAL_MODELS)}.")
        check_template(self.template)
        return self

    def settings(self) -> dict:
        """For results files: the options plus where and with what they ran (the data folder actually read: the one
        given, else ``DPO_ALIGN_DATA_DIR``'s)."""
        from dpo_align.data.suite_docs import local_data_dir

        return {**dataclasses.asdict(self), "data_dir_read": local_data_dir(self.data_dir), "started": started(),
                "versions": package_versions(), "git_commit": git_commit(), "machine": machine()}


def score(spec: ModelSpec, options: ScoreOptions) -> dict:
    """One model through lm-eval; returns lm-eval's results dict (with samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dpo_align.score.lm_eval_model  # noqa: F401  (registers --model dpo-hf with lm-eval)

    allow_pickle = options.allow_pickle
    check_weights_safe(spec.pretrained, allow_pickle)
    if spec.peft:
        check_weights_safe(spec.peft, allow_pickle)
    model_args = {"pretrained": spec.pretrained, "dtype": options.dtype, "trust_remote_code": options.trust_remote_code}
    if spec.peft:
        model_args["peft"] = spec.peft
    metadata = {**model_args, "template": options.template}
    if not allow_pickle:
        model_args["use_safetensors"] = True  # passed through by lm-eval to from_pretrained
    if options.data_dir:
        metadata["data_dir"] = options.data_dir
    if options.pku_path:
        metadata["pku_path"] = options.pku_path
    if options.dataset_revisions:
        metadata["dataset_revisions"] = dict(options.dataset_revisions)
    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)
    try:
        return lm_eval.simple_evaluate(
            model=options.lm_eval_model,
            model_args=model_args,
            tasks=list(options.task_list()),
            task_manager=manager,
            limit=options.limit,
            samples=options.samples,
            batch_size=options.batch_size,
            device=resolve_device(options.device),
            log_samples=True,
        )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        # Only failures a user can fix (files, weights, the wrong base) become a message; any other
        # ValueError/RuntimeError is a bug and keeps its traceback.
        if isinstance(err, UserError) or not (isinstance(err, OSError | pickle.UnpicklingError) or _user_fixable(err)):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = failure_hint(str(err), spec, allow_pickle)
        raise UserError(f"Scoring {spec.label} ({spec.pretrained}" + (f" + {spec.peft}" if spec.peft else "")
                        + f") failed: {message}.{hint}") from None


def failure_hint(text: str, spec: ModelSpec, allow_pickle: bool) -> str:
    """The likely cause of a loading failure, only where the error shows it (a hint that names the wrong cause is worse
    than none: a missing shard once got "pass --allow-pickle", a LoRA rank mismatch "wrong base")."""
    import re

    if "size mismatch" in text:
        if re.search(r"size mismatch for [\w.]*lora_", text):
            return (" The adapter's weights do not have the shapes its own adapter_config.json gives them (r, target modules): the "
                    "config was edited or comes from another adapter. Restore the adapter's own adapter_config.json.")
        return " Does the adapter belong to this base model? An adapter only loads on the base it was trained on."
    if re.search(r"\.safetensors.*(not found|No such file|does not exist|missing)|(not found|No such file|missing).*\.safetensors", text):
        return " A weight file the checkpoint names is missing (an incomplete download or copy): copy the whole folder again."
    folder = Path(spec.pretrained).expanduser()
    if "safetensors" in text and not allow_pickle and folder.is_dir() and not list(folder.glob("*.safetensors")) \
            and any(folder.glob("*.bin")):
        return " The checkpoint has only pickle weights: pass --allow-pickle if you trust it."
    return ""


# Messages of ValueError/RuntimeError raised by transformers/peft/lm-eval for bad user input.
USER_FIXABLE = ("size mismatch", "safetensors", "Repo id", "does not appear to have", "trust_remote_code", "adapter_config",
                "Can't find", "not a valid", "Unrecognized model", "No such file", "not found in the base model")


def _user_fixable(err: Exception) -> bool:
    return any(marker in str(err) for marker in USER_FIXABLE)


def _number(value) -> float | None:
    """lm-eval reports the stderr of a one-document task as the string "N/A": kept as None."""
    return float(value) if isinstance(value, int | float) else None


def summarize(results: dict) -> dict:
    """{dataset: {metric: [value, stderr or None], "n": docs}} plus "mean" for the suite."""
    table = {}
    for key, task in TASKS.items():
        if task in results["results"]:
            row = results["results"][task]
            table[key] = {m: [row[f"{m},none"], _number(row.get(f"{m}_stderr,none"))] for m in METRICS}
            table[key]["n"] = results["n-samples"][task]["effective"]
            # shares of documents whose response start merged into the context, and whose prompt was cut to fit the window
            for m in ("boundary_merge", "truncated"):
                if f"{m},none" in row:
                    table[key][m] = [row[f"{m},none"], _number(row.get(f"{m}_stderr,none"))]
    if SUITE in results.get("groups", {}):
        row = results["groups"][SUITE]
        table["mean"] = {m: [row[f"{m},none"], _number(row.get(f"{m}_stderr,none"))] for m in METRICS if f"{m},none" in row}
        # ppl of the suite: exp(mean ce), with the delta-method stderr (the YAML has no group ppl)
        ce, se = table["mean"]["ce"]
        table["mean"]["ppl"] = [math.exp(ce), None if se is None else math.exp(ce) * se]
    # the controls (dpo_contrast_*): the foils' ce and the accuracy beside the ppl numbers of the same dataset
    for key, task in [*CONTRAST.tasks.items(), ("mean", CONTRAST.group)]:
        row = results["results"].get(task) or results.get("groups", {}).get(task)
        if row is None or key not in table:
            continue
        for m in CONTROL_METRICS:
            if f"{m},none" in row:
                table[key][m] = [row[f"{m},none"], _number(row.get(f"{m}_stderr,none"))]
        if key != "mean" and "truncated,none" in row:  # the reference's or a foil's prompt cut to fit
            table[key]["truncated_controls"] = [row["truncated,none"], _number(row.get("truncated_stderr,none"))]
    return table


def per_document(results: dict) -> dict[str, list[dict]]:
    return {task: [document_row(task, s) for s in samples] for task, samples in results.get("samples", {}).items()}




def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def quiet_lm_eval() -> None:
    """lm-eval logs several warnings per task that do not apply here (custom_dataset hints,
    chat-template advice); its progress bars still show."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def score_spec(spec: ModelSpec, options: ScoreOptions) -> dict | None:
    """One model: lm-eval's numbers, provenance and per-document values, as one dict."""
    start = time.perf_counter()
    results = score(spec, options)
    if results is None:  # a process other than the first under `accelerate launch`: lm-eval gathers on the first
        return None
    from dpo_align.core.models import gguf_source

    revision = {"base": model_revision(spec.pretrained), "converted_from": gguf_source(spec.pretrained)}
    if spec.peft:
        revision["adapter"] = model_revision(spec.peft)
    table = summarize(results)
    from dpo_align.data.suite_docs import SKIPPED_EMPTY, SKIPPED_NO_FOIL

    for key, row in table.items():  # documents left out for an empty response (or, by the controls, for no foil), per dataset
        if key in SKIPPED_EMPTY:
            row["skipped_empty_responses"] = SKIPPED_EMPTY[key]
        if "ce_foil" in row and key in SKIPPED_NO_FOIL:
            row["skipped_no_foil"] = SKIPPED_NO_FOIL[key]
    from dpo_align.data.hub import COMMITS
    merged = {key: row["boundary_merge"][0] for key, row in table.items() if row.get("boundary_merge", [0])[0]}
    if merged:
        import warnings

        warnings.warn(f"{spec.label}: this tokenizer merges the template's last characters with the response's first ones in "
                      + ", ".join(f"{k} ({100 * v:.0f}% of documents)" for k, v in merged.items())
                      + ": those characters are not scored (see lm_eval_tasks/README.md, boundary_merge).", stacklevel=2)
    from dpo_align.data.suite import truncation_notes

    for note in truncation_notes([{"label": spec.label, "table": table}]):
        import warnings

        warnings.warn(note, stacklevel=2)
    return {
        "label": spec.label, "pretrained": spec.pretrained, "peft": spec.peft, "revision": revision,
        "hub_datasets": dict(COMMITS),  # commit read of every set loaded from the hub (None: unknown)
        "seconds": round(time.perf_counter() - start, 2), "table": table,
        "versions": {task: results.get("versions", {}).get(task) for task in [*TASKS.values(), *CONTRAST.tasks.values()] if task in results.get("versions", {})},
        "documents": per_document(results),
    }
