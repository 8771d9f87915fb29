"""Paired bootstrap of a change in cross-entropy between two models scored on the same documents.

A dataset's ce is a ratio of sums, ``sum(nll) / sum(tokens)``, so a document's NLL and token
count are resampled together, and the same documents are drawn for both models (paired):
the document-to-document spread, which both models share, cancels out of the difference.
The suite's mean is the mean of the datasets' ce; each replicate resamples every dataset
independently and takes the mean of the three.

The interval is the percentile interval of the relative change ``(ce_B - ce_A) / ce_A``.
Verdict: "better" when the whole interval is below 0 (B has lower ce), "worse" when it is
above, otherwise "no detectable change".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpo_align.errors import UserError


@dataclass(frozen=True)
class Change:
    dataset: str
    base: float  # ce (or bpb) of A
    other: float  # of B
    relative: float  # (B - A) / A
    low: float  # 95% interval of `relative`
    high: float
    documents: int

    @property
    def verdict(self) -> str:
        if self.high < 0:
            return "better"
        if self.low > 0:
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


def compare_documents(docs_a: dict[str, list[dict]], docs_b: dict[str, list[dict]], *, metric: str = "ce",
                      replicates: int = 10_000, seed: int = 0) -> list[Change]:
    """Changes of B against A from per-document rows ({task: [{doc_id, nll, tokens, bytes}]}).

    ``metric`` "ce" uses NLL per token; "bpb" uses NLL per byte, divided by ln 2.
    """
    weight = {"ce": "tokens", "bpb": "bytes"}[metric]
    datasets = {task: align(docs_a[task], docs_b[task], name=task, weight=weight) for task in docs_a if task in docs_b}
    changes = bootstrap(datasets, replicates=replicates, seed=seed)
    if metric == "bpb":  # relative changes are the same in nats and bits; the levels are shown in bits
        changes = [Change(c.dataset, c.base / np.log(2), c.other / np.log(2), c.relative, c.low, c.high, c.documents) for c in changes]
    return changes


def markdown(changes: dict[str, list[Change]], *, metric: str = "ce", names: dict[str, str] | None = None) -> str:
    """One row per (model, dataset): levels, relative change with its 95% interval, verdict."""
    names = names or {}
    lines = [f"| model | dataset | {metric} baseline | {metric} model | change | 95% interval (paired bootstrap) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for label, rows in changes.items():
        for c in rows:
            lines.append(f"| {label} | {names.get(c.dataset, c.dataset)} | {c.base:.4f} | {c.other:.4f} | {100 * c.relative:+.2f}% | "
                         f"[{100 * c.low:+.2f}%, {100 * c.high:+.2f}%] | {c.verdict} |")
    return "\n".join(lines) + "\n"


def as_json(changes: dict[str, list[Change]]) -> dict:
    import dataclasses

    return {label: [{**dataclasses.asdict(c), "verdict": c.verdict} for c in rows] for label, rows in changes.items()}
