"""Results the sweep keeps between runs: reused only when the same weights and settings made them.

Each cached result (a model's scores, its held-out log-probs, a learning-curve point) is a JSON file
holding a ``key``: the sha256 of the model's and adapter's weight files, the label and the settings.
A file whose key differs is recomputed, with a word; an unreadable one is recomputed too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from dpo_align.core.files import atomic_write_json
from dpo_align.core.provenance import model_revision
from dpo_align.score.evaluate import ModelSpec, ScoreOptions


@functools.lru_cache(maxsize=64)
def _weights(path: str, stamp: tuple) -> dict:
    return model_revision(path)


def _digest(path: str | None) -> dict | None:
    """sha256 of a model's or adapter's weight files (cached while the files are unchanged)."""
    if path is None:
        return None
    folder = Path(path)
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file())) if folder.is_dir() else ()
    return _weights(str(path), stamp)


def key_of(spec: ModelSpec, settings) -> str:
    """What a cached result depends on: the model's and adapter's weights and the settings."""
    if isinstance(settings, ScoreOptions):
        settings = dataclasses.asdict(settings)
        if settings.get("dataset_revisions") is None:  # added later: unpinned keeps the keys results already carry
            settings.pop("dataset_revisions", None)
    parts = {"label": spec.label, "base": _digest(spec.pretrained), "adapter": _digest(spec.peft), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached(path: Path, key: str, progress, where: str, kept_message: str, compute) -> dict:
    """The result stored at ``path`` when its key matches; else ``compute()``, stored with its key."""
    if (kept := _reuse(path, key, progress)) is not None:
        progress(f"{where}: {kept_message}.")
        return kept
    progress(where)
    result = compute()
    atomic_write_json(path, {**result, "key": key})
    return result


def _reuse(path: Path, key: str, progress) -> dict | None:
    """A cached result when it was made from the same weights and settings; None otherwise (it is recomputed)."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return None
    if cached.get("key") != key:
        progress(f"{path}: made from other weights or settings; recomputing it.")
        return None
    return cached
