"""Scoring throughput of the dpo_ppl suite through lm-eval, against the forward-pass ceiling.

Both are measured in one run, on the same model, the same documents and the same batch size:

1. suite: `dpo-align eval`'s path (lm-eval's ``hf`` model and our tasks), timed end to end
   around ``simple_evaluate`` (tokenizing, batching, forward, log-softmax, bookkeeping);
2. ceiling: the same token sequences, sorted longest-first and padded into batches of the
   same size, through a plain ``model(input_ids)`` under ``torch.inference_mode``: the
   cost no scorer can beat on this machine with this model and batch size.

Rate = scored response tokens per second. The last line printed is
``fraction_of_ceiling=<suite rate / ceiling rate>``.

    python benchmarks/eval_throughput.py --limit 64 --data-dir ../shared/data \
        --pku-path ../shared/data/splits/heldout.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def token_batches(model_path: str, docs: list[tuple[str, str]], batch_size: int):
    """Encode (context, continuation) as lm-eval does, sort longest first, and batch."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm_eval_tasks"))
    from dpo_ppl import continuation_token_count

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    seqs, scored = [], 0
    for context, continuation in docs:
        ids = tokenizer.encode(context + continuation)
        seqs.append(ids[:-1])  # the last token is only a target, as in lm-eval
        scored += continuation_token_count(tokenizer, context, continuation)
    seqs.sort(key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = len(chunk[0])
        batches.append(torch.tensor([s + [pad] * (width - len(s)) for s in chunk]))
    return batches, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=64, help="documents per dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pku-path", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    from dpo_align.evaluate import ModelSpec, ScoreOptions, score
    from dpo_align.models import load_model, resolve_model

    path = resolve_model(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else None

    # 1. the suite through lm-eval
    start = time.perf_counter()
    options = ScoreOptions(limit=args.limit, data_dir=args.data_dir, pku_path=args.pku_path, batch_size=args.batch_size,
                           device="cpu", dtype=args.dtype)
    results = score(ModelSpec(args.model, path), options)
    suite_seconds = time.perf_counter() - start
    docs = [(s["doc"]["context"], s["doc"]["continuation"]) for task in results["samples"].values() for s in task]
    suite_tokens = sum(s["ce"][1] for task in results["samples"].values() for s in task)

    # 2. the ceiling: the same sequences, plain batched forward
    batches, scored = token_batches(path, docs, args.batch_size)
    assert scored == suite_tokens, (scored, suite_tokens)
    model = load_model(path, dtype=dtype).eval()
    with torch.inference_mode():
        model(batches[-1])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        ceiling_seconds = time.perf_counter() - start

    suite_rate, ceiling_rate = suite_tokens / suite_seconds, scored / ceiling_seconds
    numbers = {
        "model": args.model, "documents": len(docs), "batch_size": args.batch_size, "dtype": args.dtype,
        "scored_tokens": suite_tokens, "suite_seconds": round(suite_seconds, 2), "ceiling_seconds": round(ceiling_seconds, 2),
        "suite_tokens_per_s": round(suite_rate, 1), "ceiling_tokens_per_s": round(ceiling_rate, 1),
        "torch_threads": torch.get_num_threads(),
    }
    for key, value in numbers.items():
        print(f"{key}={value}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"fraction_of_ceiling={suite_rate / ceiling_rate:.3f}")


if __name__ == "__main__":
    main()
