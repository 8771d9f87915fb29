"""A real training run's loss curve, stock ``trl.DPOTrainer`` against ``dpo-align``, overlaid.

Both train the default model with the same LoRA, seed and settings on the same pairs in the
same (sequential) order, at ``--precision`` (fp32, or bf16 autocast as the default on a CPU
that has it):
stock TRL with its defaults (two padded rows per pair, a reference forward at every step),
``SharedPromptDPOTrainer`` with its layout and cached reference log-probs. The sampler is
sequential in both so that step k sees the same four pairs; dpo-align's own default groups
pairs by length instead. Writes ``loss-overlay-<precision>.png`` and ``.json``.

In fp32 the curves must coincide. In bf16 they differ a little from step 1: a summed
log-prob computed in bf16 depends on which other pairs share its batch (up to ~0.4 nats
on the default model), and the cached reference was computed in other batches than the
training step, while stock TRL computes its reference in the same batch as the policy.

    python benchmarks/loss_overlay.py --data ../shared/data/splits/train-pool.jsonl.gz --steps 20 --precision fp32 -o results/
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run(trainer_class, model_path: str, dataset, tokenizer, steps: int, output: Path, bf16: bool, **extra) -> list[dict]:
    import torch
    from peft import LoraConfig
    from trl import DPOConfig

    from dpo_align.core.models import load_model
    from dpo_align.train.run import frozen_linears_to

    args = DPOConfig(output_dir=str(output), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-5, warmup_steps=0.1,
                     lr_scheduler_type="cosine", report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
                     max_length=512, seed=42, train_sampling_strategy="sequential", bf16=bf16,
                     precompute_ref_log_probs=trainer_class.__name__ != "DPOTrainer")
    model = load_model(model_path, dtype=torch.float32)
    if trainer_class.__name__ != "DPOTrainer" and bf16:
        frozen_linears_to(model, torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, **extra)
    started = time.perf_counter()
    trainer.train()
    print(f"{trainer_class.__name__}: {time.perf_counter() - started:.1f} s", flush=True)
    return [log for log in trainer.state.log_history if "loss" in log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("-o", "--output", default="results")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from trl import DPOTrainer

    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.data.fitting import fit_to_length
    from dpo_align.data.pairs import read_pairs, to_dataset
    from dpo_align.train.fast_dpo import SharedPromptDPOTrainer

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    pairs, _ = read_pairs([args.data])
    pairs, _ = fit_to_length(pairs[: args.steps * 4], tokenizer, "alpaca", 512)
    dataset = to_dataset(pairs, "alpaca", tokenizer).remove_columns("instruction")
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = args.precision == "bf16"
        stock = run(DPOTrainer, path, dataset, tokenizer, args.steps, Path(tmp) / "stock", bf16)
        ours = run(SharedPromptDPOTrainer, path, dataset, tokenizer, args.steps, Path(tmp) / "ours", bf16, group_by_length=False,
                   log=lambda m: None)

    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen")
    rows = [{"step": s["step"], **{f"stock {k}": s[k] for k in keys}, **{f"dpo-align {k}": o[k] for k in keys}} for s, o in zip(stock, ours, strict=True)]
    worst = max(abs(r["stock loss"] - r["dpo-align loss"]) for r in rows)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"loss-overlay-{args.precision}"
    (out / f"{name}.json").write_text(json.dumps({"steps": args.steps, "precision": args.precision, "max_abs_loss_diff": worst, "rows": rows},
                                                 indent=2) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("loss", "rewards/chosen"), strict=True):
        ax.plot(steps, [r[f"stock {key}"] for r in rows], "o-", label="stock trl.DPOTrainer", lw=2.5, alpha=0.6)
        ax.plot(steps, [r[f"dpo-align {key}"] for r in rows], "x--", label="dpo-align (shared prompt, cached reference)", color="black")
        ax.set_xlabel("step (4 pairs each, same pairs in both)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{args.model}, {args.steps} steps, {args.precision}: largest per-step loss difference {worst:.2e}")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    print(f"max_abs_loss_diff={worst:.3e}")


if __name__ == "__main__":
    main()
