"""How a batch of preference pairs is laid out: one row per pair, the prompt written once.

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


def truncate_pair(example: dict, max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if max_length is not None:
        prompt = prompt[:max_length]
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    if not prompt:
        raise ValueError("a preference pair with an empty prompt cannot share its prompt: nothing predicts the first response token")
    return prompt, chosen, rejected


def pair_length(example: dict, max_length: int | None = None) -> int:
    """Tokens one pair occupies in its row: prompt + chosen + rejected."""
    return sum(len(part) for part in truncate_pair(example, max_length))


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

    def __call__(self, examples: list[dict]) -> dict:
        parts = [truncate_pair(ex, self.max_length) for ex in examples]
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
                p, c, n = len(prompt), len(chosen), len(rejected)
                end = start + p + c + n
                input_ids[r, start:end] = torch.tensor(prompt + chosen + rejected)
                position_ids[r, start:start + p + c] = torch.arange(p + c)
                position_ids[r, start + p + c:end] = torch.arange(p, p + n)
                causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
                causal[p + c:, p:p + c] = False  # rejected tokens never see the chosen ones
                mask[r, 0, start:end, start:end] = causal
                real[r, start:end] = 1
                flat = r * width + start
                # chosen token j is predicted at p-1+j; rejected token j at p-1 (j=0), else p+c+j-1
                index += [flat + p - 1 + j for j in range(c)]
                index += [flat + (p - 1 if j == 0 else p + c + j - 1) for j in range(n)]
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
