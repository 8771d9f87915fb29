"""Training throughput of ``dpo-align train`` against stock ``trl.DPOTrainer``, side by side in one run.

Every trainer gets the same model, the same LoRA (r 16, alpha 32, dropout 0.05, all linear
layers), the same pairs, the same batch size and the same number of steps. The pairs are
drawn at evenly spaced quantiles of pair length over the whole training pool (after fitting
to 512 tokens), so every length range is represented. Each trainer runs in its own process,
one after another, so its peak resident memory is its own:

* ``stock``: ``DPOTrainer`` with ``DPOConfig``'s defaults (on this CPU: bf16 autocast,
  gradient checkpointing on, a reference forward at every step), plus ``use_cpu=True``;
* ``stock_best``: the same with its best flags, ``precompute_ref_log_probs=True`` and
  gradient checkpointing off, and ``max_length`` 512 like dpo-align's (equal work: stock's
  default 1024 keeps more of the longest responses);
* ``dpo_align_cold``: ``dpo_align.train.run.train`` with its defaults and an empty reference cache;
* ``dpo_align_warm``: the same run again, reusing the cached reference log-probs (what every
  later run of a sweep, a resume or a re-run gets).

Time is trainer set-up (tokenization and any reference pass) plus the training loop; model
loading is left out of every figure. Model-FLOPs utilisation counts 6N FLOPs per pair token
kept at max_length 512 (prompt + chosen + rejected: 4N for the policy's forward and
backward, 2N for the reference's forward, N = base parameters) against the peak every run's MFU uses
(this CPU's matmul rate in dpo-align's precision, measured by the benchmark before the trainers run; each run's own
``run_mfu`` uses the cached peak of ``dpo_align.train.throughput.peak_flops``, recorded beside it). ``tokens_fed`` is TRL's own ``num_tokens`` count (padding
excluded; stock TRL feeds each prompt twice). ``speedup`` is dpo-align cold pairs/s ÷ stock pairs/s;
``sft_vs_dpo_cold``/``_warm`` SFT alone against DPO; ``rpo_vs_dpo_warm`` RPO against DPO, both on a warm reference
cache; ``two_stage_vs_dpo_cold`` the whole two-stage command against DPO cold; ``tiled_vs_untiled_head_warm`` the CPU
head in row tiles against the one-tile head it replaced (``dpo_align_untiled``, warm too; compare their peak RSS). ``stock_fp32`` is stock TRL's defaults
with ``bf16=False`` (``speedup_vs_stock_fp32``): the fair stock figure on a CPU without AVX512-BF16, where the default
bf16 autocast is emulated and dpo-align's ``--precision auto`` trains fp32. ``--only`` runs a subset of the trainers.

    python benchmarks/train_throughput.py --data ../shared/data/splits/train-pool.jsonl.gz --steps 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def write_sample(data: str, model: str, pairs: int, max_length: int, path: Path) -> dict:
    """Pairs at evenly spaced length quantiles, as plain prompt/chosen/rejected rows (already fitted)."""
    import random

    from dpo_align.core.models import load_tokenizer, resolve_model
    from dpo_align.data.fitting import fit_to_length
    from dpo_align.data.pairs import read_pairs
    from dpo_align.data.templates import render_prompt, render_response

    tokenizer = load_tokenizer(resolve_model(model))
    every, _ = read_pairs([data])
    every, _ = fit_to_length(every, tokenizer, "alpaca", max_length)

    def count(texts):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def fitted(p, c, r):  # the tokens a trainer with max_length keeps: (prompt + response)[:max_length], each side
        p = min(p, max_length)
        return p + min(c + 1, max_length - p) + min(r + 1, max_length - p)  # + 1: the EOS token TRL appends

    lengths = [fitted(*x) for x in zip(count([render_prompt(p.instruction, "alpaca", tokenizer) for p in every]),
                                       count([render_response(p.chosen, "alpaca") for p in every]),
                                       count([render_response(p.rejected, "alpaca") for p in every]), strict=True)]
    order = sorted(range(len(every)), key=lambda i: lengths[i])
    step = (len(order) - 1) / (pairs - 1)
    chosen = [order[round(i * step)] for i in range(pairs)]
    random.Random(0).shuffle(chosen)
    path.write_text("".join(json.dumps({"prompt": every[i].instruction, "chosen": every[i].chosen, "rejected": every[i].rejected}) + "\n"
                            for i in chosen))
    picked = sorted(lengths[i] for i in chosen)
    return {"pool_pairs": len(every), "sample_tokens": sum(picked), "length_min": picked[0], "length_p50": picked[len(picked) // 2],
            "length_max": picked[-1]}


# --------------------------------------------------------------------------- one trainer per process


# every trainer the benchmark knows, on the same pairs: dpo_align_sft is SFT alone (no reference pass, no rejected half);
# dpo_align_rpo is RPO (sigmoid + sft, weights 1 + 1) on the reference cache dpo_align_cold left warm; dpo_align_two_stage is
# SFT on all the pairs, then DPO from the merged SFT model with it as the reference (its reference pass is cold: new weights);
# dpo_align_untiled is dpo_align_warm with the CPU head as it was before it ran in row tiles (one [N, vocab] log-softmax kept
# for the backward pass): the tiles' cost or gain in time, and their saving in memory
TRAINERS = ("stock", "stock_best", "stock_fp32", "dpo_align_cold", "dpo_align_warm", "dpo_align_untiled", "dpo_align_sft", "dpo_align_rpo",
            "dpo_align_two_stage")
RECIPES = {"dpo_align_cold": {}, "dpo_align_warm": {}, "dpo_align_untiled": {}, "dpo_align_sft": {"loss_type": "sft"},
           "dpo_align_rpo": {"loss_type": "sigmoid,sft", "loss_weights": "1,1"}, "dpo_align_two_stage": {"sft_first_pairs": "all"}}


def run_stock(sample: Path, model: str, steps: int, batch_size: int, best_flags: bool, output: Path, fp32: bool = False) -> dict:
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from dpo_align.core.models import load_model, load_tokenizer, resolve_model
    from dpo_align.data.pairs import read_pairs, to_dataset

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    pairs, _ = read_pairs([str(sample)])
    dataset = to_dataset(pairs, "alpaca", tokenizer).remove_columns("instruction")
    # best flags, and max_length 512 as dpo-align's default, so that both keep the same tokens (equal work)
    flags = {"precompute_ref_log_probs": True, "gradient_checkpointing": False, "max_length": 512} if best_flags else {}
    if fp32:  # its defaults but fp32: on a CPU without AVX512-BF16 its default bf16 autocast is emulated (and dpo-align trains fp32)
        flags["bf16"] = False
    args = DPOConfig(output_dir=str(output), per_device_train_batch_size=batch_size, max_steps=steps, report_to=[], save_strategy="no",
                     logging_steps=1, disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **flags)
    network = load_model(path, dtype=torch.float32)
    started = time.perf_counter()
    trainer = DPOTrainer(model=network, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    setup = time.perf_counter() - started
    result = trainer.train()
    return {"setup_s": setup, "train_s": result.metrics["train_runtime"],
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
            "tokens_fed": max(log.get("num_tokens", 0) for log in trainer.state.log_history),
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "max_length": args.max_length}


def run_dpo_align(sample: Path, model: str, steps: int, batch_size: int, output: Path, recipe: dict) -> dict:
    from dpo_align.train.config import TrainConfig
    from dpo_align.train.run import train

    recipe = dict(recipe)
    if recipe.get("sft_first_pairs") == "all":
        recipe["sft_first_pairs"] = steps * batch_size
    config = TrainConfig(model=model, data=[str(sample)], max_steps=steps, batch_size=batch_size, output_dir=str(output),
                         logging_steps=1, save_steps=10_000, **recipe).validate()
    started = time.perf_counter()
    manifest = train(config, overwrite=True, progress=lambda m: None)
    wall = time.perf_counter() - started
    if "stages" in manifest:  # two stages: the whole command's wall time (SFT, merge, reference pass, DPO), the second stage's numbers
        final = output / "stage-2"
        stage2 = json.loads((final / "manifest.json").read_text())
        return {"setup_s": 0.0, "train_s": wall, "losses": [], "tokens_fed": 0, "stage2_train_s": stage2["train_runtime_s"],
                "reference_pass_s": stage2["reference_logps"]["train"]["seconds"], "reference_cached": stage2["reference_logps"]["train"]["cached"],
                "precision": stage2["precision"], "max_length": config.max_length}
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"setup_s": manifest["trainer_setup_s"], "train_s": manifest["train_runtime_s"], "losses": [r["loss"] for r in rows if "loss" in r],
            "tokens_fed": max(r.get("num_tokens", 0) for r in rows),
            "reference_pass_s": manifest["reference_logps"]["train"]["seconds"], "reference_cached": manifest["reference_logps"]["train"]["cached"],
            "precision": manifest["precision"], "max_length": config.max_length,
            "run_tokens_per_s": manifest["throughput"]["tokens_per_s"], "run_mfu": manifest["throughput"]["mfu"]}


def peak_rss_gb() -> float:
    """This process's own peak: Linux's VmHWM (ru_maxrss carries the parent's peak across exec, when the parent's is higher)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args) -> None:
    output = Path(args.workdir) / args.child
    if args.child in ("stock", "stock_best", "stock_fp32"):
        result = run_stock(Path(args.sample), args.model, args.steps, args.batch_size, args.child == "stock_best", output,
                           fp32=args.child == "stock_fp32")
    else:
        if args.child == "dpo_align_untiled":
            from dpo_align.core import pair_logps

            pair_logps._frozen_linear = lambda head: False  # the head kernel "auto" picks on a CPU becomes the one-tile one
        result = run_dpo_align(Path(args.sample), args.model, args.steps, args.batch_size, output, RECIPES[args.child])
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--only", default=",".join(TRAINERS), help="comma-separated trainers to run (default: all, in this order)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sample", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from dpo_align.core.models import load_model, resolve_model

    pairs = args.steps * args.batch_size
    from dpo_align.train.throughput import body_parameters

    n_params = body_parameters(load_model(resolve_model(args.model), dtype=torch.float32))  # the N of 6 N, as every run counts it
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.jsonl"
        numbers = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "pairs": pairs, "params": n_params,
                   **write_sample(args.data, args.model, pairs, 512, sample)}
        # the peak of the precision dpo-align trains in here (bf16 where the CPU has it), as every run's MFU uses
        from dpo_align.train.run import resolve_precision
        from dpo_align.train.throughput import peak_flops

        numbers["precision"] = resolve_precision("auto")
        # the benchmark's own peak, measured now (it runs with the CPU to itself); every run's run_mfu field reads the
        # cached one (peak_flops), recorded beside it
        from dpo_align.train.throughput import measured_matmul_rate

        peak = measured_matmul_rate(torch.bfloat16 if numbers["precision"] == "bf16" else torch.float32)
        numbers["peak_source"] = "measured by this benchmark before the trainers ran"
        numbers["peak_gflops"] = round(peak / 1e9, 1)
        cached, numbers["run_peak_source"] = peak_flops("cpu", numbers["precision"])
        numbers["run_peak_gflops"] = round(cached / 1e9, 1)
        numbers["torch_threads"] = torch.get_num_threads()
        env = {**os.environ, "DPO_ALIGN_REF_CACHE": str(Path(tmp) / "ref-cache"), "TQDM_DISABLE": "1"}
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        if unknown := [name for name in chosen if name not in TRAINERS]:
            sys.exit(f"--only: {', '.join(unknown)} not among {', '.join(TRAINERS)}")
        for name in chosen:
            command = [sys.executable, __file__, "--child", name, "--sample", str(sample), "--workdir", tmp, "--model", args.model,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--data", args.data]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
            run = json.loads(line.removeprefix("RESULT "))
            run["total_s"] = run["setup_s"] + run["train_s"]
            for key, value in run.items():
                numbers[f"{name}_{key}"] = [round(v, 4) for v in value] if isinstance(value, list) else round(value, 3) if isinstance(value, float) else value
            numbers[f"{name}_pairs_per_s"] = round(pairs / run["total_s"], 3)
            numbers[f"{name}_mfu"] = round(6 * n_params * numbers["sample_tokens"] / run["total_s"] / (numbers["peak_gflops"] * 1e9), 4)

    def ratio(name, a, b):  # only between trainers that ran
        if f"{a}_pairs_per_s" in numbers and f"{b}_pairs_per_s" in numbers:
            numbers[name] = round(numbers[f"{a}_pairs_per_s"] / numbers[f"{b}_pairs_per_s"], 3)

    ratio("speedup", "dpo_align_cold", "stock")
    ratio("speedup_vs_stock_best", "dpo_align_cold", "stock_best")
    ratio("warm_speedup_vs_stock", "dpo_align_warm", "stock")
    ratio("speedup_vs_stock_fp32", "dpo_align_cold", "stock_fp32")
    ratio("warm_speedup_vs_stock_fp32", "dpo_align_warm", "stock_fp32")
    ratio("sft_vs_dpo_cold", "dpo_align_sft", "dpo_align_cold")
    ratio("sft_vs_dpo_warm", "dpo_align_sft", "dpo_align_warm")
    ratio("rpo_vs_dpo_warm", "dpo_align_rpo", "dpo_align_warm")  # both on a warm reference cache: the training steps alone
    ratio("two_stage_vs_dpo_cold", "dpo_align_two_stage", "dpo_align_cold")
    ratio("tiled_vs_untiled_head_warm", "dpo_align_warm", "dpo_align_untiled")
    if "dpo_align_warm_total_s" in numbers and "dpo_align_cold_total_s" in numbers:
        numbers["second_run_saves_s"] = round(numbers["dpo_align_cold_total_s"] - numbers["dpo_align_warm_total_s"], 1)
    for key, value in numbers.items():
        print(f"{key}={value}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
