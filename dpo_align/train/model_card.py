"""The adapter's model card (README.md in the run folder), in the Hugging Face format."""

from __future__ import annotations

import dataclasses

from dpo_align.train.config import TrainConfig

# The statistics shown in summaries (TRL's log keys): DPO loss, rewards, margin, accuracy.
SUMMARY_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


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
{manifest['train_runtime_s']} s on {manifest['device']} ({manifest['precision']}){throughput_line(manifest)}.

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


def throughput_line(manifest: dict) -> str:
    """", 1,234 tokens/s, MFU 3.1% (6N FLOPs per token against the measured ... rate)" where the run recorded it."""
    t = manifest.get("throughput")
    if not t or not t.get("tokens_per_s"):
        return ""
    return f", {t['tokens_per_s']:,.0f} tokens/s, MFU {100 * t['mfu']:.1f}% (6N FLOPs per token against the {t['peak_source']})"
