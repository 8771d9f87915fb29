"""``dpo-align eval``: score every model with the suite, then write the output folder.

The scoring is ``score.evaluate``'s (lm-eval, one model after another); the folder is
``report.tables.write_outputs``': ``results.json`` (per model, the metrics with stderrs,
model provenance, settings), ``samples/<label>/<task>.jsonl`` (per-document NLL, token and
byte counts), ``table.md`` / ``table.csv`` (the reference's shape) and ``table.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.models import check_weights_safe
from dpo_align.core.provenance import template_warning
from dpo_align.report.tables import write_outputs
from dpo_align.score.evaluate import ScoreOptions, model_specs, quiet_lm_eval, score_spec, suite_tasks


def run_eval(
    models: list[str],
    *,
    adapters: list[str],
    output: Path,
    datasets: list[str] | None = None,
    progress=print,
    **options,
) -> list[dict]:
    """Score every model (``options`` are ScoreOptions fields) and write the output folder.

    Under ``accelerate launch`` every process scores its share of each model's requests and the first one
    writes the folder; the others return an empty list."""
    quiet_lm_eval()
    specs = model_specs(models, adapters, progress)
    options = ScoreOptions(**options)
    if datasets:
        options = dataclasses.replace(options, tasks=suite_tasks(datasets, controls=options.controls))
    for spec in specs:  # every model's weights checked before the first is scored
        for path in (spec.pretrained, spec.peft):
            if path:
                check_weights_safe(path, options.allow_pickle)
        if spec.peft and (warning := template_warning(spec.peft, options.template)):
            progress(warning)
    runs = []
    for i, spec in enumerate(specs, start=1):
        progress(f"[{i}/{len(specs)}] scoring {spec.label}: {spec.pretrained}" + (f" + adapter {spec.peft}" if spec.peft else ""))
        runs.append(score_spec(spec, options))
    if any(run is None for run in runs):  # not the first process under `accelerate launch`: it writes nothing
        return []
    short = {task: len(docs) for task, docs in runs[0]["documents"].items() if options.limit and len(docs) < options.limit}
    if short:
        progress(f"Note: --limit {options.limit} is above the size of " + ", ".join(f"{t} ({n} documents)" for t, n in short.items())
                 + ": all of them were scored, and results.json records documents_scored as such.")
    try:
        write_outputs(output, runs, {"command": "dpo-align eval", **options.settings()})
    except OSError as err:
        raise UserError(f"--output {output}: cannot write the results there ({err.strerror}). "
                        "Choose a writable folder with free space; nothing was left half-written.") from None
    return runs
