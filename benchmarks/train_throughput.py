"""Training throughput of ``dpo-align train`` against stock ``trl.DPOTrainer``, side by side.

Both train the same model with the same LoRA (r 16, alpha 32, dropout 0.05, all linear
layers), on the same first N pairs of the same data, rendered with the same template, at
the same batch size, for the same number of steps:

* stock: ``DPOTrainer`` with ``DPOConfig``'s own defaults for everything else (on this CPU
  that means bf16 autocast, gradient checkpointing on, max_length 1024), plus
  ``use_cpu=True``, without which its bf16 default refuses to start on a CPU;
* dpo-align: ``dpo_align.train.train`` with its defaults (precision auto, no gradient
  checkpointing, prompts fitted to max_length 512 from the left).

Time is the Trainer's own ``train_runtime`` (the training loop, not model loading). Tokens
are TRL's ``num_tokens`` count of the tokens each trainer actually fed. The last line is
``speedup=<dpo-align pairs/s ÷ stock pairs/s>``.

    python benchmarks/train_throughput.py --data ../shared/data/splits/train-pool.jsonl.gz --steps 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def stock_trl(model_path: str, dataset, steps: int, batch_size: int, output: Path) -> dict:
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dpo_align.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    args = DPOConfig(output_dir=str(output), per_device_train_batch_size=batch_size, max_steps=steps,
                     report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available())  # stock bf16 default refuses a CPU otherwise
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    tokens = max((log.get("num_tokens", 0) for log in trainer.state.log_history), default=0)
    return {"seconds": result.metrics["train_runtime"], "tokens": tokens,
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "max_length": args.max_length}


def dpo_align_train(model: str, data: str, pairs: int, steps: int, batch_size: int, output: Path) -> dict:
    from dpo_align.train import train
    from dpo_align.train_config import TrainConfig

    config = TrainConfig(model=model, data=[data], max_pairs=pairs, max_steps=steps, batch_size=batch_size,
                         output_dir=str(output), logging_steps=1, save_steps=10_000).validate()
    manifest = train(config, progress=lambda m: None)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    tokens = max((r.get("num_tokens", 0) for r in rows), default=0)
    return {"seconds": manifest["train_runtime_s"], "tokens": tokens, "precision": manifest["precision"],
            "max_length": config.max_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from dpo_align.data import read_pairs, to_dataset
    from dpo_align.models import load_tokenizer, resolve_model

    model_path = resolve_model(args.model)
    pairs_needed = args.steps * args.batch_size
    pairs, _ = read_pairs([args.data])
    dataset = to_dataset(pairs[:pairs_needed], "alpaca", load_tokenizer(model_path)).remove_columns("instruction")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stock = stock_trl(model_path, dataset, args.steps, args.batch_size, Path(tmp) / "stock")
        ours = dpo_align_train(args.model, args.data, pairs_needed, args.steps, args.batch_size, Path(tmp) / "ours")
        total = time.perf_counter() - start

    numbers = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "pairs": pairs_needed,
               "torch_threads": torch.get_num_threads(), "benchmark_wall_s": round(total, 1)}
    for name, run in (("stock_trl", stock), ("dpo_align", ours)):
        for key, value in run.items():
            numbers[f"{name}_{key}"] = round(value, 2) if isinstance(value, float) else value
        numbers[f"{name}_pairs_per_s"] = round(pairs_needed / run["seconds"], 3)
        numbers[f"{name}_tokens_per_s"] = round(run["tokens"] / run["seconds"], 1)
    for key, value in numbers.items():
        print(f"{key}={value}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    print(f"speedup={numbers['dpo_align_pairs_per_s'] / numbers['stock_trl_pairs_per_s']:.3f}")


if __name__ == "__main__":
    main()
