"""Training curves as PNG: one figure per DPO statistic, train and held-out, against step."""

from __future__ import annotations

import json
from pathlib import Path

# (file name, TRL log key, axis label)
STATISTICS = [
    ("loss", "loss", "DPO loss"),
    ("rewards_chosen", "rewards/chosen", "reward of chosen (β·log-ratio)"),
    ("rewards_rejected", "rewards/rejected", "reward of rejected (β·log-ratio)"),
    ("reward_margin", "rewards/margins", "reward margin (chosen − rejected)"),
    ("reward_accuracy", "rewards/accuracies", "reward accuracy (chosen > rejected)"),
]


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: dict[str, list[dict]], output_dir: Path) -> list[Path]:
    """One PNG per statistic with every run overlaid (train solid, held-out dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, label in STATISTICS:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        drawn = False
        for i, (run, rows) in enumerate(runs.items()):
            color = f"C{i}"
            for prefix, style, suffix in (("", "-", "train"), ("eval_", "--", "held-out")):
                steps, values = series(rows, prefix + key)
                if steps:
                    ax.plot(steps, values, style, color=color, marker="o" if prefix else None, markersize=3,
                            label=f"{run} {suffix}" if len(runs) > 1 else suffix)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards), for atomic writes and inlining."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
