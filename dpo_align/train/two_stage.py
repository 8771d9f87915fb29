"""The DPO paper's recipe on hh-rlhf as one run: SFT on the chosen responses first, then the preference objective from
the SFT model, with the SFT model as the reference (``sft_first_pairs``).

One output folder holds:

* ``stage-1-sft/``: an ordinary run, ``loss_type`` sft on ``sft_first_pairs`` pairs (drawn as ``--max-pairs`` draws
  them: with the same number, the very same pairs);
* ``stage-1-merged/``: the base model with that adapter folded in (fp32), the second stage's base and reference, so
  its reference log-probs are cached under the SFT model's weights hash;
* ``stage-2/``: an ordinary run of the preference objective on that model;
* at the top, **one adapter for the original base** that carries both stages: LoRA deltas add, so ``B1 A1 s1 +
  B2 A2 s2`` is one LoRA of rank r1 + r2 with ``B = [s1 B1, s2 B2]``, ``A = [A1; A2]`` and scale 1. ``eval --peft``
  scores it against the original base exactly as the stages scored by hand (merge, then the stage-2 adapter), up to
  fp32 rounding. Beside it ``config.yaml``, ``manifest.json`` (both stages' manifests under ``stages``), and
  ``metrics.jsonl`` (both stages' rows, each with its ``stage``).

Each stage is resumable on its own: an interrupted run continues where it stopped (``--resume``, or a sweep/search
re-run), and a finished first stage is never trained again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import atomic_write_json, atomic_write_text, staged_files
from dpo_align.train.config import TrainConfig

STAGE_1, MERGED, STAGE_2 = "stage-1-sft", "stage-1-merged", "stage-2"


def stage_configs(config: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The two ordinary runs a two-stage config stands for (the second's model is the merged first stage)."""
    output = Path(config.output_dir)
    first = dataclasses.replace(config, loss_type="sft", loss_weights=None, label_smoothing=0.0, max_pairs=config.sft_first_pairs,
                                sft_first_pairs=None, output_dir=str(output / STAGE_1), report_generations=0)
    second = dataclasses.replace(config, model=str(output / MERGED), sft_first_pairs=None, output_dir=str(output / STAGE_2),
                                 report_generations=0)
    return first, second


def check_pairs(config: TrainConfig, available: int) -> None:
    if config.sft_first_pairs > available:
        raise UserError(f"--sft-first-pairs {config.sft_first_pairs}: the training data holds {available} usable pairs; ask for at "
                        "most that many.")


def train_two_stage(config: TrainConfig, *, resume: bool, overwrite: bool, progress, callbacks: tuple = ()) -> dict:
    from dpo_align.core.models import resolve_model
    from dpo_align.train.merge import merge
    from dpo_align.train.run import prepare_pairs
    from dpo_align.train.run_folder import check_output_dir, make_output_dir

    output = Path(config.output_dir)
    check_output_dir(output, overwrite=overwrite, resume=resume)
    base_path = resolve_model(config.model, progress=progress)
    check_pairs(config, len(prepare_pairs(dataclasses.replace(config, max_pairs=None), progress=lambda m: None).pairs))
    make_output_dir(output, overwrite=overwrite and not resume)
    atomic_write_text(output / "config.yaml", config.to_yaml())
    first, second = stage_configs(config)

    progress(f"[stage 1/2] SFT on the chosen responses of {config.sft_first_pairs} pairs -> {first.output_dir}")
    stage_one = _finished_or_trained(first, progress, callbacks=())
    merged = output / MERGED
    if not (merged / "config.json").is_file():
        progress(f"[stage 1/2] folding the SFT adapter into {base_path} -> {merged}")
        merge(Path(first.output_dir), merged, base=base_path, overwrite=True, trust_remote_code=config.trust_remote_code,
              allow_pickle=config.allow_pickle, progress=progress)
    progress(f"[stage 2/2] {config.loss_type} from the SFT model, with it as the reference -> {second.output_dir}")
    stage_two = _finished_or_trained(second, progress, callbacks=callbacks)
    return _write_combined(config, base_path, stage_one, stage_two, output)


def _finished_or_trained(config: TrainConfig, progress, callbacks: tuple) -> dict:
    """One stage's manifest: the stage kept when finished, resumed when started, else trained."""
    from dpo_align.train.run import train_unless_finished

    trained = train_unless_finished(config, where=config.output_dir, progress=progress, callbacks=callbacks)
    return json.loads((Path(config.output_dir) / "manifest.json").read_text(encoding="utf-8")) if trained is None else trained


def combine_adapters(first: Path, second: Path) -> tuple[dict, dict]:
    """(tensors, adapter config) of one LoRA equal to ``first`` then ``second`` on the same modules: rank r1 + r2, scale 1."""
    import torch
    from safetensors.torch import load_file

    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (first, second)]
    weights = [load_file(str(folder / "adapter_model.safetensors")) for folder in (first, second)]
    scales = [c["lora_alpha"] / c["r"] for c in configs]  # PEFT's scale without rsLoRA (this tool never sets it)
    if any(c.get("use_rslora") for c in configs) or weights[0].keys() != weights[1].keys():
        raise UserError(f"{first} and {second}: the two stages' adapters do not adapt the same modules; they cannot be combined.")
    combined = {}
    for name in weights[0]:
        if "lora_A" in name:
            combined[name] = torch.cat([weights[0][name], weights[1][name]], dim=0)
        elif "lora_B" in name:
            combined[name] = torch.cat([weights[0][name] * scales[0], weights[1][name] * scales[1]], dim=1)
        else:
            raise UserError(f"{first}: {name} is not a LoRA matrix; only plain LoRA adapters are combined.")
    rank = configs[0]["r"] + configs[1]["r"]
    config = {**configs[1], "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}}
    return combined, config


def _write_combined(config: TrainConfig, base_path: str, stage_one: dict, stage_two: dict, output: Path) -> dict:
    import shutil

    from safetensors.torch import save_file

    from dpo_align.core.provenance import model_revision
    from dpo_align.train.model_card import model_card

    tensors, adapter_config = combine_adapters(output / STAGE_1, output / STAGE_2)
    adapter_config["base_model_name_or_path"] = base_path
    rows = []
    for stage, name in ((1, STAGE_1), (2, STAGE_2)):
        for line in (output / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.dumps({**json.loads(line), "stage": stage}))
    with staged_files(output) as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "adapter_model.safetensors"))
        atomic_write_json(staging / "adapter_config.json", adapter_config)
        for item in (output / STAGE_2).iterdir():  # the tokenizer, as the second stage saved it
            if item.name.startswith(("tokenizer", "special_tokens", "chat_template")) or item.name in ("vocab.json", "merges.txt"):
                shutil.copy(item, staging / item.name)
        atomic_write_text(staging / "metrics.jsonl", "\n".join(rows) + "\n")
        manifest = {**stage_two, "command": "dpo-align train --config config.yaml",
                    "model": {"name": config.model, "path": base_path, "revision": model_revision(base_path)},
                    "adapter": {**model_revision(str(staging)), "path": str(output.resolve())},
                    "global_steps": stage_one["global_steps"] + stage_two["global_steps"],
                    "wall_time_s": round(stage_one["wall_time_s"] + stage_two["wall_time_s"], 1),
                    "two_stage": {"sft_pairs": config.sft_first_pairs, "combined_rank": adapter_config["r"],
                                  "how": "one LoRA of rank r1 + r2 for the original base: B = [s1 B1, s2 B2], A = [A1; A2], scale 1"},
                    "stages": {"sft": stage_one, "preference": stage_two}}
        atomic_write_text(staging / "README.md", model_card(config, manifest))
        atomic_write_json(staging / "manifest.json", manifest)
    return manifest
