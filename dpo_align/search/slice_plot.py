"""``slice.png``: every trial's specific change against each searched setting, one panel per setting.

Optuna's own slice plot draws the objective value alone, names a recipe by its raw choice
(``loss_type=sigmoid;sft_first_pairs=1000``) and greys out the trials that miss a constraint without
saying so. This one draws what the study's verdict rests on: each finished trial's specific change
with its 95% interval, coloured by recipe (its objective's name, as the sweep tables call it), a
black ring where the trial meets Q2 and Q3, and each pruned trial hollow at its last checkpoint's
value. Beta is left out for the recipes that do not read it (SFT)."""

from __future__ import annotations

import math

IGNORES_BETA = ("SFT",)  # objectives whose loss has no beta: a beta axis would place them by a number they never used


def points(table: list[dict]) -> list[dict]:
    """The trials a slice can place: finished ones (value, interval, Q2 and Q3) and pruned ones (last reported value)."""
    out = []
    for row in table:
        if row["state"] == "complete" and row["specific_change"] is not None:
            value, interval = row["specific_change"], row.get("specific_interval") or [None, None]
        elif row["state"] == "pruned" and row.get("intermediate"):
            value, interval = list(row["intermediate"].values())[-1], [None, None]
        else:
            continue
        if value is None or not math.isfinite(value):
            continue
        out.append({"trial": row["trial"], "settings": row["settings"], "recipe": row["recipe"], "value": value,
                    "low": interval[0], "high": interval[1], "pruned": row["state"] == "pruned",
                    "meets": bool(row.get("q2")) and bool(row.get("q3"))})
    return out


def figure(table: list[dict], searched: dict):
    """The slice figure (matplotlib), one panel per searched setting: ``searched`` maps each to its Optuna
    distribution (``recipe`` for a choice of several settings at once); a range is drawn whole, on a log axis where it
    is sampled on one. None when no trial has a value yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    placed = points(table)
    settings = list(searched)
    if not placed or not settings:
        return None
    recipes = sorted({p["recipe"] for p in placed})
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(recipes)}
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings) + 2.2, 4.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], settings, strict=True):
        by_recipe = name in ("recipe", "loss_type")  # a choice of objectives: one column per recipe, by its name
        for p in placed:
            x = recipes.index(p["recipe"]) if by_recipe else p["settings"].get(name)
            if x is None or (name == "beta" and p["recipe"] in IGNORES_BETA):
                continue
            x = x if by_recipe or isinstance(x, (int, float)) else str(x)
            if p["low"] is not None and p["high"] is not None:
                ax.errorbar([x], [p["value"]], yerr=[[p["value"] - p["low"]], [p["high"] - p["value"]]], color=colour[p["recipe"]],
                            alpha=0.5, capsize=2, linewidth=1, zorder=1)
            ax.scatter([x], [p["value"]], s=46, zorder=3, facecolors="none" if p["pruned"] else colour[p["recipe"]],
                       edgecolors="black" if p["meets"] else colour[p["recipe"]], linewidths=2 if p["meets"] else 1.2)
        if by_recipe:
            ax.set_xticks(range(len(recipes)), recipes, rotation=30, ha="right")
            ax.set_xlim(-0.6, len(recipes) - 0.4)
        elif hasattr(searched[name], "low"):
            low, high = searched[name].low, searched[name].high
            if getattr(searched[name], "log", False):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-5, 3x10^-5...: labels that overlap
                ax.set_xlim(low / 1.3, high * 1.3)
            else:
                ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.axhline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(name.replace("_", " ") + (" (SFT left out: no beta)" if name == "beta" else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("specific change Δlog ce − Δlog ce_foil\n(below 0: the reference got cheaper than its foils)")
    legend = [Line2D([], [], marker="o", linestyle="", color=colour[name], label=name) for name in recipes]
    legend += [Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="grey", label="pruned (last checkpoint)"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="black", markeredgewidth=2,
                      label="meets Q2 and Q3")]
    fig.legend(handles=legend, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Every trial's specific change with its 95% interval, by setting")
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_size_inches()[0], 1))
    return fig
