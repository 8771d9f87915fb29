"""Does ``torch.compile`` speed up a dpo-align training step? Measured, with its compile time.

The same 32 pairs as ``train_levers.py`` (evenly spaced over the length range of the pool),
in length-grouped batches of 4, through the shared-prompt forward and backward (rung G of
``train_levers.py``): the best of two eager passes, then the backbone compiled in place with
``dynamic=True`` (first pass, compile included), then the best of two compiled passes.

    python benchmarks/train_compile.py --data ../shared/data/splits/train-pool.jsonl.gz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_levers import build_policy, sample_pairs

    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.core.pair_batch import SharedPromptCollator, pair_length
    from dpo_align.core.pair_logps import model_inputs, pair_sums

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    examples = sorted(sample_pairs(args.data, tokenizer, 32, 512), key=lambda e: pair_length(e, 512))
    collate = SharedPromptCollator(pad_token_id=tokenizer.pad_token_id, max_length=512)
    batches = [collate(examples[i:i + 4]) for i in range(0, 32, 4)]
    model = build_policy(path, bf16_weights=True)

    def one_pass() -> float:
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(**model_inputs(batch))
            sum(x.sum() for x in pair_sums(out.log_probs)).backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    eager = min(one_pass() for _ in range(2))
    print(f"eager={eager:.2f}", flush=True)
    model.get_base_model().base_model.compile(dynamic=True)
    first = one_pass()
    print(f"compiled_first_pass_incl_compile={first:.2f}", flush=True)
    compiled = min(one_pass() for _ in range(2))
    print(f"compiled={compiled:.2f}")
    print(f"compile_cost_s={first - compiled:.1f}")
    print(f"speedup={eager / compiled:.3f}")


if __name__ == "__main__":
    main()
