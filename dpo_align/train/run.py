"""``dpo-align train``: DPO with a LoRA adapter, through TRL's DPOTrainer and PEFT.

Read top to bottom: check the output folder, read and render the pairs, check them against
the scoring suite, fit them to ``max_length``, build the trainer, and only then create the
run folder (a run that fails while setting up leaves nothing behind); train (resuming if
asked), then write the adapter, curves, model card and the run manifest, in that order:
``manifest.json`` is written last and says the run is complete.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dpo_align.core.errors import TrainingDiverged, UserError
from dpo_align.core.files import atomic_write_json, atomic_write_text, named_write_errors, staged_files
from dpo_align.core.folder_lock import locked
from dpo_align.core.models import gguf_source, load_model, load_tokenizer, resolve_model
from dpo_align.core.plots import plot_runs, read_metrics
from dpo_align.core.provenance import git_commit, machine, model_revision, package_versions
from dpo_align.data.decontaminate import overlap, same_source_split, suite_instructions
from dpo_align.data.fitting import fit_to_length, take_pairs
from dpo_align.data.pairs import LoadReport, read_pairs, to_dataset
from dpo_align.data.templates import render_prompt, render_response
from dpo_align.train.callbacks import CheckpointMarker, GracefulInterrupt, MetricsFile, PairsProgress
from dpo_align.train.config import TrainConfig
from dpo_align.train.model_card import model_card
from dpo_align.train.run_folder import (
    DATA_KEY,
    check_checkpoint_data,
    check_checkpoint_settings,
    check_output_dir,
    is_final,
    latest_checkpoint,
    make_output_dir,
    prune_checkpoints,
    rewind_to,
)
from dpo_align.train.throughput import Throughput, body_parameters, peak_flops, run_summary


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint."""

    def __init__(self, checkpoint: Path | None, output_dir: Path):
        self.checkpoint, self.output_dir = checkpoint, output_dir
        where = f"a checkpoint is in {checkpoint}" if checkpoint else "no checkpoint was reached yet"
        super().__init__(f"Training interrupted; {where}. Resume with:\n    dpo-align train --output-dir {output_dir} --resume")


class InterruptedAfterFinishing(Interrupted):
    """Ctrl-C came in the last step or while the outputs were written: the run was finished first (its
    outputs are complete), and the caller stops there, as asked, rather than going on (a sweep to its scoring)."""

    def __init__(self, output_dir: Path):
        self.checkpoint, self.output_dir = None, output_dir
        Exception.__init__(self, f"Interrupted as the run was finishing: it finished, and its outputs are complete in {output_dir}.")


def check_fits_template(config: TrainConfig, tokenizer) -> None:
    """--max-length must leave room for a response after the template's own tokens."""
    overhead = len(tokenizer(render_prompt("", config.template, tokenizer) + render_response("", config.template),
                             add_special_tokens=False)["input_ids"])
    if config.max_length < overhead + 8:
        raise UserError(f"--max-length {config.max_length} leaves no room for the text: the {config.template} template alone takes "
                        f"{overhead} tokens of this tokenizer. Give at least {overhead + 8} (the default is 512).")


def check_lora_targets(config: TrainConfig, model_path: str) -> None:
    """Named --lora-targets must exist in the model; checked on an empty (meta) copy built from its config."""
    if config.lora_targets == "all-linear":
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    wanted = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    except Exception:  # an unusual architecture: PEFT will still check when it wraps the model
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    missing = [t for t in wanted if t not in names]
    if missing or not wanted:
        raise UserError(f"--lora-targets {config.lora_targets!r}: {', '.join(missing) or 'no names'} not found in {config.model}. "
                        f"Its linear layers are: {', '.join(linear)} (or give all-linear).")


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


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress=print, callbacks: tuple = ()) -> dict:
    """Train one adapter; the output folder is locked for the run (one writer per folder). ``callbacks``: more
    TrainerCallbacks, after the run's own (the search's pruner scores each checkpoint from one)."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` the main process holds the lock
        return _train(config, resume=resume, overwrite=overwrite, progress=progress, callbacks=callbacks)
    with locked(Path(config.output_dir), "dpo-align train", "--output-dir"):
        if config.sft_first_pairs is not None:  # SFT, merged, then the preference objective from it (two_stage.py)
            from dpo_align.train.two_stage import train_two_stage

            return train_two_stage(config, resume=resume, overwrite=overwrite, progress=progress, callbacks=callbacks)
        return _train(config, resume=resume, overwrite=overwrite, progress=progress, callbacks=callbacks)


def train_unless_finished(config: TrainConfig, *, where: str, progress=print, callbacks: tuple = ()) -> dict | None:
    """Bring ``config``'s run to its end, as the sweep, the search and each stage of a two-stage run do: a finished run
    (its manifest written) is kept and None returned; a started one (its config.yaml written) resumes from its latest
    checkpoint; anything else in the folder is replaced. Returns ``train``'s manifest. ``where`` names the run in the
    progress line."""
    run_dir = Path(config.output_dir)
    if (run_dir / "manifest.json").is_file():
        progress(f"{where}: already finished, kept.")
        return None
    resume = (run_dir / "config.yaml").is_file()
    progress(where + (": resuming" if resume else ""))
    return train(config, resume=resume, overwrite=not resume and run_dir.exists(), progress=progress, callbacks=callbacks)


# TrainConfig fields that DPOConfig takes as they are, under its own name (the rest is derived below)
DPO_ARGS = {
    "beta": "beta", "learning_rate": "learning_rate", "lr_scheduler": "lr_scheduler_type",
    # transformers 5 reads a fraction below 1 in warmup_steps as a ratio of the run's steps
    "warmup_ratio": "warmup_steps", "epochs": "num_train_epochs", "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps", "max_length": "max_length",
    "seed": "seed", "logging_steps": "logging_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "eval_steps": "eval_steps", "trust_remote_code": "trust_remote_code", "label_smoothing": "label_smoothing",
}


def dpo_args(config: TrainConfig, output: Path, *, precision: str, use_cuda: bool, evaluate: bool):
    """TRL's DPOConfig for this run: the mapped settings, then what follows from them and what this tool fixes."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output),
        **{arg: getattr(config, name) for name, arg in DPO_ARGS.items()},
        per_device_eval_batch_size=config.batch_size,
        loss_type=config.loss_types(),
        loss_weights=config.loss_weight_values(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not use_cuda,
        save_strategy="steps",
        eval_strategy="steps" if evaluate else "no",
        report_to=[] if config.report_to == "none" else [config.report_to],
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Small models fit without recomputing activations; recomputation costs ~30% speed.
        gradient_checkpointing=False,
        # The reference is the base model (adapter off): its log-probs are computed once per pair
        # and cached on disk (dpo_align/train/ref_logps.py), not recomputed at every step.
        precompute_ref_log_probs=True,
    )


@dataclass
class PreparedPairs:
    """The training pairs as trained on (before fitting to --max-length), and how they were chosen."""

    pairs: list
    report: LoadReport
    contamination: dict[str, int]  # training prompts also in each scoring set (before any were dropped)


def prepare_pairs(config: TrainConfig, progress=print) -> PreparedPairs:
    """Read the pairs, check them against the scoring suite (dropping overlaps if asked), take --max-pairs.

    The sweep's decontamination report reads the pairs through here too, so it describes what was trained on."""
    pairs, report = read_pairs(config.data, split=config.split, skip_bad_rows=config.skip_bad_rows)
    progress(f"Read {report.rows_read} rows, kept {report.rows_kept} pairs"
             + (f" (skipped: {', '.join(f'{k}: {v}' for k, v in report.skipped.most_common())})" if report.skipped else ""))
    warning = same_source_split(config.data, config.split, config.eval_suite_pku_path)
    if warning:
        progress(f"Warning: {warning}")
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
    return PreparedPairs(pairs, report, contamination)


def datasets_for(config: TrainConfig, prepared: PreparedPairs, tokenizer, progress):
    """(train dataset, its length fitting, eval dataset or None, eval report or None), rendered with the template."""
    pairs, truncation = fit_to_length(prepared.pairs, tokenizer, config.template, config.max_length)
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
    return train_dataset, truncation, eval_dataset, eval_report


def warmup_warning(config: TrainConfig, pairs: int, processes: int = 1) -> str | None:
    """A warmup that covers the whole run trains nothing: the learning rate is 0 at the first step and never leaves
    the warmup (``--max-steps 1`` with the default ``--warmup-ratio 0.1``)."""
    per_step = config.batch_size * config.grad_accum * processes
    steps = config.max_steps if config.max_steps > 0 else math.ceil(math.ceil(pairs / (config.batch_size * processes)) / config.grad_accum
                                                                   * config.epochs)
    warmup = math.ceil(config.warmup_ratio * steps)
    if config.warmup_ratio > 0 and warmup >= steps:
        return (f"--warmup-ratio {config.warmup_ratio:g} of a {steps}-step run ({pairs} pairs, {per_step} per step) is a warmup of "
                f"{warmup} step(s): the learning rate never leaves it, and the first step trains at 0. Give --warmup-ratio 0 or more steps.")
    return None


def build_trainer(config: TrainConfig, model_path: str, tokenizer, train_dataset, eval_dataset, *, output: Path, precision: str,
                  use_cuda: bool, interrupt: GracefulInterrupt, progress, data_sha256: list | None = None, callbacks: tuple = ()):
    """The model in its precision, its LoRA, and the shared-prompt DPO trainer (tokenization and the reference pass run here)."""
    import torch
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dpo_align.train.fast_dpo import SharedPromptDPOTrainer

    model = load_model(model_path, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, dtype=torch.float32)
    n_params = body_parameters(model)  # the base model's, embeddings and head aside: FLOPs per token are 6 N (throughput.py)
    peak, peak_source = peak_flops("cuda" if use_cuda else "cpu", precision)
    if precision == "bf16":
        frozen_linears_to(model, torch.bfloat16)
    peft_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(","),
        task_type="CAUSAL_LM",
    )
    pairs_per_step = config.batch_size * config.grad_accum
    setup_started = time.time()
    trainer = SharedPromptDPOTrainer(
        model=model,
        log=progress,
        args=dpo_args(config, output, precision=precision, use_cuda=use_cuda, evaluate=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Throughput(n_params, peak), MetricsFile(output / "metrics.jsonl"),
                   PairsProgress(pairs_per_step, "SFT" if config.loss_types() == ["sft"] else config.loss_type.replace(",", "+")),
                   CheckpointMarker({**dataclasses.asdict(config), DATA_KEY: data_sha256}), interrupt, *callbacks],
    )
    trainer.setup_s = round(time.time() - setup_started, 1)  # tokenization and the reference pass (or its cache)
    trainer.throughput_basis = (n_params, peak, peak_source)
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    return trainer


def _train(config: TrainConfig, *, resume: bool, overwrite: bool, progress, callbacks: tuple = ()) -> dict:
    import warnings

    import torch
    from accelerate import PartialState
    from transformers import set_seed

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
    if main:
        check_output_dir(output, overwrite=overwrite, resume=resume)  # nothing is written before the trainer is built
    resume_from = latest_checkpoint(output) if resume else None
    if resume_from is not None:
        check_checkpoint_settings(resume_from, config, output)
    set_seed(config.seed)

    # Model path and tokenizer first: a wrong model name should fail before data work.
    with state.main_process_first():  # the built-in model is converted once, by the main process
        model_path = resolve_model(config.model, progress=progress)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    check_fits_template(config, tokenizer)
    check_lora_targets(config, model_path)  # from the model's config, before its weights load

    # 1. the data
    prepared = prepare_pairs(config, progress)
    data_sha256 = [s.sha256 for s in prepared.report.sources]
    if resume_from is not None:
        check_checkpoint_data(resume_from, data_sha256, config)
    train_dataset, truncation, eval_dataset, eval_report = datasets_for(config, prepared, tokenizer, progress)

    # 2. the trainer
    precision = resolve_precision(config.precision)
    interrupt = GracefulInterrupt()
    trainer = build_trainer(config, model_path, tokenizer, train_dataset, eval_dataset, output=output, precision=precision,
                            use_cuda=use_cuda, interrupt=interrupt, progress=progress, data_sha256=data_sha256, callbacks=callbacks)
    warning = warmup_warning(config, len(train_dataset), state.num_processes)
    if warning:
        progress(f"Warning: {warning}")

    # Set up without error: only now is the run folder made (a replaced run removed) and the settings written.
    if main:
        make_output_dir(output, overwrite=overwrite and not resume)
        atomic_write_text(output / "config.yaml", config.to_yaml())
        if resume:
            rewind_to(output, resume_from)
            progress(f"Resuming from {resume_from}" if resume_from else "No complete checkpoint yet: starting from the beginning.")
    state.wait_for_everyone()

    # 3. the run. Ctrl-C is handled until the manifest is written: during training it stops at the next
    # step with a checkpoint; in the last step or once training is done, the outputs are finished first,
    # and then it stops all the same (InterruptedAfterFinishing).
    interrupt.install()
    try:
        if resume_from is not None and is_final(resume_from):
            # Killed after the last step was saved but before the outputs were written: the
            # Trainer would run one step too many from here, so take the final adapter as is.
            result = _restore_final(trainer, resume_from)
        else:
            try:
                with named_write_errors(output):  # a checkpoint that does not fit on the disk names the run folder
                    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except TrainingDiverged as err:
                raise TrainingDiverged(err.step, err.what, err.value, str(output)) from None
        if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(latest_checkpoint(output), output)
        # 4. the outputs
        run = RunResult(model_path=model_path, data=prepared.report, eval_data=eval_report, train_size=len(train_dataset),
                        truncation=truncation, contamination=prepared.contamination, precision=precision,
                        device="cuda" if use_cuda else "cpu", resumed_from=resume_from,
                        train_runtime_s=round(result.metrics.get("train_runtime", 0.0), 1), started=started)
        manifest = _write_outputs(config, trainer, tokenizer, run, output=output, main=main, progress=progress)
        if interrupt.requested:  # asked to stop: a finished run is no reason to carry on
            raise InterruptedAfterFinishing(output)
        return manifest
    finally:
        interrupt.uninstall()


def _restore_final(trainer, checkpoint: Path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, float("nan"), {"train_runtime": 0.0})


@dataclass
class RunResult:
    """What a finished training run reports, beside the trainer's own state."""

    model_path: str
    data: LoadReport
    eval_data: LoadReport | None
    train_size: int
    truncation: Counter
    contamination: dict[str, int]
    precision: str
    device: str
    resumed_from: Path | None
    train_runtime_s: float
    started: float


def _write_outputs(config: TrainConfig, trainer, tokenizer, run: RunResult, *, output: Path, main: bool, progress=print) -> dict:
    """Adapter and tokenizer, curves, model card, then the manifest (last: it says the run is complete).

    The final files are written into a staging folder inside the run and moved into place
    only when all were written: a full disk leaves the checkpoints (so --resume works) and
    nothing that looks like a finished adapter."""
    with staged_files(output) as staging:
        trainer.save_model(str(staging))  # the Trainer writes from the main process only
        if not main:
            return {}
        tokenizer.save_pretrained(str(staging))
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml holds the settings
        rows = read_metrics(output / "metrics.jsonl")
        plots = plot_runs({output.name: rows}, staging / "plots", betas={output.name: config.beta})
        final_train = next((r for r in reversed(rows) if "loss" in r), {})
        final_eval = next((r for r in reversed(rows) if "eval_loss" in r), {})
        manifest = {
            "status": "complete",
            "command": "dpo-align train --config config.yaml",
            "model": {"name": config.model, "path": run.model_path, "revision": model_revision(run.model_path),
                      "converted_from": gguf_source(run.model_path)},  # a .gguf file (or the built-in's): its path and sha256
            "adapter": {**model_revision(str(staging)), "path": str(output.resolve())},
            "data": run.data.as_dict(),
            "eval_data": run.eval_data.as_dict() if run.eval_data else None,
            "pairs_trained_on": run.train_size,
            "length_fitting": dict(run.truncation),
            "eval_suite_overlap": run.contamination,
            "dropped_eval_overlap": config.drop_eval_overlap,
            "seed": config.seed,
            "precision": run.precision,
            "device": run.device,
            "machine": machine(),
            "versions": package_versions(),
            "git_commit": git_commit(),
            "global_steps": trainer.state.global_step,
            "resumed_from": str(run.resumed_from) if run.resumed_from else None,
            "trainer_setup_s": trainer.setup_s,
            "reference_logps": trainer.ref_logps_report,
            "train_runtime_s": run.train_runtime_s,
            "throughput": run_summary(rows, *trainer.throughput_basis, run.train_runtime_s),
            "wall_time_s": round(time.time() - run.started, 1),
            "final_train": final_train,
            "final_eval": final_eval,
            "plots": [str(p.relative_to(staging)) for p in plots],
        }
        atomic_write_text(staging / "README.md", model_card(config, manifest))
        atomic_write_json(staging / "manifest.json", manifest)  # moved into place last
    prune_checkpoints(output, keep_adapters=config.keep_checkpoints)
    return manifest


def _silent(message: str) -> None:
    pass
