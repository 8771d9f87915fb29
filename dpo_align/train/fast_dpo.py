"""``SharedPromptDPOTrainer``: TRL's ``DPOTrainer`` with a faster batch layout, nothing else changed.

TRL stays the engine: its dataset tokenization, every ``loss_type``, its logged metrics
(``rewards/*``, ``logps/*``, ``logits/*``, entropy, token accuracy), the Trainer loop,
checkpointing and resume. Only three things differ:

1. batches come from ``pair_batch.SharedPromptCollator`` (one row per pair, prompt once);
   pairs of similar length are batched together by transformers' own length-grouped
   sampler (``train_sampling_strategy="group_by_length"``), which still shuffles;
2. the policy forward returns log-probs at the response positions only (``pair_logps``);
3. the reference log-probs are computed once per pair, before training, and cached on
   disk (``ref_logps``), so ``precompute_ref_log_probs`` is always on; except when
   ``max_steps`` consumes fewer pairs than the training set holds (a short run on a large
   pool), where each step computes them for its own batch, adapter off, as stock TRL does.

How the loss is reused: TRL's ``_compute_loss`` calls ``model(...)`` once and reads
per-token fields laid out ``[2B, R]`` beside a ``completion_mask``. Our forward produces
exactly that grid, so ``_compute_loss`` runs unchanged on a stand-in model that returns it.
That relies on TRL's internals, so pyproject.toml pins the TRL minor version this was tested
with (1.16), and tests/test_fast_dpo.py checks every loss type and the gradients against it.
"""

from __future__ import annotations

import math
import time

import torch
from trl import DPOTrainer

from dpo_align.core.errors import TrainingDiverged
from dpo_align.core.pair_batch import SharedPromptCollator, pair_length
from dpo_align.core.pair_logps import add_pair_logps, model_inputs, pair_sums
from dpo_align.train import ref_logps

SKIPPED = "skipped: loss_type sft needs no reference (rewards are not logged)"
NOT_LOGGED_FOR_SFT = ("rewards/", "rejected")


class _Outputs:
    """Stands in for the model inside TRL's `_compute_loss`: returns the outputs already computed."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, *args, **kwargs):
        return self.outputs


class SharedPromptDPOTrainer(DPOTrainer):
    def __init__(self, model, args, *, processing_class, group_by_length: bool = True, log=print, **kwargs):
        if not args.precompute_ref_log_probs:
            raise ValueError("SharedPromptDPOTrainer computes reference log-probs once; set precompute_ref_log_probs=True.")
        if isinstance(model, str):
            raise TypeError("SharedPromptDPOTrainer needs a loaded model instance.")
        self._log = log
        self.ref_logps_report = {}
        # Up front only when the run consumes every training pair: a --max-steps run over part of a
        # large pool computes its reference per step instead, in the training batch (as stock TRL does).
        train_dataset = kwargs.get("train_dataset")
        pairs_consumed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        self.ref_upfront = not (args.max_steps > 0 and train_dataset is not None and pairs_consumed < len(train_dataset))
        outputs = ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if args.use_weighting else ())
        add_pair_logps(model, outputs=outputs)  # before PEFT wraps it; TRL's own fused head wraps this in turn
        pad = processing_class.pad_token_id if processing_class.pad_token_id is not None else processing_class.eos_token_id
        # one pair a row; packing several short pairs into a row measured no faster than length grouping
        # (results/train-throughput.md), so it is left to the benchmark
        # SFT alone (loss_type ["sft"]) needs neither the reference nor the rejected responses: both are skipped, and the
        # rewards, which would read a reference of zeros, are not logged (the manifest's reference_logps says so)
        loss_types = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
        self.chosen_only = list(loss_types) == ["sft"]
        collator = SharedPromptCollator(pad_token_id=pad, max_length=args.max_length, chosen_only=self.chosen_only)
        if group_by_length:
            args.train_sampling_strategy = "group_by_length"
            args.length_column_name = "length"
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=collator, **kwargs)

    # ---- data: TRL's tokenization, plus the row length the sampler groups by
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if "length" not in dataset.column_names:
            dataset = dataset.add_column("length", [pair_length(ex, args.max_length, self.chosen_only) for ex in dataset])
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "length"]

    # ---- reference log-probs: once per pair, from the disk cache when it has them
    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.chosen_only:
            self.ref_logps_report[name] = {"pairs": len(dataset), "cached": None, "seconds": 0.0, "key": None,
                                           "mode": SKIPPED}
            self._log(f"loss_type sft: no reference pass over the {len(dataset)} {name} pairs and no rejected responses in the "
                      "batches; rewards are not logged.")
            zeros = [0.0] * len(dataset)
            dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names])
            return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)
        if name == "train" and not self.ref_upfront:
            self.ref_logps_report[name] = {"pairs": len(dataset), "cached": False, "seconds": 0.0, "key": None,
                                           "mode": "per step: --max-steps consumes fewer pairs than the data holds"}
            return dataset
        started = time.perf_counter()
        model = self.ref_model or self.model
        autocast_dtype = str(torch.get_autocast_dtype(self.accelerator.device.type)) if self.args.bf16 or self.args.fp16 else None
        key = ref_logps.cache_key(weights=ref_logps.weights_digest(model), ids=ref_logps.ids_digest(dataset),
                                  max_length=self.args.max_length, device_type=self.accelerator.device.type,
                                  autocast_dtype=autocast_dtype)
        with self.accelerator.main_process_first():
            cached = ref_logps.load(key, len(dataset), report=self._log)
            hit = cached is not None
            if cached is None:
                cached = ref_logps.compute(model, dataset, max_length=self.args.max_length, pad_token_id=self.data_collator.pad_token_id,
                                           device=self.accelerator.device, autocast=self.accelerator.autocast,
                                           progress_desc=f"Reference log-probs ({name})")
                if self.accelerator.is_main_process:
                    ref_logps.save(key, *cached)
            else:
                self._log(f"Reference log-probs for {len(dataset)} {name} pairs: reused from the cache ({key}).")
        # what train.py writes to the manifest: whether the cache answered, and the time this took
        self.ref_logps_report[name] = {"pairs": len(dataset), "cached": hit, "seconds": round(time.perf_counter() - started, 2), "key": key}
        chosen, rejected = cached
        dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names])
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())

    # ---- a NaN or infinite loss stops the run at that step (never an adapter of NaNs reported as done)
    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            raise TrainingDiverged(self.state.global_step + 1, "loss", float(loss.detach().float().mean()))
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.chosen_only:  # rewards against a reference of zeros, and the rejected side that was not fed, mean nothing
            logs = {k: v for k, v in logs.items() if not any(part in k for part in NOT_LOGGED_FOR_SFT)}
            for metrics in self._metrics.values():  # TRL adds its collected metrics to the logs in its own log()
                for key in [k for k in metrics if any(part in k for part in NOT_LOGGED_FOR_SFT)]:
                    del metrics[key]
        grad_norm = logs.get("grad_norm")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(self.state.global_step, "gradient norm", grad_norm)
        super().log(logs, *args, **kwargs)

    # ---- the loss: our forward, TRL's loss and metrics
    def _compute_loss(self, model, inputs, return_outputs):
        if "ref_chosen_logps" not in inputs and self.chosen_only:  # SFT alone reads no reference
            zeros = torch.zeros(inputs["completion_mask"].shape[0] // 2)
            inputs = {**inputs, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
        if "ref_chosen_logps" not in inputs:  # reference per step: same batch, adapter off, no grad
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                reference = model(**model_inputs(inputs)).log_probs
            inputs = {**inputs, **dict(zip(("ref_chosen_logps", "ref_rejected_logps"), pair_sums(reference.float()), strict=True))}
        outputs = model(**model_inputs(inputs))
        completion = inputs["completion_mask"]
        view = {
            "input_ids": torch.zeros_like(completion),  # only its shape is read (labels = input_ids masked)
            "completion_mask": completion,
            "attention_mask": inputs["real_tokens"],  # its sum is TRL's num_tokens: the tokens actually fed
            "ref_chosen_logps": inputs["ref_chosen_logps"],
            "ref_rejected_logps": inputs["ref_rejected_logps"],
        }
        return super()._compute_loss(_Outputs(outputs), view, return_outputs)
