"""Did each adapter do the job? Three questions per adapter, and the pick they make.

A fall in ce alone is not the answer to "which objective should I run" (the seed reproduction's
lr 1e-4 fell 4.86%, all of it a format shift), so each adapter is asked three questions, each
with a yes or a no that can be checked in the tables it comes from:

* **Q1 ce falls specifically**: the mean row's controlled verdict against the baseline is
  ``better`` (``controls.py``: ce falls and the reference got cheaper than its foils did);
* **Q2 held-out preference rises**: the implicit-reward accuracy on the held-out pairs exceeds
  50% by more than 2 standard errors (``score/preference.py``);
* **Q3 the chosen likelihood holds**: the mean per-token change of the chosen responses'
  log-prob against the base model is >= 0 (no likelihood displacement of the chosen side).

The rule that turns the table into a pick, fixed before the objectives study was scored
(results/objectives/README.md quotes it): the adapter with Q1 = yes and the most yes answers,
ties by the mean's specific change (most negative wins). If no adapter has Q1 = yes, that is
said (none beats the baseline specifically), and the fallback pick is the adapter with the most
yes answers on Q2 + Q3, ties the same way. An unanswerable question (no controls scored, no
preference data) counts as no, and the table says n/a.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

RULE = ("Q1 ce falls specifically: the mean row's controlled verdict against the baseline is **better**. Q2 held-out preference "
        "rises: implicit-reward accuracy on the held-out pairs exceeds 50% by more than 2 stderr. Q3 the chosen likelihood holds: "
        "the mean per-token change of the chosen log-prob against the base model is >= 0. The pick: the adapter with Q1 = yes and "
        "the most yes answers, ties by the mean's specific change (most negative wins); if no adapter has Q1 = yes, none beats "
        "the baseline specifically, and the fallback pick is the one with the most yes answers on Q2 + Q3, ties the same way. "
        "n/a counts as no.")


@dataclass(frozen=True)
class Card:
    model: str
    verdict: str | None = None  # the mean row's controlled verdict against the baseline; None without controls
    specific: float | None = None  # the mean's specific change, Δlog ce − Δlog ce_foil
    specific_low: float | None = None  # its 95% paired bootstrap interval (for the plot; the verdict carries the test)
    specific_high: float | None = None
    accuracy: float | None = None  # implicit-reward accuracy on the held-out pairs
    stderr: float | None = None
    chosen_per_token: float | None = None  # mean Δ log p per token of the chosen responses, against the base model

    @property
    def q1(self) -> bool | None:
        return None if self.verdict is None else self.verdict == "better"

    @property
    def q2(self) -> bool | None:
        return None if self.accuracy is None or self.stderr is None else self.accuracy - 0.5 > 2 * self.stderr

    @property
    def q3(self) -> bool | None:
        return None if self.chosen_per_token is None else self.chosen_per_token >= 0

    @property
    def yes(self) -> int:
        return sum(bool(q) for q in (self.q1, self.q2, self.q3))


def cards(changes: dict, preference: dict[str, dict], labels: list[str]) -> list[Card]:
    """One Card per adapter in ``labels`` (compared against the baseline in ``changes``), from the mean row of
    ``changes["controls"]`` and each adapter's row of a preference table ({label: {"reward", "displacement"}})."""
    out = []
    for label in labels:
        rows = changes.get("controls", {}).get(label) or []
        mean = next((c for c in rows if c.dataset == "mean"), rows[0] if len(rows) == 1 else None)
        row = preference.get(label) or {}
        reward, moved = row.get("reward") or {}, row.get("displacement") or {}
        out.append(Card(label, verdict=mean.verdict if mean else None, specific=mean.specific if mean else None,
                        specific_low=mean.specific_low if mean else None, specific_high=mean.specific_high if mean else None,
                        accuracy=_number(reward.get("accuracy")), stderr=_number(reward.get("stderr")),
                        chosen_per_token=_number(moved.get("chosen_per_token"))))
    return out


def _number(value) -> float | None:
    """A finite number from a preference table, else None (the answer shows n/a, not a crash or a made-up yes)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def ranked(table: list[Card]) -> list[Card]:
    """The cards in the rule's order: Q1 = yes first, then the most yes answers, then the most negative specific change
    (the pick is the first; a search confirms the first few)."""
    def order(card: Card):
        return (not card.q1, -card.yes, card.specific if card.specific is not None and math.isfinite(card.specific) else math.inf)

    return sorted(table, key=order)


def recommend(table: list[Card]) -> tuple[Card | None, str]:
    """The rule's pick and the sentence that says how it was made."""
    if not table:
        return None, "No adapter was compared, so there is nothing to recommend."
    pick = ranked(table)[0]
    specific = [c for c in table if c.q1]
    if specific:
        ties = [c.model for c in specific if c is not pick and c.yes == pick.yes]
        return pick, (f"**Recommended: {pick.model}**: its ce falls specifically (Q1 = yes), with {pick.yes} of 3 yes answers"
                      + (f"; tied on answers with {', '.join(ties)}, it has the most negative specific change "
                         f"({pick.specific:+.4f})." if ties else "."))
    answers = pick.yes
    return pick, ("**No adapter's ce falls specifically against the baseline** (Q1 = no or n/a for every one): none is better "
                  f"than the baseline by this measure. The fallback pick, most yes answers on Q2 + Q3 ({answers}) and then the most "
                  f"negative specific change, is **{pick.model}**.")


def as_json(table: list[Card], *, baseline_is_reference: bool) -> dict:
    """The answers and the pick (only where the baseline is the base model), as compare.json and a sweep's scorecard.json hold them."""
    from dpo_align.report import seeds

    pick, reason = recommend(table) if baseline_is_reference else (None, None)
    return {"rule": RULE, "pick": pick.model if pick else None, "reason": reason,
            "cards": [{**asdict(c), "q1": c.q1, "q2": c.q2, "q3": c.q3, "yes": c.yes} for c in table],
            "over_seeds": seeds.as_json(table) if baseline_is_reference else None}


def from_json(row: dict) -> Card:
    """A Card back from one of ``as_json``'s "cards" (scorecard.json, compare.json): the answers are recomputed from
    its numbers, and a value that is not a finite number (or a verdict that is not a word) reads as missing (n/a)."""
    verdict = row.get("verdict")
    return Card(str(row.get("model", "?")), verdict=verdict if isinstance(verdict, str) else None,
                **{f.name: _number(row.get(f.name)) for f in fields(Card) if f.name not in ("model", "verdict")})


HEADER = ["model", "Q1 ce falls specifically (mean verdict, specific change)",
          "Q2 held-out preference rises (implicit-reward accuracy ± stderr)",
          "Q3 chosen likelihood holds (Δ log p per token, chosen)", "yes"]


def answer(value: bool | None, yes: str = "yes") -> str:
    """One question's answer as every table writes it: yes, no, or n/a where its numbers are missing."""
    return "n/a" if value is None else (yes if value else "no")


def cells(card: Card, *, yes: str = "yes") -> list[str]:
    """One adapter's row: each answer with the number it comes from (``yes`` is how a yes is written: bold in Markdown)."""
    def with_detail(value: bool | None, detail: str) -> str:
        return answer(value, yes) + ("" if value is None else f": {detail}")

    c = card
    return [c.model, with_detail(c.q1, f"{c.verdict}" + (f" ({c.specific:+.4f})" if c.specific is not None else "")),
            with_detail(c.q2, f"{100 * c.accuracy:.1f}% ± {100 * c.stderr:.1f}" if c.q2 is not None else ""),
            with_detail(c.q3, f"{c.chosen_per_token:+.4f}" if c.q3 is not None else ""), str(c.yes)]


def markdown(table: list[Card], *, baseline: str, baseline_is_reference: bool) -> list[str]:
    """The scorecard section: the three answers per adapter, the rule, and the pick (only against the base model:
    the rule reads Q1 against the model the adapters started from); then, where runs differ only in their seed, each
    recipe over its seeds (``seeds.py``)."""
    if not table:
        return []
    lines = ["## Scorecard: did each adapter do the job?", "",
             f"Q1 against {baseline}; Q2 and Q3 on the held-out pairs, against the base model (preference.json).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(c, yes="**yes**")) + " |" for c in table]
    lines += ["", "The rule: " + RULE, ""]
    if baseline_is_reference:
        from dpo_align.report import seeds

        lines += [recommend(table)[1], "", *seeds.markdown(table)]  # a recipe trained with several seeds, read over them
    else:
        lines += [f"No pick here: the rule reads Q1 against the base model, and {baseline} is not the base model of the "
                  "preference table (compare with the base model first, as a sweep's folder has it, for the pick).", ""]
    return lines


def plot(table: list[Card]) -> bytes:
    """PNG: the three questions side by side, one row per adapter, each number against the line its answer turns on
    (green where the answer is yes): the specific change with its 95% interval against 0, the reward accuracy
    ± 2 stderr against 50%, the chosen Δ log p per token against 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpo_align.core.plots import png_bytes

    fig, axes = plt.subplots(1, 3, figsize=(11, 1.2 + 0.45 * len(table)), sharey=True)
    ys = list(range(len(table)))[::-1]
    panels = [("Q1 specific change of the mean ce\n(Δlog ce − Δlog ce_foil, 95%; < 0: better)", 0.0,
               lambda c: (c.specific, c.specific_low, c.specific_high), lambda c: c.q1),
              ("Q2 implicit-reward accuracy (%)\n(± 2 stderr; yes above 50% + 2 stderr)", 50.0,
               lambda c: (None, None, None) if c.accuracy is None or c.stderr is None else
               (100 * c.accuracy, 100 * (c.accuracy - 2 * c.stderr), 100 * (c.accuracy + 2 * c.stderr)), lambda c: c.q2),
              ("Q3 chosen Δ log p per token\n(against the base; yes at >= 0)", 0.0,
               lambda c: (c.chosen_per_token, None, None), lambda c: c.q3)]
    for ax, (title, line, value, answer) in zip(axes, panels, strict=True):
        for y, card in zip(ys, table, strict=True):
            x, low, high = value(card)
            if x is None:
                ax.text(line, y, "n/a", ha="center", va="center", fontsize=8, color="tab:gray")
                continue
            # an interval of one document can put the point a rounding error outside it: matplotlib refuses negative errors
            err = None if low is None or high is None else [[max(0.0, x - low)], [max(0.0, high - x)]]
            ax.errorbar(x, y, xerr=err, fmt="o", capsize=3, color="tab:green" if answer(card) else "tab:red")
        ax.axvline(line, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [c.model for c in table], fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
