"""The paired bootstrap of a ce change: hand-computable cases, a ratio of sums, and a true zero difference."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_align.core.errors import UserError
from dpo_align.report.paired import bootstrap, compare_documents


def docs(nll, tokens, bytes_=None):
    bytes_ = bytes_ or [4 * t for t in tokens]
    return [{"doc_id": i, "nll": n, "tokens": t, "bytes": b} for i, (n, t, b) in enumerate(zip(nll, tokens, bytes_, strict=True))]


def test_two_documents_by_hand():
    # Resampling 2 documents gives 4 equally likely draws: {0,0}, {0,1}, {1,0}, {1,1}.
    # ce A = 1, 2, 2, 3 and ce B = 2, 2.5, 2.5, 3, so (B-A)/A = 1, .25, .25, 0: the 95% interval is [0, 1].
    (change,) = compare_documents({"t": docs([1, 3], [1, 1])}, {"t": docs([2, 3], [1, 1])}, replicates=4000, seed=1)
    assert change.base == 2 and change.other == 2.5 and change.relative == pytest.approx(0.25)
    assert (change.low, change.high) == (0.0, 1.0)
    assert change.verdict == "no detectable change"  # the interval touches 0


def test_a_uniform_change_has_a_point_interval_and_a_verdict():
    rng = np.random.default_rng(0)
    nll, tokens = list(rng.uniform(5, 50, 40)), list(rng.integers(3, 30, 40))
    better = compare_documents({"t": docs(nll, tokens)}, {"t": docs([0.9 * x for x in nll], tokens)}, replicates=500)[0]
    assert better.low == pytest.approx(-0.1) and better.high == pytest.approx(-0.1) and better.verdict == "better"
    worse = compare_documents({"t": docs(nll, tokens)}, {"t": docs([1.05 * x for x in nll], tokens)}, replicates=500)[0]
    assert worse.verdict == "worse"


def test_ce_is_a_ratio_of_sums_and_token_counts_travel_with_their_document():
    # A long document with a low per-token loss and a short one with a high loss: the ratio of
    # sums (22/11 = 2) differs from the mean of the ratios ((1 + 12) / 2 = 6.5).
    (change,) = compare_documents({"t": docs([10, 12], [10, 1])}, {"t": docs([10, 12], [10, 1])}, replicates=200)
    assert change.base == pytest.approx(2.0)
    # identical models: every replicate's change is exactly 0, whatever the documents drawn
    assert change.low == change.high == change.relative == 0.0
    (bpb,) = compare_documents({"t": docs([10, 12], [10, 1], [40, 4])}, {"t": docs([10, 12], [10, 1], [40, 4])}, metric="bpb", replicates=10)
    assert bpb.base == pytest.approx(22 / 44 / np.log(2))


def test_with_no_true_difference_the_interval_covers_zero_in_most_seeds():
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        tokens = rng.integers(2, 40, 300)
        per_token = rng.gamma(4.0, 0.6, 300)  # each document's own difficulty, shared by both models
        a = per_token * tokens * rng.normal(1, 0.05, 300)  # and each model's own noise around it
        b = per_token * tokens * rng.normal(1, 0.05, 300)
        (change,) = compare_documents({"t": docs(list(a), list(tokens))}, {"t": docs(list(b), list(tokens))}, replicates=1000, seed=seed)
        covered += change.low <= 0 <= change.high
    assert covered >= 34  # nominal 95%: 38 of 40 expected


def test_the_mean_row_averages_the_datasets_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(3)
    sets_a, sets_b = {}, {}
    for name in ("x", "y"):
        tokens = rng.integers(2, 40, 200)
        difficulty = rng.gamma(2.0, 1.0, 200)  # a large spread between documents
        a = difficulty * tokens
        sets_a[name], sets_b[name] = docs(list(a), list(tokens)), docs(list(a * 0.99), list(tokens))
    *per_set, mean = compare_documents(sets_a, sets_b, replicates=2000)
    assert mean.dataset == "mean" and mean.base == pytest.approx(np.mean([c.base for c in per_set]))
    assert mean.relative == pytest.approx(-0.01) and mean.verdict == "better"
    # Unpaired, a 1% change is lost in the spread between documents: the paired interval is far narrower.
    rows = np.array([[d["nll"], d["tokens"]] for d in sets_a["x"]])
    draws = rng.integers(0, 200, (2000, 200))
    unpaired = rows[draws].sum(1)
    spread = np.percentile(unpaired[:, 0] / unpaired[:, 1], [2.5, 97.5])
    assert (per_set[0].high - per_set[0].low) < 0.01 * (spread[1] - spread[0]) / per_set[0].base


def test_different_documents_are_refused():
    with pytest.raises(UserError, match="different documents"):
        compare_documents({"t": docs([1, 2], [1, 1])}, {"t": docs([1, 2, 3], [1, 1, 1])})


def test_bootstrap_is_seeded():
    rows = {"t": np.array([[1.0, 1, 1.5, 1], [3, 1, 2.5, 1], [2, 2, 2, 2]])}
    assert bootstrap(rows, replicates=300, seed=5) == bootstrap(rows, replicates=300, seed=5)


def test_permutation_p_values_and_holm():
    from dpo_align.report.paired import holm, permutation_pvalues

    # Two documents, B higher on both: of the 4 swap patterns, only "swap none" and "swap both" give
    # a change as large as observed (|±|), so p = (1 + 2/4 * P) / (1 + P) -> about 0.5.
    rows = {"t": np.array([[1.0, 1, 2.0, 1], [2.0, 1, 3.0, 1]])}
    assert permutation_pvalues(rows, permutations=4000, seed=0)["t"] == pytest.approx(0.5, abs=0.03)
    # A clear, consistent change over many documents: p at its floor 1 / (1 + P)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 30, 200)
    a = rng.gamma(3, 1, 200) * tokens
    clear = {"t": np.column_stack([a, tokens, a * 0.97, tokens])}
    assert permutation_pvalues(clear, permutations=999)["t"] == pytest.approx(1 / 1000)
    # Holm by hand: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert holm({"x": 0.02, "y": 0.01, "z": 0.04}) == pytest.approx({"y": 0.03, "x": 0.04, "z": 0.04})
    assert holm({"x": 0.5, "y": 0.6}) == {"x": 1.0, "y": 1.0}


def test_no_true_difference_is_rarely_called_a_change():
    wrong = 0
    for seed in range(30):
        rng = np.random.default_rng(500 + seed)
        sets_a, sets_b = {}, {}
        for name in ("x", "y", "z"):
            tokens = rng.integers(2, 40, 150)
            difficulty = rng.gamma(4.0, 0.6, 150) * tokens
            sets_a[name] = docs(list(difficulty * rng.normal(1, 0.05, 150)), list(tokens))
            sets_b[name] = docs(list(difficulty * rng.normal(1, 0.05, 150)), list(tokens))
        changes = compare_documents(sets_a, sets_b, replicates=400, permutations=400, seed=seed)
        wrong += any(c.verdict != "no detectable change" for c in changes[:3])  # the family Holm controls
    assert wrong <= 4  # family-wise error 5%: 1.5 of 30 expected
