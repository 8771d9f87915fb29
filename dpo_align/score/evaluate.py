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
from dpo_align.core.provenance import git_commit, machine, model_revision, package_versions
from dpo_align.data.suite import PPL
from dpo_align.data.templates import DEFAULT_TEMPLATE

SUITE = PPL.group
TASKS = PPL.tasks
METRICS = PPL.metrics


@dataclass(frozen=True)
class ModelSpec:
    label: str
    pretrained: str  # what lm-eval loads: a hub id or a local directory
    peft: str | None = None


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
        specs.append(ModelSpec(f"{path.name} (LoRA)", _base(base, progress), str(path)))
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


@dataclass(frozen=True)
class ScoreOptions:
    """How models are scored: the same for every model of one table."""

    tasks: tuple[str, ...] = (SUITE,)
    limit: int | None = None
    data_dir: str | None = None
    pku_path: str | None = None
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # lm-eval model class: "dpo-hf" (the LM head at continuation positions only; same numbers,
    # a fraction of the memory) or lm-eval's own "hf"
    lm_eval_model: str = "dpo-hf"
    # {task: [doc indices]} to score only those documents (benchmarks); None scores all (or --limit)
    samples: dict | None = None
    # hub sets pinned to a branch, tag or commit: {"winogrande": "SHA", ...}; the commits read are recorded
    dataset_revisions: dict | None = None

    def settings(self) -> dict:
        """For results files: the options plus where and with what they ran."""
        return {**dataclasses.asdict(self), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
            tasks=list(options.tasks),
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
        hint = ""
        if "size mismatch" in str(err) or "adapter" in str(err).lower():
            hint = " Does the adapter belong to this base model? An adapter only loads on the base it was trained on."
        elif "safetensors" in str(err) and not allow_pickle:
            hint = " The checkpoint may have only pickle weights: pass --allow-pickle if you trust it."
        raise UserError(f"Scoring {spec.label} ({spec.pretrained}" + (f" + {spec.peft}" if spec.peft else "")
                        + f") failed: {message}.{hint}") from None


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
            if "boundary_merge,none" in row:  # share of documents whose response start merged into the context
                table[key]["boundary_merge"] = [row["boundary_merge,none"], _number(row.get("boundary_merge_stderr,none"))]
    if SUITE in results.get("groups", {}):
        row = results["groups"][SUITE]
        table["mean"] = {m: [row[f"{m},none"], _number(row.get(f"{m}_stderr,none"))] for m in METRICS if f"{m},none" in row}
        # ppl of the suite: exp(mean ce), with the delta-method stderr (the YAML has no group ppl)
        ce, se = table["mean"]["ce"]
        table["mean"]["ppl"] = [math.exp(ce), None if se is None else math.exp(ce) * se]
    return table


def per_document(results: dict) -> dict[str, list[dict]]:
    out = {}
    for task, samples in results.get("samples", {}).items():
        out[task] = [
            {"doc_id": s["doc_id"], "id": s["doc"]["id"], "nll": s["ce"][0], "tokens": s["ce"][1], "bytes": s["bpb"][1],
             # lm-eval's hashes of the document, the rendered prompt and the response: compare checks them
             "doc_hash": s.get("doc_hash"), "prompt_hash": s.get("prompt_hash"), "target_hash": s.get("target_hash")}
            for s in samples
        ]
    return out


DTYPES = ("float32", "bfloat16", "float16", "auto")


def check_score_options(*, batch_size: int, device: str, dtype: str, limit: int | None) -> None:
    """Scoring options, checked before any model loads, each error naming its option."""
    import torch

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1 request per forward pass.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give at least 1 document per dataset, or leave it out to score them all.")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}.")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r} is not one of: auto, cpu, cuda, cuda:N, mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}). Use --device cpu or auto.")


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


def score_spec(spec: ModelSpec, options: ScoreOptions) -> dict:
    """One model: lm-eval's numbers, provenance and per-document values, as one dict."""
    start = time.perf_counter()
    results = score(spec, options)
    revision = {"base": model_revision(spec.pretrained)}
    if spec.peft:
        revision["adapter"] = model_revision(spec.peft)
    table = summarize(results)
    from dpo_align.data.suite_docs import SKIPPED_EMPTY

    for key, row in table.items():  # documents left out for an empty response, per dataset
        if key in SKIPPED_EMPTY:
            row["skipped_empty_responses"] = SKIPPED_EMPTY[key]
    from dpo_align.data.hub import COMMITS
    merged = {key: row["boundary_merge"][0] for key, row in table.items() if row.get("boundary_merge", [0])[0]}
    if merged:
        import warnings

        warnings.warn(f"{spec.label}: this tokenizer merges the template's last characters with the response's first ones in "
                      + ", ".join(f"{k} ({100 * v:.0f}% of documents)" for k, v in merged.items())
                      + ": those characters are not scored (see lm_eval_tasks/README.md, boundary_merge).", stacklevel=2)
    return {
        "label": spec.label, "pretrained": spec.pretrained, "peft": spec.peft, "revision": revision,
        "hub_datasets": dict(COMMITS),  # commit read of every set loaded from the hub (None: unknown)
        "seconds": round(time.perf_counter() - start, 2), "table": table,
        "versions": {task: results.get("versions", {}).get(task) for task in TASKS.values() if task in results.get("versions", {})},
        "documents": per_document(results),
    }
