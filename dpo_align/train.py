"""``dpo-align train``: DPO with a LoRA adapter, through TRL's DPOTrainer and PEFT.

Read top to bottom: prepare the output folder, read and render the pairs, check them
against the scoring suite, fit them to ``max_length``, build the trainer, train (resuming
if asked), then write the adapter, curves, model card and the run manifest, in that
order: ``manifest.json`` is written last and says the run is complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from dpo_align.callbacks import (
    SETTINGS_FILE,
    CheckpointMarker,
    GracefulInterrupt,
    MetricsFile,
    PairsProgress,
    checkpoints,
    latest_checkpoint,
    truncate_metrics,
)
from dpo_align.data import Pair, read_pairs, to_dataset
from dpo_align.decontaminate import overlap, suite_instructions
from dpo_align.errors import TrainingDiverged, UserError
from dpo_align.files import atomic_write_json, atomic_write_text
from dpo_align.folder_lock import locked
from dpo_align.models import load_model, load_tokenizer, resolve_model
from dpo_align.plots import plot_runs, read_metrics
from dpo_align.provenance import git_commit, machine, model_revision, package_versions
from dpo_align.templates import render_prompt, render_response
from dpo_align.train_config import TrainConfig, settings_diff

RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl")
# The statistics shown in summaries (TRL's log keys): DPO loss, rewards, margin, accuracy.
SUMMARY_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint."""

    def __init__(self, checkpoint: Path | None, output_dir: Path):
        self.checkpoint, self.output_dir = checkpoint, output_dir
        where = f"a checkpoint is in {checkpoint}" if checkpoint else "no checkpoint was reached yet"
        super().__init__(f"Training interrupted; {where}. Resume with:\n    dpo-align train --output-dir {output_dir} --resume")


# --------------------------------------------------------------------------- output folder


def prepare_output_dir(output: Path, *, overwrite: bool, resume: bool) -> None:
    if resume:
        if not (output / "config.yaml").is_file():
            raise UserError(f"--resume: {output} holds no run to resume (no config.yaml). Start it without --resume.")
        return
    if output.exists() and not output.is_dir():
        raise UserError(f"--output-dir {output} is a file. Choose a directory.")
    if output.is_dir() and any(output.iterdir()):
        is_run = any((output / name).exists() for name in RUN_FILES) or bool(checkpoints(output))
        if not overwrite:
            raise UserError(
                f"--output-dir {output} is not empty. Pass --overwrite to replace the run there, --resume to continue it, "
                "or choose another directory."
            )
        if not is_run:
            raise UserError(f"--overwrite: {output} does not look like a dpo-align run folder, so it is left alone. Choose another directory.")
        shutil.rmtree(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--output-dir {output}: cannot write there ({err.strerror}). Choose a writable directory with free space.") from None


# --------------------------------------------------------------------------- data


def fit_to_length(pairs: list[Pair], tokenizer, template: str, max_length: int) -> tuple[list[Pair], Counter]:
    """Shorten prompts from the left (oldest dialogue first) so prompt + response fits.

    The template around the instruction is kept whole. A prompt may keep at most what the
    longer response leaves free, and never less than half of ``max_length``; responses
    still too long are cut at the end by TRL's collator. Both are counted.
    """
    stats = Counter()
    if not pairs:
        return pairs, stats

    def lengths(texts):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    prompts = [render_prompt(p.instruction, template, tokenizer) for p in pairs]
    prompt_len = lengths(prompts)
    response_len = [max(a, b) + 1 for a, b in zip(  # + 1 for the EOS token TRL appends
        lengths([render_response(p.chosen, template) for p in pairs]),
        lengths([render_response(p.rejected, template) for p in pairs]), strict=True)]
    fitted = []
    for pair, n_prompt, n_response in zip(pairs, prompt_len, response_len, strict=True):
        if n_prompt + n_response <= max_length:
            fitted.append(pair)
            continue
        budget = max(max_length - n_response, max_length // 2)
        if n_prompt > budget:
            ids = tokenizer(pair.instruction, add_special_tokens=False)["input_ids"]
            overhead = n_prompt - len(ids)
            keep = max(budget - overhead, 1)
            pair = dataclasses.replace(pair, instruction=tokenizer.decode(ids[-keep:]).lstrip())
            stats["prompt truncated from the left"] += 1
            n_prompt = len(tokenizer(render_prompt(pair.instruction, template, tokenizer), add_special_tokens=False)["input_ids"])
        if n_prompt + n_response > max_length:
            stats["response truncated at the end"] += 1
        fitted.append(pair)
    return fitted, stats


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "bf16"
    return "fp32"


def frozen_linears_to(model, dtype) -> None:
    """Store the frozen linear weights of the backbone in ``dtype`` (bf16): autocast would
    otherwise re-cast them from fp32 at every call. Norms, embeddings (tied to the LM head)
    and the residual stream stay fp32; LoRA weights and optimizer state are created in fp32."""
    import torch

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(dtype)


def take_pairs(pairs: list, n: int, how: str, seed: int) -> list:
    """The first ``n`` pairs, or ``n`` drawn uniformly without replacement (kept in file order)."""
    if how == "first" or n >= len(pairs):
        return pairs[:n]
    import random

    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress=print) -> dict:
    """Train one adapter; the output folder is locked for the run (one writer per folder)."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` the main process holds the lock
        return _train(config, resume=resume, overwrite=overwrite, progress=progress)
    with locked(Path(config.output_dir), "dpo-align train"):
        return _train(config, resume=resume, overwrite=overwrite, progress=progress)


def _train(config: TrainConfig, *, resume: bool, overwrite: bool, progress) -> dict:
    import warnings

    import torch
    from accelerate import PartialState
    from peft import LoraConfig
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig

    from dpo_align.fast_dpo import SharedPromptDPOTrainer

    # Deprecation chatter from transformers/peft/trl is not actionable for users of this tool.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

    started = time.time()
    output = Path(config.output_dir)
    # Under `accelerate launch` every process runs this function; only the main one
    # touches the output folder, the others wait for it.
    use_cuda = torch.cuda.is_available()
    state = PartialState(cpu=not use_cuda)  # the same state TrainingArguments(use_cpu=...) makes
    main = state.is_main_process
    if not main:
        progress = _silent
    if resume and (output / "manifest.json").is_file():
        raise UserError(f"--resume: the run in {output} already finished. Use --overwrite to train it again, or another --output-dir.")
    if main:
        prepare_output_dir(output, overwrite=overwrite, resume=resume)
        atomic_write_text(output / "config.yaml", config.to_yaml())
    state.wait_for_everyone()
    resume_from = latest_checkpoint(output) if resume else None
    if resume_from is not None and (resume_from / SETTINGS_FILE).is_file():
        # config.yaml can be edited; the checkpoint's own copy says what it was trained with
        stored = json.loads((resume_from / SETTINGS_FILE).read_text())
        changed = settings_diff(stored, config)
        if changed:
            detail = ", ".join(f"{k}: {stored.get(k)!r} in {resume_from.name}, {getattr(config, k)!r} now" for k in changed)
            raise UserError(f"--resume: the settings differ from those {resume_from} was trained with ({detail}). A resumed run "
                            f"continues exactly as it started: restore them in {output / 'config.yaml'}, or start a new run "
                            "(--overwrite, or another --output-dir).")
    set_seed(config.seed)

    # Model path and tokenizer first: a wrong model name should fail before data work.
    with state.main_process_first():  # the built-in model is converted once, by the main process
        model_path = resolve_model(config.model, progress=progress)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)

    pairs, report = read_pairs(config.data, split=config.split, skip_bad_rows=config.skip_bad_rows)
    progress(f"Read {report.rows_read} rows, kept {report.rows_kept} pairs"
             + (f" (skipped: {', '.join(f'{k}: {v}' for k, v in report.skipped.most_common())})" if report.skipped else ""))

    suite = suite_instructions(config.eval_suite_data_dir, config.eval_suite_pku_path)
    found = overlap([p.instruction for p in pairs], suite)
    contamination = {name: len(idx) for name, idx in found.items()}
    if suite:
        progress("Training prompts also in the scoring suite: "
                 + ", ".join(f"{name} {n}" for name, n in contamination.items())
                 + (" (dropping them)" if config.drop_eval_overlap else " (use --drop-eval-overlap to drop them)"))
    if config.drop_eval_overlap:
        drop = {i for idx in found.values() for i in idx}
        pairs = [p for i, p in enumerate(pairs) if i not in drop]
    if config.max_pairs is not None:
        pairs = take_pairs(pairs, config.max_pairs, config.pair_sample, config.seed)
    pairs, truncation = fit_to_length(pairs, tokenizer, config.template, config.max_length)
    if truncation:
        progress("Fitted to --max-length: " + ", ".join(f"{k}: {v}" for k, v in truncation.items()))
    train_dataset = to_dataset(pairs, config.template, tokenizer).remove_columns("instruction")

    eval_dataset, eval_report = None, None
    if config.eval_data:
        eval_pairs, eval_report = read_pairs(config.eval_data, split="test", skip_bad_rows=config.skip_bad_rows)
        if config.eval_max_pairs is not None:
            eval_pairs = eval_pairs[: config.eval_max_pairs]
        eval_pairs, _ = fit_to_length(eval_pairs, tokenizer, config.template, config.max_length)
        eval_dataset = to_dataset(eval_pairs, config.template, tokenizer).remove_columns("instruction")

    precision = resolve_precision(config.precision)
    model = load_model(model_path, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, dtype=torch.float32)
    if precision == "bf16":
        frozen_linears_to(model, torch.bfloat16)
    peft_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(","),
        task_type="CAUSAL_LM",
    )
    args = DPOConfig(
        output_dir=str(output),
        beta=config.beta,
        loss_type=[config.loss_type],
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        seed=config.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not use_cuda,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=config.eval_steps,
        report_to=[] if config.report_to == "none" else [config.report_to],
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Small models fit without recomputing activations; recomputation costs ~30% speed.
        gradient_checkpointing=False,
        # The reference is the base model (adapter off): its log-probs are computed once per pair
        # and cached on disk (dpo_align/ref_logps.py), not recomputed at every step.
        precompute_ref_log_probs=True,
        trust_remote_code=config.trust_remote_code,
    )
    interrupt = GracefulInterrupt()
    pairs_per_step = config.batch_size * config.grad_accum
    setup_started = time.time()
    trainer = SharedPromptDPOTrainer(
        model=model,
        log=progress,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsFile(output / "metrics.jsonl"), PairsProgress(pairs_per_step), CheckpointMarker(dataclasses.asdict(config)), interrupt],
    )
    trainer.setup_s = round(time.time() - setup_started, 1)  # tokenization and the reference pass (or its cache)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)

    if resume and main:
        step = int(resume_from.name.removeprefix("checkpoint-")) if resume_from else 0
        for newer_step, path in checkpoints(output):  # incomplete checkpoints newer than the resume point
            if newer_step > step:
                shutil.rmtree(path, ignore_errors=True)
        truncate_metrics(output / "metrics.jsonl", step)
        progress(f"Resuming from {resume_from}" if resume_from else "No complete checkpoint yet: starting from the beginning.")
    state.wait_for_everyone()

    # Ctrl-C is handled until the manifest is written: during training it stops at the next
    # step with a checkpoint; once training is done, the outputs are finished first.
    interrupt.install()
    try:
        if resume_from is not None and _is_final(resume_from):
            # Killed after the last step was saved but before the outputs were written: the
            # Trainer would run one step too many from here, so take the final adapter as is.
            result = _restore_final(trainer, resume_from)
        else:
            try:
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except TrainingDiverged as err:
                raise TrainingDiverged(err.step, err.what, err.value, str(output)) from None
        if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(latest_checkpoint(output), output)
        return _write_outputs(config, trainer, tokenizer, result, output=output, main=main, started=started, model_path=model_path,
                              report=report, eval_report=eval_report, truncation=truncation, contamination=contamination,
                              precision=precision, use_cuda=use_cuda, resume_from=resume_from, train_size=len(train_dataset),
                              progress=progress)
    finally:
        interrupt.uninstall()


def _is_final(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] > 0


def _restore_final(trainer, checkpoint: Path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, float("nan"), {"train_runtime": 0.0})


def _write_outputs(config, trainer, tokenizer, result, *, output, main, started, model_path, report, eval_report, truncation,
                   contamination, precision, use_cuda, resume_from, train_size, progress=print) -> dict:
    # ---- outputs: adapter and tokenizer, curves, model card, manifest (last)
    trainer.save_model(str(output))  # the Trainer writes from the main process only
    if not main:
        return {}
    tokenizer.save_pretrained(str(output))
    (output / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml holds the settings
    rows = read_metrics(output / "metrics.jsonl")
    plots = plot_runs({output.name: rows}, output / "plots")
    final_train = next((r for r in reversed(rows) if "loss" in r), {})
    final_eval = next((r for r in reversed(rows) if "eval_loss" in r), {})
    manifest = {
        "status": "complete",
        "command": "dpo-align train --config config.yaml",
        "model": {"name": config.model, "path": model_path, "revision": model_revision(model_path)},
        "adapter": model_revision(str(output)),
        "data": report.as_dict(),
        "eval_data": eval_report.as_dict() if eval_report else None,
        "pairs_trained_on": train_size,
        "length_fitting": dict(truncation),
        "eval_suite_overlap": contamination,
        "dropped_eval_overlap": config.drop_eval_overlap,
        "seed": config.seed,
        "precision": precision,
        "device": "cuda" if use_cuda else "cpu",
        "machine": machine(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "global_steps": trainer.state.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "trainer_setup_s": trainer.setup_s,
        "reference_logps": trainer.ref_logps_report,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "wall_time_s": round(time.time() - started, 1),
        "final_train": final_train,
        "final_eval": final_eval,
        "plots": [str(p.relative_to(output)) for p in plots],
    }
    atomic_write_text(output / "README.md", model_card(config, manifest))
    atomic_write_json(output / "manifest.json", manifest)
    # The finished adapter is saved; optimizer state is only for resuming. With keep_checkpoints
    # each checkpoint keeps its adapter and trainer_state.json (a learning curve scores them).
    for _, path in checkpoints(output):
        if not config.keep_checkpoints:
            shutil.rmtree(path, ignore_errors=True)
            continue
        for item in path.iterdir():
            if not (item.name.startswith("adapter_") or item.name in ("trainer_state.json", "README.md")):
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    write_report_safely(output, progress, generations=config.report_generations)
    return manifest


def write_report_safely(folder: Path, progress, generations: int = 3) -> None:
    """report.html / report.md at the end of a run or sweep; a failure here never fails the run."""
    from dpo_align.report import write_report

    try:
        progress(f"Report: {write_report(folder, generations=generations, progress=progress)}")
    except Exception as err:  # the results are written; the report can be rebuilt with `dpo-align report`
        progress(f"Warning: the report could not be written ({type(err).__name__}: {err}). Rebuild it with: dpo-align report {folder}")


def _silent(message: str) -> None:
    pass


def model_card(config: TrainConfig, manifest: dict) -> str:
    """A Hugging Face style model card for the adapter."""
    settings = dataclasses.asdict(config)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
    stats = {**{f"train {k}": v for k, v in manifest["final_train"].items() if k in SUMMARY_KEYS},
             **{k.replace("eval_", "held-out "): v for k, v in manifest["final_eval"].items() if k.removeprefix("eval_") in SUMMARY_KEYS}}
    stat_rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items())
    base = manifest["model"]["name"]
    return f"""---
base_model: {base}
library_name: peft
tags: [dpo, lora, trl, dpo-align]
---

# DPO LoRA adapter for {base}

Trained with `dpo-align train` (TRL `DPOTrainer`, PEFT LoRA) on {manifest['pairs_trained_on']} preference pairs
from {', '.join(config.data)}, rendered with the `{config.template}` template. {manifest['global_steps']} optimizer steps,
{manifest['train_runtime_s']} s on {manifest['device']} ({manifest['precision']}).

## Use

```bash
dpo-align eval {base} --peft {config.output_dir}
lm_eval --model hf --model_args pretrained={manifest['model']['path']},peft={config.output_dir} \\
  --include_path lm_eval_tasks --tasks dpo_ppl_suite
dpo-align merge {config.output_dir} --output merged/   # a standalone checkpoint
```

## Final statistics

| statistic | value |
|---|---|
{stat_rows}

Curves: {', '.join(f'`{p}`' for p in manifest['plots'])}.

## Training settings

| setting | value |
|---|---|
{rows}

Repeat this run with `dpo-align train --config {config.output_dir}/config.yaml --overwrite`.
Data files, their sha256 and skip counts, package versions and the git commit are in `manifest.json`.
"""


