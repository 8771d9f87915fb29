"""What each training-speed lever moves, one at a time, measured side by side in one run.

The same pairs, drawn evenly across the whole length range of the training pool (after
fitting to max_length 512), go through one DPO-LoRA step per batch of 4 under a ladder of
configurations. Each rung adds one lever to the one above it:

  A  stock layout: two right-padded rows per pair (prompt + chosen, prompt + rejected),
     full-vocabulary logits at every position, a reference forward (adapter off) at every
     step, fp32 weights under bf16 autocast, random batches (TRL's layout, without its
     gradient checkpointing)
  B  + one row per pair, the prompt shared (logits still at every position)
  C  + logits only at the response positions
  D  + reference log-probs cached (no reference forward in the step)
  E  + frozen linear weights stored in bf16 (no re-cast at every call)
  F  + no PEFT input casts (LoRA inputs stay bf16 under autocast; not kept: no gain)
  G  + batches of similar length (the length-grouped sampler)
  H  F + pairs packed several to a row instead of G's grouping

(An attention split per pair, causal over prompt + chosen and the rejected tokens against
the prompt and themselves, so that no masked block is computed, measured 0.98x on top of G
and was removed; see results/train-throughput.md.)

Time is per pair, the best of `--repeats` passes over the same batches; peak RSS is the
process's. Run with nothing else on the machine:

    python benchmarks/train_levers.py --data ../shared/data/splits/train-pool.jsonl.gz --pairs 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import time
from pathlib import Path


def sample_pairs(data: str, tokenizer, n: int, max_length: int) -> list[dict]:
    """n pairs at evenly spaced quantiles of pair length: every length range is represented."""
    from dpo_align.data.fitting import fit_to_length
    from dpo_align.data.pairs import read_pairs, to_dataset

    pairs, _ = read_pairs([data])
    pairs, _ = fit_to_length(pairs, tokenizer, "alpaca", max_length)
    dataset = to_dataset(pairs, "alpaca", tokenizer)
    eos = [tokenizer.eos_token_id]
    tokenized = []
    for row in dataset:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        tokenized.append({"prompt_ids": prompt,
                          "chosen_ids": tokenizer(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"][len(prompt):] + eos,
                          "rejected_ids": tokenizer(row["prompt"] + row["rejected"], add_special_tokens=False)["input_ids"][len(prompt):] + eos})
    from dpo_align.core.pair_batch import pair_length

    tokenized.sort(key=lambda ex: pair_length(ex, max_length))
    step = (len(tokenized) - 1) / (n - 1)
    return [tokenized[round(i * step)] for i in range(n)]


def build_policy(path: str, bf16_weights: bool):
    """The default LoRA (r 16, alpha 32, all linear layers) on the model, patched for shared-prompt rows, in train mode."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dpo_align.core.models import load_model
    from dpo_align.core.pair_logps import add_pair_logps
    from dpo_align.train.run import frozen_linears_to

    model = load_model(path, dtype=torch.float32)
    if bf16_weights:
        frozen_linears_to(model, torch.bfloat16)
    add_pair_logps(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from peft.helpers import disable_input_dtype_casting
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.core.pair_batch import SharedPromptCollator, pair_length
    from dpo_align.core.pair_logps import model_inputs, pair_sums

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    examples = sample_pairs(args.data, tokenizer, args.pairs, args.max_length)
    lengths = [pair_length(ex, args.max_length) for ex in examples]
    random_order = list(range(len(examples)))
    random.Random(0).shuffle(random_order)
    grouped_order = sorted(range(len(examples)), key=lambda i: lengths[i])

    def batches(order):
        return [[examples[i] for i in order[k:k + args.batch_size]] for k in range(0, len(order), args.batch_size)]

    two_rows = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def stock_step(model, batch, _):
        b = two_rows(batch)
        labels = b["input_ids"][:, 1:]
        mask = b["completion_mask"][:, 1:].bool()

        def logps():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            return (logits.log_softmax(-1).gather(2, labels[..., None]).squeeze(-1) * mask).sum(1)

        with autocast():
            with torch.no_grad(), model.disable_adapter():
                logps()
            policy = logps()
        policy.sum().backward()

    def shared_step(model, batch, options):
        collate = SharedPromptCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, pack=options.get("pack", False))
        b = collate(batch)
        inputs = model_inputs(b)
        cast = contextlib.nullcontext() if options.get("input_casts", True) else disable_input_dtype_casting(model)

        def logps():
            if options.get("full_logits"):
                base = model.get_base_model()
                hidden = base.base_model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                         attention_mask=b["attention_mask"]).last_hidden_state
                log_softmax = base.get_output_embeddings()(hidden).float().log_softmax(-1)
                return log_softmax.reshape(-1, log_softmax.size(-1))[b["logp_index"], b["logp_targets"]].sum()
            return sum(x.sum() for x in pair_sums(model(**inputs).log_probs))

        with autocast(), cast:
            if options.get("ref_forward", True):
                with torch.no_grad(), model.disable_adapter():
                    logps()
            policy = logps()
        policy.backward()

    ladder = [
        ("A", "stock layout (two padded rows, full logits, reference forward each step)", False, stock_step, {}, random_order),
        ("B", "+ one row per pair, prompt shared", False, shared_step, {"full_logits": True}, random_order),
        ("C", "+ logits at response positions only", False, shared_step, {}, random_order),
        ("D", "+ reference log-probs cached", False, shared_step, {"ref_forward": False}, random_order),
        ("E", "+ frozen linear weights in bf16", True, shared_step, {"ref_forward": False}, random_order),
        ("F", "+ no PEFT input casts", True, shared_step, {"ref_forward": False, "input_casts": False}, random_order),
        ("G", "+ length-grouped batches", True, shared_step, {"ref_forward": False, "input_casts": False}, grouped_order),
        ("H", "F + packing instead of G's grouping", True, shared_step, {"ref_forward": False, "input_casts": False, "pack": True}, random_order),
    ]
    models = {}
    results = []
    for key, label, bf16_weights, step, options, order in ladder:
        if bf16_weights not in models:
            models[bf16_weights] = build_policy(path, bf16_weights)
        model = models[bf16_weights]
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in batches(order):
                step(model, batch, options)
                model.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - start)
        results.append({"rung": key, "lever": label, "seconds": round(best, 2), "pairs_per_s": round(len(examples) / best, 3)})
        # each rung against the one it adds a lever to (H replaces G's grouping, so it is compared with F)
        previous = next(r["seconds"] for r in results if r["rung"] == "F") if key == "H" else results[max(len(results) - 2, 0)]["seconds"]
        print(f"{key}  {label:75s} {best:7.2f} s  {len(examples) / best:6.3f} pairs/s  x{previous / best:5.2f} vs previous  "
              f"x{results[0]['seconds'] / best:5.2f} vs A", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"pairs={len(examples)} length_min={min(lengths)} length_p50={sorted(lengths)[len(lengths) // 2]} length_max={max(lengths)} "
          f"torch_threads={torch.get_num_threads()} peak_rss_gb={peak_gb:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rungs": results, "pairs": len(examples), "lengths": lengths, "peak_rss_gb": round(peak_gb, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
