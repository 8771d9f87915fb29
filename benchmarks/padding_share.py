"""Padded positions in dpo-align's training batches over a whole pool: is packing worth building?

Every pair of the pool is tokenized as the trainer's rows hold it (prompt once, then chosen, then rejected, each
response ending in EOS, cut to ``--max-length`` as ``pair_batch.truncate_pair`` cuts it), and batched by
transformers' own length-grouped sampler (``get_length_grouped_indices``, what ``train_sampling_strategy=
"group_by_length"`` uses, shuffled by a seed), ``--batch-size`` pairs a batch, one pair a row. A batch's padded
positions are its rows times its longest row, less the real tokens. The share is over the whole epoch, for a few
sampler seeds; DPO rows (both responses) and SFT rows (chosen only) apart.

The issue's rule: pack several pairs into a row only if this share is over 10%.

    python benchmarks/padding_share.py --data ../shared/data/splits/train-pool.jsonl.gz --json results/padding-share.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def lengths(data: str, model: str, max_length: int) -> dict[str, list[int]]:
    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.core.pair_batch import truncate_pair
    from dpo_align.data.pairs import read_pairs, to_dataset

    tokenizer = load_tokenizer(resolve_model(model))
    pairs, _ = read_pairs([data])
    dataset = to_dataset(pairs, "alpaca", tokenizer)
    eos = [tokenizer.eos_token_id]
    dpo, sft = [], []
    for row in dataset:
        example = {"prompt_ids": tokenizer(row["prompt"])["input_ids"], "chosen_ids": tokenizer(row["chosen"])["input_ids"] + eos,
                   "rejected_ids": tokenizer(row["rejected"])["input_ids"] + eos}
        prompt, chosen, rejected = truncate_pair(example, max_length)
        dpo.append(len(prompt) + len(chosen) + len(rejected))
        sft.append(len(prompt) + len(chosen))
    return {"dpo": dpo, "sft": sft}


def padded_share(row_lengths: list[int], batch_size: int, seed: int) -> float:
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(row_lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    fed = real = 0
    for start in range(0, len(order), batch_size):
        batch = [row_lengths[i] for i in order[start:start + batch_size]]
        fed += len(batch) * max(batch)
        real += sum(batch)
    return 1 - real / fed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = lengths(args.data, args.model, args.max_length)
    out = {"data": args.data, "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "pairs": len(rows["dpo"])}
    for layout, row_lengths in rows.items():
        shares = [padded_share(row_lengths, args.batch_size, seed) for seed in range(args.seeds)]
        # the same pool batched in file order, without grouping: what grouping saves
        ungrouped = 1 - sum(row_lengths) / sum(len(b) * max(b) for b in
                                              (row_lengths[i:i + args.batch_size] for i in range(0, len(row_lengths), args.batch_size)))
        out[layout] = {"mean_row_tokens": round(statistics.fmean(row_lengths), 1), "padded_share_grouped": [round(s, 4) for s in shares],
                       "padded_share_grouped_mean": round(statistics.fmean(shares), 4), "padded_share_file_order": round(ungrouped, 4)}
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
