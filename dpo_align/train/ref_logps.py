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

A file is not trusted because it parses: it records its key, its pair count and a sha256
of its values, and a read checks all three and that every value is a finite log-prob
(<= 0). A file that fails is recomputed, with a word (``check``).
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
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")  # 0-dim too (Gemma's scalars)
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


def _checksum(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for values in (chosen, rejected):
        digest.update(values.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def check(tensors: dict, metadata: dict | None, *, key: str, pairs: int) -> str | None:
    """What is wrong with a cache file's contents, or None: it must say which key and how many pairs it holds, hold
    exactly that many finite log-probs (<= 0) per side, and match the checksum written with them."""
    metadata = metadata or {}
    if "key" not in metadata:
        return "it records no key, pair count or checksum (written by a version that did not check its caches)"
    if metadata.get("key") != key:
        return f"it was written for key {metadata.get('key')!r}"
    if metadata.get("pairs") != str(pairs):
        return f"it holds {metadata.get('pairs')} pairs, not {pairs}"
    if set(tensors) != {"chosen", "rejected"} or any(t.shape != (pairs,) for t in tensors.values()):
        return f"its tensors are {({k: tuple(t.shape) for k, t in tensors.items()})}, not chosen and rejected of {pairs} values"
    if metadata.get("checksum") != _checksum(tensors["chosen"], tensors["rejected"]):
        return "its values do not match their checksum (the file was changed or damaged after it was written)"
    for side, values in tensors.items():
        if not torch.isfinite(values).all() or (values > 0).any():
            return f"its {side} log-probs are not all finite and <= 0"
    return None


def load(key: str, pairs: int, report=lambda message: None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached log-probs of these ``pairs`` pairs, or None when there is no file or it fails its checks (then
    ``report`` says why, and the caller recomputes: a damaged file is never trained on)."""
    from safetensors import safe_open

    root = cache_dir()
    path = root / f"{key}.safetensors" if root else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        problem = check(tensors, metadata, key=key, pairs=pairs)
    except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed, whatever the reader raised
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    if problem:
        report(f"Reference log-probs cache {path} is not used: {problem}. Recomputing them.")
        return None
    return tensors["chosen"], tensors["rejected"]


def save(key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> Path | None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = cache_dir()
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{key}.safetensors"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        chosen, rejected = chosen.to(torch.float32).contiguous(), rejected.to(torch.float32).contiguous()
        metadata = {"key": key, "pairs": str(len(chosen)), "checksum": _checksum(chosen, rejected), "layout": str(LAYOUT_VERSION)}
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path
    except (OSError, SafetensorError):  # a cache that cannot be written (a full disk: safetensors' own error) only costs time
        tmp = locals().get("tmp")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None


def keep(keys: list[str], folder: Path) -> None:
    """Copy the cache files of ``keys`` into ``folder`` (a sweep's record, committed with its results), where it has none
    of that name: a fresh machine then starts from them instead of a reference pass (``restore``)."""
    from dpo_align.core.files import atomic_copy

    root = cache_dir()
    for key in keys:
        source, target = (root / f"{key}.safetensors" if root else None), folder / f"{key}.safetensors"
        if source is not None and source.is_file() and not target.is_file():
            atomic_copy(source, target)


def restore(folder: Path) -> None:
    """Copy every kept file of ``folder`` into the cache where the cache has none of that name. Each is checked when read
    (``load``), like any cache file: a damaged one is recomputed, never trained on."""
    from dpo_align.core.files import atomic_copy

    root = cache_dir()
    if root is None or not folder.is_dir():
        return
    for source in sorted(folder.glob("*.safetensors")):
        if not (root / source.name).is_file():
            try:
                atomic_copy(source, root / source.name)
            except OSError:  # an unwritable cache only costs the reference pass
                return
