"""How much a summed log-prob depends on the batch it is computed in, under bf16 and fp32.

24 pairs at evenly spaced length quantiles of the pool; the default model with a fresh LoRA
adapter; each pair's summed chosen and rejected log-probs from the reference pass
(``ref_logps.compute``: pairs sorted by length, batches of up to 8,192 tokens) against the
same from training-like batches of 4 in dataset order. Prints the largest and mean absolute
difference per precision. This is why a precomputed reference cannot match the policy's
forward bit for bit under bf16 (results/train-throughput.md).

    python benchmarks/ref_batch_noise.py --data ../shared/data/splits/train-pool.jsonl.gz
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_levers import build_policy, sample_pairs

    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.core.pair_batch import SharedPromptCollator
    from dpo_align.core.pair_logps import model_inputs, pair_sums
    from dpo_align.train import ref_logps

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    examples = sample_pairs(args.data, tokenizer, 24, 512)
    dataset = Dataset.from_list(examples)
    collate = SharedPromptCollator(pad_token_id=tokenizer.pad_token_id, max_length=512)
    for precision in ("bf16", "fp32"):
        model = build_policy(path, bf16_weights=precision == "bf16").eval()
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        ref_chosen, ref_rejected = ref_logps.compute(model, dataset, max_length=512, pad_token_id=tokenizer.pad_token_id,
                                                     autocast=autocast, device="cpu")
        diffs = []
        for k in range(0, len(examples), 4):
            with torch.no_grad(), autocast():
                chosen, rejected = pair_sums(model(**model_inputs(collate(examples[k:k + 4]))).log_probs.float())
            diffs += (chosen - ref_chosen[k:k + 4]).abs().tolist() + (rejected - ref_rejected[k:k + 4]).abs().tolist()
        print(f"{precision}: max_abs_diff={max(diffs):.3g} mean_abs_diff={sum(diffs) / len(diffs):.3g} "
              f"mean_abs_logp={ref_chosen.abs().mean().item():.1f}")


if __name__ == "__main__":
    main()
