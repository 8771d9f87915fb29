"""Result tables of scored models: Markdown (the reference's shape), CSV and a bar chart PNG.

``runs`` are the models of ``results.json``: each a label and a table of dataset -> metric
-> [value, stderr]; the first is the baseline of the Δ columns.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dpo_align.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, slug, staged_files, write_jsonl
from dpo_align.core.plots import png_bytes
from dpo_align.data.suite import CONTRAST, DATASETS, MEAN, PPL, display_name, truncation_notes


def delta(metric: str, value: float, base: float) -> str:
    """A change against the baseline: in points for a share (acc, acc_norm), else relative."""
    if metric.startswith("acc"):
        return f"{100 * (value - base):+.1f} pts"
    return f"{100 * (value - base) / base:+.2f}%" if base else "n/a"


def markdown_table(runs: list[dict], metric: str = "ce") -> str:
    labels = [r["label"] for r in runs]
    header = ["dataset", *labels] + [f"Δ {lab} vs {labels[0]}" for lab in labels[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in [*DATASETS, MEAN]:
        cells = [r["table"].get(key, {}).get(metric) for r in runs]
        if all(c is None for c in cells):
            continue
        name = display_name(key)
        row = [name] + [(f"{c[0]:.3f} ± {c[1]:.3f}" if c[1] is not None else f"{c[0]:.3f} ± n/a") if c else "" for c in cells]
        base = cells[0]
        row += [delta(metric, c[0], base[0]) if (c and base) else "" for c in cells[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(runs: list[dict], changes: dict, failed: dict[str, str], replicates: int) -> str:
    """A sweep's table.md: ce ± stderr, each adapter's paired change against the baseline, the same in bpb, failed runs."""
    from dpo_align.report import compare, paired

    table = ["## Cross-entropy (nats per response token, lower is better; ± is the standard error)", "", markdown_table(runs, "ce")]
    table += controls_tables(runs)
    if changes:
        table += compare.control_section(changes)
        table += [f"## Change against the baseline, ce alone: paired over documents ({replicates:,} bootstrap replicates and "
                  "permutations)", "", paired.markdown(changes["ce"], metric="ce", names=display_name, verdict="verdict (ce alone)")]
    table += ["## Bits per byte (lower is better)", "", markdown_table(runs, "bpb")]
    if changes:
        table += [paired.markdown(changes["bpb"], metric="bpb", names=display_name, verdict="verdict (ce alone)")]
    table += truncation_section(runs)
    if failed:
        table += ["## Failed runs (not scored)", ""] + [f"* {name}: {reason}" for name, reason in failed.items()] + [""]
    return "\n".join(table)


def controls_tables(runs: list[dict]) -> list[str]:
    """The controls' levels where they were scored: the foils' cross-entropy and the share of documents whose
    reference beats every foil (acc, and per byte acc_norm)."""
    if not any("ce_foil" in row for run in runs for row in run["table"].values()):
        return []
    return ["## The controls: the foils' cross-entropy (nats per foil token; ± standard error)", "", markdown_table(runs, "ce_foil"),
            "## acc: the reference has the lowest summed NLL of its document's responses (higher is better)", "", markdown_table(runs, "acc"),
            "## acc_norm: the same per UTF-8 byte", "", markdown_table(runs, "acc_norm")]


def truncation_section(runs: list[dict]) -> list[str]:
    notes = truncation_notes(runs)
    return ["## Truncated prompts", "", *(f"* {note}" for note in notes), ""] if notes else []


def csv_table(runs: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "dataset", "metric", "value", "stderr", "documents"])
    for run in runs:
        for key, row in run["table"].items():
            for metric in [*PPL.metrics, *(m for m in CONTRAST.metrics if m not in PPL.metrics and m in row)]:
                value, stderr = row[metric]
                writer.writerow([run["label"], key, metric, f"{value:.6f}", "" if stderr is None else f"{stderr:.6f}", row.get("n", "")])
    return buffer.getvalue()


def bar_chart_png(runs: list[dict], metric: str = "ce") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in [*DATASETS, MEAN] if any(k in r["table"] for r in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 4))
    for i, run in enumerate(runs):
        values = [run["table"].get(k, {}).get(metric, [np.nan, 0])[0] for k in keys]
        errors = [run["table"].get(k, {}).get(metric, [np.nan, 0])[1] or 0.0 for k in keys]  # no stderr (one document): no bar
        ax.bar(np.arange(len(keys)) + i * width, values, width, yerr=errors, capsize=3, label=run["label"])
    ax.set_xticks(np.arange(len(keys)) + width * (len(runs) - 1) / 2)
    ax.set_xticklabels([DATASETS[k].name if k in DATASETS else "mean" for k in keys])
    ax.set_ylabel(f"{metric} (nats per response token, lower is better)" if metric == "ce" else metric)
    ax.set_title("Templated response-only cross-entropy (± 1 stderr)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def write_outputs(output: Path, runs: list[dict], settings: dict) -> None:
    """results.json, the tables and per-document samples, staged and moved into ``output``
    together (results.json last): a write error leaves none of them behind."""
    # what was scored, not what was asked: a --limit above a dataset's size scores all of it
    scored = {task: len(rows) for task, rows in (runs[0].get("documents") or {}).items()} if runs else {}
    settings = {**settings, "documents_scored": scored}
    with staged_files(output, last="results.json") as staging:
        for run in runs:
            for task, rows in run.pop("documents", {}).items():
                write_jsonl(staging / "samples" / slug(run["label"]) / f"{task}.jsonl", rows)
        atomic_write_json(staging / "results.json", {"settings": settings, "models": runs})
        atomic_write_text(staging / "table.md", "\n".join([markdown_table(runs), *controls_tables(runs), *truncation_section(runs)]))
        atomic_write_text(staging / "table.csv", csv_table(runs))
        atomic_write_bytes(staging / "table.png", bar_chart_png(runs))
