"""Token-weighted cross-entropy and its standard error.

Per document we have a total negative log-likelihood ``nll_i`` (nats) over ``n_i`` units
(tokens, or UTF-8 bytes for bits per byte). The task-level number is the ratio of sums

    ce = sum(nll_i) / sum(n_i)

which weights every token equally, not every document. Its standard error treats the
documents as the random draws (tokens within a document are not independent) and uses
the delta method for a ratio of means (a closed form, so it is exact to compute and
needs no bootstrap):

    se(ce)^2 = sum((nll_i - ce * n_i)^2) / (N (N - 1) mean(n)^2)

``ppl = exp(ce)`` has ``se = ppl * se(ce)``; bits per byte divides by ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LN2 = math.log(2.0)


def ratio(items: Sequence[tuple[float, float]]) -> float:
    total_nll = sum(nll for nll, _ in items)
    total_n = sum(n for _, n in items)
    return total_nll / total_n if total_n else float("nan")


def ratio_stderr(items: Sequence[tuple[float, float]]) -> float:
    count = len(items)
    if count < 2:
        return float("nan")
    value = ratio(items)
    mean_n = sum(n for _, n in items) / count
    residual = sum((nll - value * n) ** 2 for nll, n in items)
    return math.sqrt(residual / (count * (count - 1))) / mean_n


def ce(items):
    """Nats per token."""
    return ratio(items)


def ppl(items):
    return math.exp(ratio(items))


def bpb(items):
    """Bits per UTF-8 byte of the scored text: comparable across tokenizers."""
    return ratio(items) / LN2


ce.stderr = ratio_stderr
ppl.stderr = lambda items: math.exp(ratio(items)) * ratio_stderr(items)
bpb.stderr = lambda items: ratio_stderr(items) / LN2
