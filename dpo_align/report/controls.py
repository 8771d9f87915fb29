"""Did it get better, or only cheaper? A change in ce read beside the same change in its control.

A single reference answer's likelihood moves with format as much as with quality: a model that
learns to answer in the reference's style makes every answer cheaper, right or wrong. So each
scored document also carries its foils (wrong answers scored the same way, ``dpo_contrast_*``),
and a change of model B against model A is read three ways, paired over the same documents:

* Δce and Δce_foil: the relative change of the reference's and of the foils' cross-entropy;
* the **specific change** ``Δlog ce − Δlog ce_foil = log(ce_B / ce_A) − log(foil_B / foil_A)``:
  below 0 when the reference got cheaper than its foils did. One paired bootstrap resamples the
  documents (reference and foil numbers together) for all three; a paired permutation (A and B
  swapped on random halves of the documents) gives its p-value, Holm-adjusted across datasets;
* Δacc: how often the reference has the lowest summed NLL of its document's responses, with an
  exact McNemar test on the documents whose outcome changed.

The verdict reads ce together with its control, the same way up and down (``VERDICTS``):

| ce (paired, Holm) | specific change significantly below 0 | not significant | significantly above 0 |
|---|---|---|---|
| falls | ``better`` | ``format shift`` | ``format shift`` |
| does not move | ``relatively better`` | ``no detectable change`` | ``relatively worse`` |
| rises | ``format shift (dearer)`` | ``format shift (dearer)`` | ``worse`` |

A shared rise of ce and foils is a change of format, as a shared fall is; ``worse`` needs the reference to get
dearer than its foils did. "relatively better/worse": ce did not move significantly, but the reference moved
against its foils (the reference got cheaper, or dearer, than the wrong answers).

Δacc has its own verdict. The mean row is the same rule on the mean of the datasets (each
replicate resamples every dataset; its McNemar test pools the documents of all datasets).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from dpo_align.core.errors import UserError
from dpo_align.report import paired

ALPHA = paired.ALPHA
# per-document columns: reference nll and tokens, then foil nll and tokens, for A then B
COLUMNS = ("nll", "tokens", "foil_nll", "foil_tokens")


# {ce's own verdict: {direction of the specific change: the controlled verdict}}: the table in the docstring above
VERDICTS = {
    "better": {-1: "better", 0: "format shift", 1: "format shift"},
    "no detectable change": {-1: "relatively better", 0: "no detectable change", 1: "relatively worse"},
    "worse": {-1: "format shift (dearer)", 0: "format shift (dearer)", 1: "worse"},
}


@dataclass(frozen=True)
class Controlled:
    dataset: str
    ce: paired.Change  # the reference's ce, A -> B
    foil: paired.Change  # the foils' ce, A -> B
    specific: float  # log(ce_B / ce_A) - log(foil_B / foil_A)
    specific_low: float  # its 95% paired bootstrap interval
    specific_high: float
    acc_base: float  # share of documents whose reference beats every foil, A
    acc_other: float
    gained: int  # documents A got wrong and B right
    lost: int  # documents A got right and B wrong
    specific_p: float | None = None  # paired permutation, two-sided
    specific_p_holm: float | None = None
    acc_p: float | None = None  # exact McNemar, two-sided
    acc_p_holm: float | None = None

    @property
    def specific_direction(self) -> int:
        """-1 when the specific change is significantly below 0, +1 when significantly above, 0 otherwise."""
        significant = self.specific_p_holm is None or self.specific_p_holm < ALPHA
        if significant and self.specific_high < 0:
            return -1
        if significant and self.specific_low > 0:
            return 1
        return 0

    @property
    def verdict(self) -> str:
        return VERDICTS[self.ce.verdict][self.specific_direction]

    @property
    def acc_verdict(self) -> str:
        if self.acc_p_holm is not None and self.acc_p_holm < ALPHA and self.acc_other != self.acc_base:
            return "right more often" if self.acc_other > self.acc_base else "right less often"
        return "no detectable change"


def align(a: list[dict], b: list[dict], *, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([n, 8] reference and foil sums of A then B, correct A, correct B) over the same documents, by doc_id."""
    if sorted(d["doc_id"] for d in a) != sorted(d["doc_id"] for d in b):
        raise UserError(f"{name}: the two models were scored on different documents; score both on the same documents to compare them.")
    by_id = {d["doc_id"]: d for d in b}
    rows = np.array([[d[c] for c in COLUMNS] + [by_id[d["doc_id"]][c] for c in COLUMNS] for d in a], dtype=np.float64)
    correct_a = np.array([bool(d["correct"]) for d in a])
    correct_b = np.array([bool(by_id[d["doc_id"]]["correct"]) for d in a])
    return rows, correct_a, correct_b


def _ratios(sums: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ce A, foil A, ce B, foil B) from column sums [..., 8]."""
    return sums[..., 0] / sums[..., 1], sums[..., 2] / sums[..., 3], sums[..., 4] / sums[..., 5], sums[..., 6] / sums[..., 7]


def _specific(ce_a, foil_a, ce_b, foil_b):
    return np.log(ce_b / ce_a) - np.log(foil_b / foil_a)


def bootstrap_specific(datasets: dict[str, np.ndarray], *, replicates: int = 10_000, seed: int = 0, chunk: int = 500) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the specific change per dataset and for the mean of the datasets (with several)."""
    rng = np.random.default_rng(seed)
    names = list(datasets)
    out = {name: [] for name in [*names, "mean"]}
    for start in range(0, replicates, chunk):
        n_rep = min(chunk, replicates - start)
        per = []
        for name in names:
            rows = datasets[name]
            ratios = _ratios(rows[rng.integers(0, len(rows), size=(n_rep, len(rows)))].sum(axis=1))
            out[name].append(_specific(*ratios))
            per.append(ratios)
        means = [np.mean([p[k] for p in per], axis=0) for k in range(4)]
        out["mean"].append(_specific(*means))
    return {name: np.concatenate(v) for name, v in out.items() if v and (name != "mean" or len(names) > 1)}


def permutation_specific(datasets: dict[str, np.ndarray], *, permutations: int = 10_000, seed: int = 0, chunk: int = 500) -> dict[str, float]:
    """Two-sided paired permutation p-value of the specific change: A and B swapped on random halves of the
    documents (a document's reference and foil numbers move together); p = (1 + #{|stat| >= |observed|}) / (1 + N)."""
    rng = np.random.default_rng(seed)
    names = list(datasets)
    point = {name: _ratios(datasets[name].sum(axis=0)) for name in names}
    observed = {name: float(_specific(*point[name])) for name in names}
    observed["mean"] = float(_specific(*[np.mean([point[n][k] for n in names]) for k in range(4)]))
    hits = dict.fromkeys([*names, "mean"], 0)
    tolerance = 1e-12
    for start in range(0, permutations, chunk):
        n_perm = min(chunk, permutations - start)
        per = []
        for name in names:
            r = datasets[name]
            swap = rng.integers(0, 2, size=(n_perm, len(r))).astype(np.float64)
            keep = 1.0 - swap
            a = keep @ r[:, :4] + swap @ r[:, 4:]
            b = keep @ r[:, 4:] + swap @ r[:, :4]
            ratios = _ratios(np.concatenate([a, b], axis=1))
            hits[name] += int((np.abs(_specific(*ratios)) >= abs(observed[name]) - tolerance).sum())
            per.append(ratios)
        means = [np.mean([p[k] for p in per], axis=0) for k in range(4)]
        hits["mean"] += int((np.abs(_specific(*means)) >= abs(observed["mean"]) - tolerance).sum())
    out = {name: (1 + hits[name]) / (1 + permutations) for name in names}
    if len(names) > 1:
        out["mean"] = (1 + hits["mean"]) / (1 + permutations)
    return out


def mcnemar(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: under no change, each discordant document is a fair coin."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare_controlled(docs_a: dict[str, list[dict]], docs_b: dict[str, list[dict]], *, replicates: int = 10_000,
                       permutations: int = 10_000, seed: int = 0) -> list[Controlled]:
    """One Controlled per dataset (A's task order), then the mean, from contrast rows
    ({task: [{doc_id, nll, tokens, foil_nll, foil_tokens, correct}]})."""
    names = [task for task in docs_a if task in docs_b]
    aligned = {name: align(docs_a[name], docs_b[name], name=name) for name in names}
    rows = {name: value[0] for name, value in aligned.items()}
    ce = paired.compare_documents(_side(docs_a, names, "nll", "tokens"), _side(docs_b, names, "nll", "tokens"), replicates=replicates,
                                  permutations=permutations, seed=seed)
    foil = paired.compare_documents(_side(docs_a, names, "foil_nll", "foil_tokens"), _side(docs_b, names, "foil_nll", "foil_tokens"),
                                    replicates=replicates, permutations=permutations, seed=seed)
    samples = bootstrap_specific(rows, replicates=replicates, seed=seed)
    p = permutation_specific(rows, permutations=permutations, seed=seed) if permutations else {}
    out = []
    for i, name in enumerate([*names, "mean"] if len(names) > 1 else names):
        keys = names if name == "mean" else [name]
        point = [np.mean([_ratios(rows[k].sum(axis=0))[j] for k in keys]) for j in range(4)]
        correct_a = np.concatenate([aligned[k][1] for k in keys])
        correct_b = np.concatenate([aligned[k][2] for k in keys])
        acc_a = float(np.mean([aligned[k][1].mean() for k in keys]))
        acc_b = float(np.mean([aligned[k][2].mean() for k in keys]))
        gained, lost = int((~correct_a & correct_b).sum()), int((correct_a & ~correct_b).sum())
        low, high = np.percentile(samples[name], [2.5, 97.5])
        out.append(Controlled(name, ce[i], foil[i], float(_specific(*point)), float(low), float(high), acc_a, acc_b, gained, lost,
                              specific_p=p.get(name), acc_p=mcnemar(gained, lost)))
    specific_holm = paired.holm({c.dataset: c.specific_p for c in out if c.dataset != "mean"}) if permutations else {}
    acc_holm = paired.holm({c.dataset: c.acc_p for c in out if c.dataset != "mean"})
    return [dataclasses.replace(c, specific_p_holm=specific_holm.get(c.dataset, c.specific_p), acc_p_holm=acc_holm.get(c.dataset, c.acc_p))
            for c in out]


def _side(docs: dict[str, list[dict]], names: list[str], nll: str, tokens: str) -> dict[str, list[dict]]:
    """The rows paired.compare_documents reads, from one pair of contrast columns."""
    return {name: [{"doc_id": d["doc_id"], "nll": d[nll], "tokens": d[tokens]} for d in docs[name]] for name in names}


def markdown(changes: dict[str, list[Controlled]], *, names=lambda dataset: dataset) -> str:
    """One row per (model, dataset): Δce, Δce_foil, the specific change, its p, the verdict; then Δacc and its own verdict."""
    lines = ["| model | dataset | Δce [95%] | Δce_foil [95%] | specific: Δlog ce − Δlog ce_foil [95%] | p (Holm) | verdict | "
             "acc baseline → model | gained / lost | p (McNemar, Holm) | acc verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(change: paired.Change) -> str:
        return f"{100 * change.relative:+.2f}% [{100 * change.low:+.2f}, {100 * change.high:+.2f}]"

    def p_text(p):
        return "" if p is None else f"{p:.4f}"

    for label, rows in changes.items():
        for c in rows:
            lines.append(f"| {label} | {names(c.dataset)} | {pct(c.ce)} | {pct(c.foil)} | {c.specific:+.4f} [{c.specific_low:+.4f}, "
                         f"{c.specific_high:+.4f}] | {p_text(c.specific_p_holm)} | **{c.verdict}** | {100 * c.acc_base:.1f}% → "
                         f"{100 * c.acc_other:.1f}% | {c.gained} / {c.lost} | {p_text(c.acc_p_holm)} | {c.acc_verdict} |")
    return "\n".join(lines) + "\n"


def as_json(changes: dict[str, list[Controlled]]) -> dict:
    out = {}
    for label, rows in changes.items():
        out[label] = [{**{k: v for k, v in dataclasses.asdict(c).items() if k not in ("ce", "foil")},
                       "ce": {**dataclasses.asdict(c.ce), "verdict": c.ce.verdict}, "foil": dataclasses.asdict(c.foil),
                       "verdict": c.verdict, "acc_verdict": c.acc_verdict} for c in rows]
    return out
