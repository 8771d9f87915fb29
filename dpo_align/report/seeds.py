"""A recipe trained with several seeds: the scorecard's answers and pick over seeds, beside the noise between them.

One training per arm was the objectives study's main caveat: a lead between two recipes may be no larger than
the difference between two trainings of one recipe. Where a table holds runs whose labels differ only in their seed
(``SFT → DPO seed 42``, ``SFT → DPO seed 7``; a sweep's ``--grid seed=42,7``, or two such sweeps read by ``compare``),
each recipe is read over its seeds, by the rule fixed before the search's confirmation ran
(results/search/README.md):

* a recipe answers yes to Q1, Q2 or Q3 only where **every** seed does (n/a where any seed's answer is n/a);
* the scorecard's rule (``scorecard.RULE``) ranks the recipes on those answers, ties by the **mean** of the seeds'
  specific changes;
* where the pick and the runner-up tie on their answers, the pick's lead in the mean specific change counts only
  where it is larger than the larger of the two recipes' **between-seed differences** (the largest minus the
  smallest seed's specific change); otherwise the two are reported as not told apart by their seeds.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from functools import cached_property

from dpo_align.report.scorecard import Card, answer

SEED = re.compile(r"\bseed[ -]?\d+\b")  # "seed 42" (recipe labels), "seed-42" (a run's name)


@dataclass(frozen=True)
class Recipe:
    name: str  # the label without its seed: "SFT → DPO (confirm-1)"
    seeds: tuple[Card, ...]

    def _all(self, question: str) -> bool | None:
        answers = [getattr(card, question) for card in self.seeds]
        return None if any(a is None for a in answers) else all(answers)

    @property
    def q1(self) -> bool | None:
        return self._all("q1")

    @property
    def q2(self) -> bool | None:
        return self._all("q2")

    @property
    def q3(self) -> bool | None:
        return self._all("q3")

    @property
    def yes(self) -> int:
        return sum(bool(q) for q in (self.q1, self.q2, self.q3))

    @cached_property  # read three times a row: computed once
    def specifics(self) -> list[float] | None:
        values = [card.specific for card in self.seeds]
        return None if any(v is None or not math.isfinite(v) for v in values) else values

    @property
    def specific(self) -> float | None:
        """The mean of the seeds' specific changes."""
        return statistics.fmean(self.specifics) if self.specifics else None

    @property
    def spread(self) -> float | None:
        """The between-seed difference: the largest seed's specific change minus the smallest's."""
        return max(self.specifics) - min(self.specifics) if self.specifics else None


def recipes(table: list[Card]) -> list[Recipe]:
    """The recipes of ``table`` that hold two or more seeds, in the table's order; [] where none does."""
    groups: dict[str, list[Card]] = {}
    for card in table:
        if SEED.search(card.model):
            groups.setdefault(" ".join(SEED.sub(" ", card.model).split()), []).append(card)
    return [Recipe(name, tuple(cards)) for name, cards in groups.items() if len(cards) >= 2]


def ranked(found: list[Recipe]) -> list[Recipe]:
    """The scorecard rule's order over recipes: Q1 = yes first, then the most yes answers, then the lowest mean."""
    return sorted(found, key=lambda r: (not r.q1, -r.yes, r.specific if r.specific is not None else math.inf))


def verdict(found: list[Recipe]) -> tuple[Recipe | None, bool | None, str]:
    """(the pick, whether its place over the runner-up holds beyond the seeds' noise, the sentence that says so).
    The middle value is None where there is one recipe, or where the answers, not the specific change, decide."""
    if not found:
        return None, None, ""
    order = ranked(found)
    pick = order[0]
    n = min(len(r.seeds) for r in found)
    if pick.q1:
        answers = f"{pick.yes} of 3 yes answers, Q1 among them"
    else:  # the scorecard's fallback: no recipe's ce falls specifically on every seed
        answers = f"{pick.yes} of 3 yes answers and no Q1 (no recipe's ce falls specifically on every seed: the fallback pick)"
    mean = f", a mean specific change of {pick.specific:+.4f}" if pick.specific is not None else ""
    head = (f"Over seeds (a recipe answers yes only where all {n} of its seeds do; ranked by the scorecard's rule, ties by "
            f"the mean of its seeds' specific changes): **{pick.name}** comes first, with {answers}{mean}.")
    if len(order) == 1:
        return pick, None, head
    runner = order[1]
    if (bool(pick.q1), pick.yes) != (bool(runner.q1), runner.yes):  # n/a counts as no, as in the rule
        return pick, None, head + f" It leads {runner.name} on its answers ({pick.yes} yes against {runner.yes})."
    if pick.specific is None or runner.specific is None or pick.spread is None or runner.spread is None:
        return pick, False, head + f" Tied on answers with {runner.name}, and a specific change is missing: the two are not told apart."
    lead, noise = runner.specific - pick.specific, max(pick.spread, runner.spread)
    if lead > noise:
        return pick, True, head + (f" Tied on answers with {runner.name}, it leads by {lead:.4f} in the mean specific change, more "
                                   f"than the larger between-seed difference ({noise:.4f}): **the lead holds over {n} seeds**.")
    return pick, False, head + (f" Tied on answers with {runner.name}, its lead in the mean specific change ({lead:.4f}) is no larger "
                                f"than the larger between-seed difference ({noise:.4f}): **the two are not told apart by {n} seeds**.")


HEADER = ["recipe", "seeds", "Q1 (every seed)", "Q2 (every seed)", "Q3 (every seed)", "yes", "mean specific change",
          "between-seed difference", "each seed's specific change"]
TITLE = "Over seeds: each recipe's answers and the noise between its trainings"


def cells(recipe: Recipe, *, yes: str = "yes") -> list[str]:
    """One recipe's row (``yes`` is how a yes is written: bold in Markdown)."""
    r = recipe
    each = ", ".join(f"{SEED.search(c.model).group(0)}: " + ("n/a" if c.specific is None else f"{c.specific:+.4f}") for c in r.seeds)
    return [r.name, str(len(r.seeds)), answer(r.q1, yes), answer(r.q2, yes), answer(r.q3, yes), str(r.yes),
            "n/a" if r.specific is None else f"{r.specific:+.4f}", "n/a" if r.spread is None else f"{r.spread:.4f}", each]


def markdown(table: list[Card]) -> list[str]:
    """The section: one row per recipe over its seeds, then the verdict; [] where no recipe holds two seeds."""
    found = recipes(table)
    if not found:
        return []
    lines = [f"## {TITLE}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r, yes="**yes**")) + " |" for r in found]
    return [*lines, "", verdict(found)[2], ""]


def as_json(table: list[Card]) -> dict | None:
    """The recipes over seeds and the verdict, for compare.json and a sweep's scorecard.json; None where none."""
    found = recipes(table)
    if not found:
        return None
    pick, holds, sentence = verdict(found)
    return {"recipes": [{"recipe": r.name, "seeds": [c.model for c in r.seeds], "q1": r.q1, "q2": r.q2, "q3": r.q3, "yes": r.yes,
                         "specific": r.specific, "between_seed_difference": r.spread} for r in found],
            "pick": pick.name, "lead_holds": holds, "reason": sentence}
