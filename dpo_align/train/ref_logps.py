"""Reference log-probs, computed once per pair and kept on disk.

With LoRA the reference model is the base model with the adapter switched off, and it
never changes during training. So its summed log-probs of every chosen and rejected
response are computed once, in inference mode, and stored in
``~/.cache/dpo-align/ref-logps/<key>.safetensors`` (``$XDG_CACHE_HOME`` is honoured; so
is ``DPO_ALIGN_REF_CACHE``, a folder, or ``off``).

The key is a sha256 of everything the numbers depend on:

* the frozen weights themselves (names, dtypes and bytes, adapter weights excluded);
* the token ids of every pair, in order (so the data, the template, the tokenizer and the
  fitting to ``max_length`` are all in it), and ``max_length`` (the collator's cut);
* the device type and the autocast dtype the forward runs under.

Change any of them and the key changes, so a stale file is never read. The runs of a
sweep, a ``--resume`` and a re-run share one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from dpo_align.core.pair_logps import summed_logps

# Bumped when the way the numbers are computed changes.
LAYOUT_VERSION = 1


def cache_dir() -> Path | None:
    override = os.environ.get("DPO_ALIGN_REF_CACHE")
    if override == "off":
        return None
    if override:
        return Path(override)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dpo-align" / "ref-logps"


def weights_digest(model) -> str:
    """sha256 of the frozen weights (LoRA weights excluded), in parameter order."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            continue
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def ids_digest(dataset) -> str:
    digest = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for ids in dataset[column]:
            digest.update(json.dumps(ids).encode())
            digest.update(b";")
    return digest.hexdigest()


def cache_key(*, weights: str, ids: str, max_length: int | None, device_type: str, autocast_dtype: str | None) -> str:
    parts = {"layout": LAYOUT_VERSION, "weights": weights, "ids": ids, "max_length": max_length,
             "device": device_type, "autocast": autocast_dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def compute(model, dataset, *, max_length: int | None, pad_token_id: int, device, autocast=contextlib.nullcontext,
            batch_tokens: int = 8192, progress_desc: str = "Reference log-probs") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs of each pair's chosen and rejected response (adapter off, no grad)."""
    sums = summed_logps(model, dataset, adapter=False, max_length=max_length, pad_token_id=pad_token_id, device=device,
                        autocast=autocast, batch_tokens=batch_tokens, progress_desc=progress_desc)
    return sums["chosen"], sums["rejected"]


def load(key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors.torch import load_file

    root = cache_dir()
    path = root / f"{key}.safetensors" if root else None
    if path is None or not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return tensors["chosen"], tensors["rejected"]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None


def save(key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> Path | None:
    from safetensors.torch import save_file

    root = cache_dir()
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{key}.safetensors"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
        os.replace(tmp, path)
        return path
    except OSError:  # a cache that cannot be written only costs time next run
        return None
