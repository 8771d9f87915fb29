"""Pairs fitted to a training run: the ``max_pairs`` sample, and prompts shortened to ``max_length``.

Used by training, the sweep's decontamination report and held-out preference scoring, so
that all three see the same pairs the same way.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from dpo_align.data.pairs import Pair
from dpo_align.data.templates import render_prompt, render_response


def take_pairs(pairs: list, n: int, how: str, seed: int) -> list:
    """The first ``n`` pairs, or ``n`` drawn uniformly without replacement (kept in file order)."""
    if how == "first" or n >= len(pairs):
        return pairs[:n]
    import random

    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def fit_to_length(pairs: list[Pair], tokenizer, template: str, max_length: int) -> tuple[list[Pair], Counter]:
    """Shorten prompts from the left (oldest dialogue first) so prompt + response fits.

    The template around the instruction is kept whole. A prompt may keep at most what the
    longer response leaves free, and never less than half of ``max_length``; responses
    still too long are cut at the end by TRL's collator. Both are counted.
    """
    stats = Counter()
    if not pairs:
        return pairs, stats

    def lengths(texts):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    prompts = [render_prompt(p.instruction, template, tokenizer) for p in pairs]
    prompt_len = lengths(prompts)
    response_len = [max(a, b) + 1 for a, b in zip(  # + 1 for the EOS token TRL appends
        lengths([render_response(p.chosen, template) for p in pairs]),
        lengths([render_response(p.rejected, template) for p in pairs]), strict=True)]
    fitted = []
    for pair, n_prompt, n_response in zip(pairs, prompt_len, response_len, strict=True):
        if n_prompt + n_response <= max_length:
            fitted.append(pair)
            continue
        budget = max(max_length - n_response, max_length // 2)
        if n_prompt > budget:
            ids = tokenizer(pair.instruction, add_special_tokens=False)["input_ids"]
            overhead = n_prompt - len(ids)
            keep = max(budget - overhead, 1)
            pair = dataclasses.replace(pair, instruction=tokenizer.decode(ids[-keep:]).lstrip())
            stats["prompt truncated from the left"] += 1
            n_prompt = len(tokenizer(render_prompt(pair.instruction, template, tokenizer), add_special_tokens=False)["input_ids"])
        if n_prompt + n_response > max_length:
            stats["response truncated at the end"] += 1
        fitted.append(pair)
    return fitted, stats
