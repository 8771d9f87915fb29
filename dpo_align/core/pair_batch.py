"""How a batch of preference pairs is laid out: one row per pair, the prompt written once.

The segment itself (``shared_segment``: a prompt, then any number of responses that each see
the prompt and themselves, never a sibling) is also how ``--model dpo-hf`` scores a context
once for all its continuations (``dpo_align/score/lm_eval_model.py``).

Stock TRL writes every pair as two right-padded rows, prompt + chosen and prompt +
rejected. Here a pair is one segment ``prompt, chosen, rejected``:

* position ids run ``0 .. P+C-1`` over prompt and chosen, then restart at ``P`` for the
  rejected tokens, so each response sits exactly where it would in its own row;
* a 4D boolean attention mask is causal, except that rejected tokens never see chosen ones;
* the first token of both responses is predicted from the last prompt position ``P-1``.

With ``pack=True`` several short pairs share a row (first-fit, longest first, into rows
as long as the longest pair of the batch), with a block-diagonal mask between them.

Truncation follows TRL's collator (``keep_start``): ``(prompt + response)[:max_length]``
for each response, so the tokens scored are the ones stock TRL scores.

The collator also returns, for every response token, where its predicting hidden state
is (``logp_index`` into the flattened ``[rows * L]`` positions), its target token, and its
place in a ``[2B, R]`` grid (chosen rows ``0..B-1``, rejected rows ``B..2B-1``), which is
the layout TRL's loss code reads (see ``fast_dpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shared_segment(prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
    """One prompt and its responses in one segment: (tokens, position ids, [L, L] boolean mask, predictors).

    Every response's position ids restart where the prompt ends, so it sits exactly where it would in a row of
    its own; the mask is causal, except that a response never sees an earlier one. ``predictors[k][j]`` is the
    segment position whose hidden state predicts token j of response k: the prompt's last position for j = 0."""
    p = len(prompt)
    tokens, positions, starts = list(prompt), list(range(p)), []
    for response in responses:
        starts.append(len(tokens))
        tokens += response
        positions += range(p, p + len(response))
    mask = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    for start, response in zip(starts, responses, strict=True):
        mask[start:start + len(response), p:start] = False  # never a sibling
    predictors = [[p - 1 if j == 0 else start + j - 1 for j in range(len(response))] for start, response in zip(starts, responses, strict=True)]
    return tokens, positions, mask, predictors


def truncate_pair(example: dict, max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if max_length is not None:
        prompt = prompt[:max_length]
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    if not prompt:
        raise ValueError("a preference pair with an empty prompt cannot share its prompt: nothing predicts the first response token")
    return prompt, chosen, rejected


def pair_length(example: dict, max_length: int | None = None, chosen_only: bool = False) -> int:
    """Tokens one pair occupies in its row: prompt + chosen + rejected (+ chosen alone with ``chosen_only``)."""
    parts = truncate_pair(example, max_length)
    return sum(len(part) for part in (parts[:2] if chosen_only else parts))


def _pack_rows(lengths: list[int], pack: bool) -> list[list[int]]:
    """Pair indices per row. Without packing, one pair a row, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not pack:
        return [[i] for i in order]
    capacity = lengths[order[0]]
    rows, free = [], []
    for i in order:  # first fit, longest first
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


@dataclass
class SharedPromptCollator:
    """Collate TRL-tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into shared-prompt rows."""

    pad_token_id: int
    max_length: int | None = None
    pack: bool = False
    # SFT alone reads only the chosen responses: the rejected ones are left out of the rows (their grid rows stay empty)
    chosen_only: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        parts = [truncate_pair(ex, self.max_length) for ex in examples]
        if self.chosen_only:
            parts = [(prompt, chosen, []) for prompt, chosen, _ in parts]
        lengths = [len(p) + len(c) + len(r) for p, c, r in parts]
        rows = _pack_rows(lengths, self.pack)
        width = max(sum(lengths[i] for i in row) for row in rows)
        n_pairs = len(examples)

        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        real = torch.zeros((len(rows), width), dtype=torch.long)
        index, targets, seq, offset = [], [], [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                prompt, chosen, rejected = parts[i]
                c, n = len(chosen), len(rejected)
                tokens, positions, causal, predictors = shared_segment(prompt, [chosen, rejected])
                end = start + len(tokens)
                input_ids[r, start:end] = torch.tensor(tokens)
                position_ids[r, start:end] = torch.tensor(positions)
                mask[r, 0, start:end, start:end] = causal  # rejected tokens never see the chosen ones
                real[r, start:end] = 1
                flat = r * width + start
                index += [flat + k for k in predictors[0] + predictors[1]]
                targets += chosen + rejected
                seq += [i] * c + [n_pairs + i] * n
                offset += list(range(c)) + list(range(n))
                start = end
            pads = torch.arange(start, width)
            mask[r, 0, pads, pads] = True  # a padding row must attend somewhere, or SDPA gives NaN

        width_r = max(max(len(c), len(n)) for _, c, n in parts)
        completion_mask = torch.zeros((2 * n_pairs, width_r + 1), dtype=torch.long)
        for i, (_, c, n) in enumerate(parts):
            completion_mask[i, 1:1 + len(c)] = 1
            completion_mask[n_pairs + i, 1:1 + len(n)] = 1
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            "real_tokens": real,
            "logp_index": torch.tensor(index, dtype=torch.long),
            "logp_targets": torch.tensor(targets, dtype=torch.long),
            "logp_seq": torch.tensor(seq, dtype=torch.long),
            "logp_offset": torch.tensor(offset, dtype=torch.long),
            "completion_mask": completion_mask,
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch
