"""``dpo-align sweep``: the whole reference experiment in one command.

For each learning rate: train one adapter (``RUNS/lr-<lr>``), then score the base model
and every adapter with the suite, and write to ``OUTPUT``: the reference-style table
(``table.md``, ``table.csv``, ``results.json``), per-document samples, one PNG per DPO
statistic with the curves of all runs overlaid (``curves/``), and each run's manifest
(``manifests/``).

Interrupted sweeps resume: a finished run (its ``manifest.json`` exists) is not trained
again, a started one continues from its latest checkpoint, and a model already scored
(``OUTPUT/scores/<label>.json``) is not scored again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from dpo_align.errors import UserError
from dpo_align.evaluate import ModelSpec, ScoreOptions, _slug, quiet_lm_eval, score_spec, write_outputs
from dpo_align.files import atomic_write_json
from dpo_align.models import resolve_model
from dpo_align.plots import plot_runs, read_metrics
from dpo_align.train import train
from dpo_align.train_config import TrainConfig


def parse_lrs(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--lr {text!r}: expected comma-separated numbers such as 5e-6,1e-5,1e-4.") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--lr {text!r}: give at least one positive learning rate.")
    if len(set(values)) != len(values):
        raise UserError(f"--lr {text!r}: a learning rate is listed twice.")
    return values


def run_name(lr: float) -> str:
    return f"lr-{lr:g}"


def sweep(
    base: TrainConfig,
    lrs: list[float],
    *,
    runs_dir: Path,
    output: Path,
    eval_limit: int | None,
    data_dir: str | None,
    pku_path: str | None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    progress=print,
) -> list[dict]:
    quiet_lm_eval()
    runs_dir.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)

    # 1. train, one adapter per learning rate (finished runs are kept, started ones resumed)
    adapters = {}
    for i, lr in enumerate(lrs, start=1):
        run_dir = runs_dir / run_name(lr)
        config = dataclasses.replace(base, learning_rate=lr, output_dir=str(run_dir))
        if (run_dir / "manifest.json").is_file():
            progress(f"[train {i}/{len(lrs)}] {run_name(lr)}: already finished, kept.")
        else:
            resume = (run_dir / "config.yaml").is_file()
            progress(f"[train {i}/{len(lrs)}] {run_name(lr)}" + (": resuming" if resume else ""))
            train(config, resume=resume, overwrite=not resume and run_dir.exists(), progress=progress)
        adapters[run_name(lr)] = run_dir

    # 2. score the base model and every adapter (each model's result cached on disk)
    base_path = resolve_model(base.model, progress=progress)
    specs = [ModelSpec(f"baseline ({base.model})", base_path)]
    specs += [ModelSpec(f"DPO {name}", base_path, str(path)) for name, path in adapters.items()]
    options = ScoreOptions(limit=eval_limit, data_dir=data_dir, pku_path=pku_path, template=base.template, batch_size=batch_size,
                           device=device, dtype=dtype, trust_remote_code=base.trust_remote_code, allow_pickle=base.allow_pickle)
    scores_dir = output / "scores"
    runs = []
    for i, spec in enumerate(specs, start=1):
        cached = scores_dir / f"{_slug(spec.label)}.json"
        if cached.is_file():
            progress(f"[score {i}/{len(specs)}] {spec.label}: already scored, kept.")
            runs.append(json.loads(cached.read_text()))
            continue
        progress(f"[score {i}/{len(specs)}] {spec.label}")
        result = score_spec(spec, options)
        atomic_write_json(cached, result)
        runs.append(result)

    # 3. tables, curves, manifests
    settings = {"command": "dpo-align sweep", "learning_rates": lrs, "train": dataclasses.asdict(base), **options.settings()}
    write_outputs(output, [dict(r) for r in runs], settings)
    plot_runs({name: read_metrics(path / "metrics.jsonl") for name, path in adapters.items()}, output / "curves")
    manifests = output / "manifests"
    manifests.mkdir(exist_ok=True)
    for name, path in adapters.items():
        shutil.copyfile(path / "manifest.json", manifests / f"{name}.json")
    return runs
