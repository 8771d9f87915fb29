"""Paired bootstrap of a change in cross-entropy between two models scored on the same documents.

A dataset's ce is a ratio of sums, ``sum(nll) / sum(tokens)``, so a document's NLL and token
count are resampled together, and the same documents are drawn for both models (paired):
the document-to-document spread, which both models share, cancels out of the difference.
The suite's mean is the mean of the datasets' ce; each replicate resamples every dataset
independently and takes the mean of the three.

The interval is the percentile interval of the relative change ``(ce_B - ce_A) / ce_A``.
Beside it, a paired permutation p-value (A and B swapped on random halves of the documents)
and its Holm adjustment across the datasets; the mean row is one test of its own.
Verdict: "better" when the whole interval is below 0 (B has lower ce) and the adjusted p is
below 0.05, "worse" when the interval is above 0 and the adjusted p below 0.05, otherwise
"no detectable change".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dpo_align.core.errors import UserError

ALPHA = 0.05


@dataclass(frozen=True)
class Change:
    dataset: str
    base: float  # ce (or bpb) of A
    other: float  # of B
    relative: float  # (B - A) / A
    low: float  # 95% interval of `relative`
    high: float
    documents: int
    p: float | None = None  # paired permutation p-value (two-sided)
    p_holm: float | None = None  # Holm-adjusted across the datasets (the mean row: its own p)

    @property
    def verdict(self) -> str:
        """better / worse when the 95% interval excludes 0 and the adjusted p is below 0.05."""
        significant = self.p_holm is None or self.p_holm < ALPHA
        if self.high < 0 and significant:
            return "better"
        if self.low > 0 and significant:
            return "worse"
        return "no detectable change"


def align(a: list[dict], b: list[dict], *, name: str, value: str = "nll", weight: str = "tokens") -> np.ndarray:
    """[n, 4] array (value A, weight A, value B, weight B) over the documents both scored, by doc_id.

    Documents must be the same on both sides: a comparison over different documents is not paired.
    """
    ids_a, ids_b = [d["doc_id"] for d in a], [d["doc_id"] for d in b]
    if sorted(ids_a) != sorted(ids_b):
        raise UserError(f"{name}: the two models were scored on different documents ({len(ids_a)} against {len(ids_b)}, "
                        f"{len(set(ids_a) ^ set(ids_b))} not in both). Score both on the same documents to compare them.")
    by_id = {d["doc_id"]: d for d in b}
    return np.array([(d[value], d[weight], by_id[d["doc_id"]][value], by_id[d["doc_id"]][weight]) for d in a], dtype=np.float64)


def _ratios(rows: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ce of A and of B for each replicate (a row of document indices in `draws`)."""
    sums = rows[draws].sum(axis=1)  # [replicates, 4]
    return sums[:, 0] / sums[:, 1], sums[:, 2] / sums[:, 3]


def bootstrap(datasets: dict[str, np.ndarray], *, replicates: int = 10_000, seed: int = 0, chunk: int = 500) -> list[Change]:
    """One Change per dataset, then one for the mean of the datasets (when there are several)."""
    rng = np.random.default_rng(seed)
    names = list(datasets)
    rel = {name: [] for name in names}
    mean_a, mean_b = [], []
    for start in range(0, replicates, chunk):
        n_rep = min(chunk, replicates - start)
        ce_a, ce_b = [], []
        for name in names:
            rows = datasets[name]
            a, b = _ratios(rows, rng.integers(0, len(rows), size=(n_rep, len(rows))))
            rel[name].append((b - a) / a)
            ce_a.append(a)
            ce_b.append(b)
        mean_a.append(np.mean(ce_a, axis=0))
        mean_b.append(np.mean(ce_b, axis=0))

    def change(name, point_a, point_b, samples, n) -> Change:
        low, high = np.percentile(np.concatenate(samples), [2.5, 97.5])
        return Change(name, float(point_a), float(point_b), float((point_b - point_a) / point_a), float(low), float(high), n)

    out, points = [], {}
    for name in names:
        rows = datasets[name]
        points[name] = (rows[:, 0].sum() / rows[:, 1].sum(), rows[:, 2].sum() / rows[:, 3].sum())
        out.append(change(name, *points[name], rel[name], len(rows)))
    if len(names) > 1:
        a = np.mean([p[0] for p in points.values()])
        b = np.mean([p[1] for p in points.values()])
        samples = [(mb - ma) / ma for ma, mb in zip(mean_a, mean_b, strict=True)]
        out.append(change("mean", a, b, samples, sum(len(r) for r in datasets.values())))
    return out


def permutation_pvalues(datasets: dict[str, np.ndarray], *, permutations: int = 10_000, seed: int = 0, chunk: int = 500) -> dict[str, float]:
    """Two-sided paired permutation p-value of the relative ce change, per dataset and for the mean.

    Under "no difference" the two models' numbers of a document are exchangeable, so each
    permutation swaps A and B on a random half of the documents (NLL and token count move
    together) and recomputes the change. The statistic is |log(ce_B / ce_A)|, which a swap of
    every document turns into its negative (a relative change would not be symmetric).
    p = (1 + #{statistic >= observed}) / (1 + permutations).
    """
    rng = np.random.default_rng(seed)
    names = list(datasets)
    observed, hits = {}, dict.fromkeys([*names, "mean"], 0)
    for name in names:
        r = datasets[name]
        observed[name] = np.log((r[:, 2].sum() / r[:, 3].sum()) / (r[:, 0].sum() / r[:, 1].sum()))
    point_a = np.mean([datasets[n][:, 0].sum() / datasets[n][:, 1].sum() for n in names])
    point_b = np.mean([datasets[n][:, 2].sum() / datasets[n][:, 3].sum() for n in names])
    observed["mean"] = np.log(point_b / point_a)
    tolerance = 1e-12  # a permutation equal to the observed change (up to rounding) counts as extreme
    for start in range(0, permutations, chunk):
        n_perm = min(chunk, permutations - start)
        ce_a, ce_b = [], []
        for name in names:
            r = datasets[name]
            swap = rng.integers(0, 2, size=(n_perm, len(r))).astype(np.float64)
            keep = 1.0 - swap
            a = (keep @ r[:, 0] + swap @ r[:, 2]) / (keep @ r[:, 1] + swap @ r[:, 3])
            b = (keep @ r[:, 2] + swap @ r[:, 0]) / (keep @ r[:, 3] + swap @ r[:, 1])
            hits[name] += int((np.abs(np.log(b / a)) >= abs(observed[name]) - tolerance).sum())
            ce_a.append(a)
            ce_b.append(b)
        mean_change = np.log(np.mean(ce_b, axis=0) / np.mean(ce_a, axis=0))
        hits["mean"] += int((np.abs(mean_change) >= abs(observed["mean"]) - tolerance).sum())
    out = {name: (1 + hits[name]) / (1 + permutations) for name in names}
    if len(names) > 1:
        out["mean"] = (1 + hits["mean"]) / (1 + permutations)
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def compare_documents(docs_a: dict[str, list[dict]], docs_b: dict[str, list[dict]], *, metric: str = "ce",
                      replicates: int = 10_000, permutations: int = 10_000, seed: int = 0) -> list[Change]:
    """Changes of B against A from per-document rows ({task: [{doc_id, nll, tokens, bytes}]}), in A's task order.

    ``metric`` "ce" uses NLL per token; "bpb" uses NLL per byte, divided by ln 2.
    """
    weight = {"ce": "tokens", "bpb": "bytes"}[metric]
    datasets = {task: align(docs_a[task], docs_b[task], name=task, weight=weight) for task in docs_a if task in docs_b}
    changes = bootstrap(datasets, replicates=replicates, seed=seed)
    if permutations:
        p = permutation_pvalues(datasets, permutations=permutations, seed=seed)
        adjusted = holm({name: p[name] for name in datasets}) | ({"mean": p["mean"]} if "mean" in p else {})
        changes = [dataclasses.replace(c, p=p[c.dataset], p_holm=adjusted[c.dataset]) for c in changes]
    if metric == "bpb":  # relative changes are the same in nats and bits; the levels are shown in bits
        changes = [dataclasses.replace(c, base=c.base / np.log(2), other=c.other / np.log(2)) for c in changes]
    return changes


def markdown(changes: dict[str, list[Change]], *, metric: str = "ce", names=lambda dataset: dataset, verdict: str = "verdict") -> str:
    """One row per (model, dataset): levels, relative change with its 95% interval, p-values, verdict."""
    lines = [f"| model | dataset | {metric} baseline | {metric} model | change | 95% interval (paired bootstrap) | "
             f"p (paired permutation) | p (Holm) | {verdict} |",
             "|---|---|---|---|---|---|---|---|---|"]

    def p_text(p):
        return "" if p is None else f"{p:.4f}"

    for label, rows in changes.items():
        for c in rows:
            lines.append(f"| {label} | {names(c.dataset)} | {c.base:.4f} | {c.other:.4f} | {100 * c.relative:+.2f}% | "
                         f"[{100 * c.low:+.2f}%, {100 * c.high:+.2f}%] | {p_text(c.p)} | {p_text(c.p_holm)} | {c.verdict} |")
    return "\n".join(lines) + "\n"


def as_json(changes: dict[str, list[Change]]) -> dict:
    return {label: [{**dataclasses.asdict(c), "verdict": c.verdict} for c in rows] for label, rows in changes.items()}
