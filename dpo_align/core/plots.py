"""Training curves as PNG: one figure per DPO statistic, train and held-out, against step.

The train series is drawn smoothed (TensorBoard's debiased exponential moving average, weight
0.6) with the raw values faint behind it: at batch 4 the raw DPO loss swings by ±0.07 around
0.69, and the trend would be invisible. Held-out evaluations are few and drawn as they are."""

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
    ("logps_chosen", "logps/chosen", "log-prob of chosen (summed over its tokens)"),
    ("logps_rejected", "logps/rejected", "log-prob of rejected (summed over its tokens)"),
]
SMOOTHING = 0.6  # TensorBoard's default


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average: the first points are not pulled towards 0."""
    out, last, debias = [], 0.0, 1.0
    for value in values:
        last = weight * last + (1 - weight) * value
        debias *= weight
        out.append(last / (1 - debias))
    return out


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


def reference_series(rows: list[dict], side: str, beta: float) -> tuple[list[int], list[float]]:
    """The reference model's log-prob of ``side`` ("chosen"/"rejected") at each logged step, from what TRL logs:
    the policy's log-prob minus the reward over beta (reward = beta * (policy - reference))."""
    points = [(r["step"], r[f"logps/{side}"] - r[f"rewards/{side}"] / beta) for r in rows if f"logps/{side}" in r and f"rewards/{side}" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: dict[str, list[dict]], output_dir: Path, betas: dict[str, float] | None = None) -> list[Path]:
    """One PNG per statistic with every run overlaid (train solid, held-out dashed); with each run's ``betas``,
    the log-prob figures draw the reference's log-prob too (dotted), so a fall of the chosen one shows."""
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
                if not steps:
                    continue
                shown = f"{run} {suffix}" if len(runs) > 1 else suffix
                if prefix:  # held-out: every evaluation, as it is
                    ax.plot(steps, values, style, color=color, marker="o", markersize=3, label=shown)
                else:  # train: the raw values faint, the smoothed trend on top
                    ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(steps, smoothed(values), style, color=color, label=f"{shown} (smoothed {SMOOTHING})")
                    if key.startswith("logps/") and betas and run in betas:
                        ref_steps, ref_values = reference_series(rows, key.removeprefix("logps/"), betas[run])
                        ax.plot(ref_steps, smoothed(ref_values), ":", color=color, label=f"{shown}: the reference's")
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
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)  # nothing cut: long labels widen the image
    plt.close(fig)
    return buffer.getvalue()
