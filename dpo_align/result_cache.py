"""Results the sweep keeps between runs: reused only when the same weights and settings made them.

Each cached result (a model's scores, its held-out log-probs, a learning-curve point) is a JSON file
holding a ``key`` (the sha256 of the model's and adapter's weight files, the label and the settings)
and a ``checksum`` of its values. A read checks both, and that the values are possible ones (every
per-document NLL finite and >= 0 with whole token and byte counts >= 1, every log-prob finite and
<= 0, every table number finite). A file that fails any check is recomputed, with a word saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import atomic_write_json, content_checksum, located
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


def key_of(spec: ModelSpec, settings, *, adapter: dict | None = None) -> str:
    """What a cached result depends on: the model's and adapter's weights and the settings. ``adapter``: the adapter's
    digest as its run recorded it (``manifest.json``), for a run whose folder is not on this machine."""
    if isinstance(settings, ScoreOptions):
        settings = dataclasses.asdict(settings)
        if settings.get("dataset_revisions") is None:  # added later: unpinned keeps the keys results already carry
            settings.pop("dataset_revisions", None)
    if isinstance(settings, dict):
        settings = {name: located(value) if name in LOCATED else value for name, value in settings.items()}
    parts = {"label": spec.label, "base": _digest(spec.pretrained), "adapter": adapter if adapter is not None else _digest(spec.peft), "settings": settings}
    return content_checksum(parts)


LOCATED = ("data_dir", "pku_path", "sources")  # settings naming local files: keyed on the file, not its spelling


def cached(path: Path, key: str, progress, where: str, kept_message: str, compute, check=None) -> dict:
    """The result stored at ``path`` when its key matches and it passes its checks (``check(result)``: a problem or
    None, for what only the caller knows, such as how many pairs it must cover); else ``compute()``, stored with its
    key and checksum."""
    if (kept := reusable(path, key, progress, check)) is not None:
        progress(f"{where}: {kept_message}.")
        return kept
    progress(where)
    result = compute()
    atomic_write_json(path, {**result, "key": key, "checksum": content_checksum(result)})
    return result


def reusable(path: Path, key: str, progress, check=None) -> dict | None:
    """A cached result when it was made from the same weights and settings and passes its checks; None otherwise
    (it is recomputed)."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        progress(f"{path}: unreadable ({type(err).__name__}); recomputing it.")
        return None
    if not isinstance(kept, dict) or kept.get("key") != key:
        progress(f"{path}: made from other weights or settings; recomputing it.")
        return None
    result = {k: v for k, v in kept.items() if k not in ("key", "checksum")}
    problem = "its values do not match their checksum (changed or damaged after it was written)" \
        if kept.get("checksum") != content_checksum(result) else impossible_values(result) or (check(result) if check else None)
    if problem:
        progress(f"{path}: {problem}; recomputing it.")
        return None
    return result


def impossible_values(result: dict) -> str | None:
    """What in a cached result no model could have produced, or None."""
    import math

    from dpo_align.report.compare import check_document

    for task, docs in (result.get("documents") or {}).items():
        for i, doc in enumerate(docs):
            try:
                check_document(doc, f"{task} document {i + 1}")
            except UserError as err:
                return str(err).split(";")[0]
    for side, values in (result.get("logps") or {}).items():
        if side.endswith("_tokens"):  # the token count of each response, beside its log-prob
            if not all(isinstance(v, int | float) and v == int(v) and v >= 1 for v in values):
                return f"its {side} are not all whole numbers >= 1"
        elif not all(isinstance(v, int | float) and math.isfinite(v) and v <= 0 for v in values):
            return f"its {side} log-probs are not all finite and <= 0"
    for name, row in (result.get("table") or {}).items():
        for metric, value in row.items():
            number = value[0] if isinstance(value, list) and value else value  # [value, stderr]: a stderr may be NaN
            if isinstance(number, float) and not math.isfinite(number):
                return f"its table's {name} {metric} is not finite"
    return None
