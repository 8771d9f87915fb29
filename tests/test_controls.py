"""The controlled verdict: ce read beside its foils (dpo_align/report/controls.py), on documents made to order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpo_align.report.controls import bootstrap_specific, compare_controlled, mcnemar


def documents(rng, n: int, *, ref_factor: float = 1.0, foil_factor: float = 1.0, noise: float = 0.0, base=None) -> list[dict]:
    """Contrast rows; with ``base``, the same documents with every reference NLL scaled by ``ref_factor`` and every foil
    NLL by ``foil_factor`` (times 1 + N(0, noise)), and the outcome re-decided from the new NLLs."""
    rows = []
    for i in range(n):
        if base is None:
            tokens, foil_tokens = int(rng.integers(3, 40)), int(rng.integers(3, 40))
            nll, foil_nll = tokens * rng.uniform(1.5, 3.5), foil_tokens * rng.uniform(1.8, 3.8)
        else:
            d = base[i]
            tokens, foil_tokens = d["tokens"], d["foil_tokens"]
            nll = d["nll"] * ref_factor * (1 + noise * rng.standard_normal())
            foil_nll = d["foil_nll"] * foil_factor * (1 + noise * rng.standard_normal())
        rows.append({"doc_id": i, "nll": nll, "tokens": tokens, "foil_nll": foil_nll, "foil_tokens": foil_tokens,
                     "correct": nll < foil_nll})
    return rows


def suite(seed: int, **change) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    a = {f"dpo_contrast_{name}": documents(rng, 150) for name in ("truthfulqa", "winogrande", "pku")}
    b = {task: documents(rng, 150, base=rows, **change) for task, rows in a.items()}
    return a, b


def test_every_response_cheaper_by_the_same_factor_is_a_format_shift():
    a, b = suite(0, ref_factor=0.88, foil_factor=0.88, noise=0.01)
    rows = compare_controlled(a, b, replicates=2000, permutations=2000)
    assert [r.dataset for r in rows][-1] == "mean"
    for r in rows:
        assert r.ce.verdict == "better" and r.ce.relative < -0.1, r  # ce alone says "better"
        assert r.verdict == "format shift", r  # the control says it is not


def test_only_the_reference_cheaper_is_better():
    a, b = suite(1, ref_factor=0.9, foil_factor=1.0, noise=0.01)
    rows = compare_controlled(a, b, replicates=2000, permutations=2000)
    for r in rows:
        assert r.specific == pytest.approx(math.log(0.9), abs=0.01) and r.specific_high < 0
        assert r.verdict == "better", r
    assert rows[-1].acc_other >= rows[-1].acc_base  # the reference now wins more often, never less


def test_no_change_gives_no_detectable_change_in_most_seeds():
    verdicts = []
    for seed in range(10):
        a, b = suite(100 + seed, noise=0.02)
        verdicts += [r.verdict for r in compare_controlled(a, b, replicates=1000, permutations=1000)]
    assert verdicts.count("no detectable change") >= 0.85 * len(verdicts), verdicts


def test_the_bootstrap_of_the_specific_change_by_hand_on_two_documents():
    # document 0: the reference got cheaper (6 -> 3 nats over 3 tokens), its foil did not (8 over 4, both models);
    # document 1: both unchanged. A resample is doc 0 twice, doc 1 twice, or one of each (half the draws).
    rows = np.array([[6.0, 3, 8.0, 4, 3.0, 3, 8.0, 4],
                     [4.0, 2, 5.0, 5, 4.0, 2, 5.0, 5]])

    def specific(nll_a, tok_a, foil_a, ftok_a, nll_b, tok_b, foil_b, ftok_b):
        return math.log((nll_b / tok_b) / (nll_a / tok_a)) - math.log((foil_b / ftok_b) / (foil_a / ftok_a))

    only_0, only_1, both = specific(*rows[0]), specific(*rows[1]), specific(*rows.sum(axis=0))
    assert (only_0, only_1) == (pytest.approx(math.log(0.5)), 0.0) and both == pytest.approx(math.log(7 / 10))
    draws = bootstrap_specific({"one": rows}, replicates=20_000, seed=3)["one"]
    values, counts = np.unique(np.round(draws, 12), return_counts=True)
    assert sorted(values) == pytest.approx(sorted([only_0, both, only_1]))
    shares = dict(zip(np.round(values, 6), counts / len(draws), strict=True))
    assert shares[round(both, 6)] == pytest.approx(0.5, abs=0.02) and shares[round(only_0, 6)] == pytest.approx(0.25, abs=0.02)
    assert np.percentile(draws, [2.5, 97.5]) == pytest.approx([only_0, only_1])  # the interval's ends are the two single documents


def test_mcnemar_by_hand():
    assert mcnemar(0, 5) == pytest.approx(2 / 32)  # five flips all one way: 2 * 0.5^5
    assert mcnemar(3, 3) == 1.0 and mcnemar(0, 0) == 1.0
    assert mcnemar(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


@pytest.mark.parametrize("ref_factor, foil_factor, verdict", [
    (0.90, 1.00, "better"),  # ce falls, specifically
    (0.88, 0.88, "format shift"),  # ce falls, foils as much
    (0.93, 0.85, "format shift"),  # ce falls, foils more
    (1.00, 1.06, "relatively better"),  # ce flat, foils dearer: the reference got cheaper than its foils
    (1.00, 1.00, "no detectable change"),
    (1.00, 0.94, "relatively worse"),  # ce flat, foils cheaper
    (1.12, 1.12, "format shift (dearer)"),  # a shared rise: format, as a shared fall is (was "worse")
    (1.07, 1.15, "format shift (dearer)"),  # ce rises, foils more
    (1.10, 1.00, "worse"),  # ce rises, specifically
], ids=lambda v: str(v))
def test_every_cell_of_the_symmetric_verdict_table(ref_factor, foil_factor, verdict):
    """Each cell of the rule table in controls.py, on documents made to order (every dataset and the mean)."""
    a, b = suite(5, ref_factor=ref_factor, foil_factor=foil_factor, noise=0.01)
    rows = compare_controlled(a, b, replicates=2000, permutations=2000)
    assert {r.verdict for r in rows} == {verdict}, [(r.dataset, r.verdict, r.ce.verdict, r.specific) for r in rows]
