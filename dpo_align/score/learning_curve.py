"""Learning curve: the suite's ce on a fixed document subset at every saved checkpoint of one run.

The subset is drawn once, with a fixed seed, from each dataset's documents (the same
documents at every step, so the points are paired), and step 0 is the base model. The
plot shows each dataset's change against step 0, in percent, so that three datasets with
different levels share one axis, and whether the trend is still moving at the end.
"""

from __future__ import annotations

import random
from pathlib import Path

from dpo_align.core.plots import png_bytes
from dpo_align.data.suite import DATASETS, MEAN, display_name


def subset(document_counts: dict[str, int], per_dataset: int, seed: int = 0) -> dict[str, list[int]]:
    """{task: sorted doc indices}: ``per_dataset`` documents drawn without replacement (all when fewer)."""
    rng = random.Random(seed)
    return {task: sorted(rng.sample(range(n), min(per_dataset, n))) for task, n in sorted(document_counts.items())}


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint holding an adapter, in step order."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "adapter_model.safetensors").is_file():
            found.append((int(step), path))
    return sorted(found)


def plot(points: list[dict], total_steps: int, title: str) -> bytes:
    """PNG of each dataset's ce change against step 0 (percent, with ±1 stderr of the point) over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["step"])
    base = points[0]["table"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [100 * p["step"] / total_steps for p in points]
    for i, key in enumerate([*DATASETS, MEAN]):
        if key not in base:
            continue
        b = base[key]["ce"][0]
        y = [100 * (p["table"][key]["ce"][0] - b) / b for p in points]
        style = {"linewidth": 2.5, "color": "black"} if key == "mean" else {"color": f"C{i}"}
        ax.plot(x, y, marker="o", markersize=4, label=display_name(key), **style)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training done (% of the epoch)")
    ax.set_ylabel("ce change against the base model (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def markdown(points: list[dict], total_steps: int) -> str:
    points = sorted(points, key=lambda p: p["step"])
    keys = [k for k in [*DATASETS, MEAN] if k in points[0]["table"]]
    lines = ["| step | % of epoch | " + " | ".join((DATASETS[k].name if k in DATASETS else "mean") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for p in points:
        cells = [f"{p['table'][k]['ce'][0]:.4f}" for k in keys]
        lines.append(f"| {p['step']} | {100 * p['step'] / total_steps:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
