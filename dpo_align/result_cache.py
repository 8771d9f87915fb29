"""Results the sweep keeps between runs: reused only when the same weights, settings and data made them.

Each cached result (a model's scores, its held-out log-probs, a learning-curve point) is a JSON file
holding a ``key`` (the sha256 of the model's and adapter's weight files, the label and the settings)
and a ``checksum`` of its values. A read checks both, and that the values are possible ones (every
per-document NLL finite and >= 0 with whole token and byte counts >= 1, every log-prob finite and
<= 0, every table number finite). A file that fails any check is recomputed, with a word saying why.

The data a result was made from is keyed on its **content**, not its name: each cached result records the sha256 of
every file it read (``inputs``: the scoring files of ``data_dir``, resolved through ``DPO_ALIGN_DATA_DIR`` when no
folder is given, the PKU files, the held-out pairs), and a file replaced in place, or the environment variable
pointed elsewhere, makes it stale. Each file is hashed once per process while its size and time stay the same.
A result written before inputs were recorded is kept once and given the inputs read now.

A path ending in ``.json.gz`` is stored gzip-compressed (the suite's per-document scores: 3.6 MB of JSON, 0.8 MB
gzipped). A result is found under either spelling, ``X.json`` or ``X.json.gz``: one written plain by an earlier version,
or compressed by hand with ``gzip -n``, is the same result and is kept.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import atomic_write_json, content_checksum, located, read_json
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
    parts = {"label": spec.cache_name, "base": _digest(spec.pretrained), "adapter": adapter if adapter is not None else _digest(spec.peft), "settings": settings}
    return content_checksum(parts)


LOCATED = ("data_dir", "pku_path", "sources")  # settings naming local files: keyed on the file, not its spelling
# the files of a data folder the suite reads (data/suite_docs.py): the PKU split only when no pku_path is given
DATA_DIR_FILES = ("truthfulqa/TruthfulQA.csv", "winogrande/dev.jsonl", "splits/heldout.jsonl.gz")


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, stamp: tuple) -> str:
    from dpo_align.core.files import sha256_file

    return sha256_file(path)


def file_digest(path: str | Path) -> str | None:
    """sha256 of a local file (once per process while its size and modification time stay the same); None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _file_sha256(str(path.resolve()), (stat.st_size, stat.st_mtime_ns))


def inputs_of(settings) -> dict:
    """What a result read, by content: {setting: {resolved path: sha256}} for the data folder (``DPO_ALIGN_DATA_DIR``
    when none is given), the PKU files and the held-out pair files. Hub ids stay as written (their commit is recorded
    with the scores)."""
    from dpo_align.data.suite_docs import local_data_dir

    if isinstance(settings, ScoreOptions):
        settings = dataclasses.asdict(settings)
    out = {}
    data_dir = local_data_dir(settings.get("data_dir")) if "data_dir" in settings else None
    if data_dir:
        root = Path(data_dir)
        files = DATA_DIR_FILES if not settings.get("pku_path") else DATA_DIR_FILES[:2]
        out["data_dir"] = {"path": str(root.resolve()), "sha256": {name: file_digest(root / name) for name in files}}
    for name in ("pku_path", "sources"):
        value = settings.get(name)
        if value:
            paths = value if isinstance(value, list) else [value]
            out[name] = {str(located(p)): file_digest(p) for p in paths}
    return out


def _changed(kept: dict, wanted: dict) -> str:
    """Which recorded input differs from the one read now, in words."""
    for name in sorted(set(kept) | set(wanted)):
        if kept.get(name) != wanted.get(name):
            return f"its {name} is not the one it was made from (the files' content differs)"
    return "its inputs differ"


def cached(path: Path, key: str, progress, where: str, kept_message: str, compute, check=None, inputs: dict | None = None) -> dict:
    """The result stored at ``path`` when its key matches, it was made from the same ``inputs`` (file contents, see
    ``inputs_of``) and it passes its checks (``check(result)``: a problem or None, for what only the caller knows, such
    as how many pairs it must cover); else ``compute()``, stored with its key, inputs and checksum."""
    if (kept := reusable(path, key, progress, check, inputs)) is not None:
        progress(f"{where}: {kept_message}.")
        return kept
    progress(where)
    result = compute()
    atomic_write_json(path, {**result, "key": key, "checksum": content_checksum(result), **({"inputs": inputs} if inputs is not None else {})})
    _other_spelling(path).unlink(missing_ok=True)  # a stale copy under the other name would shadow nothing but mislead
    return result


def _other_spelling(path: Path) -> Path:
    """``X.json`` for ``X.json.gz`` and the other way round."""
    return path.with_suffix("") if path.suffix == ".gz" else path.with_name(path.name + ".gz")


def stored(path: Path) -> Path | None:
    """The file holding the result meant for ``path``: ``path`` itself, else the same name gzipped or not; None if neither."""
    return next((p for p in (path, _other_spelling(path)) if p.is_file()), None)


def reusable(path: Path, key: str, progress, check=None, inputs: dict | None = None) -> dict | None:
    """A cached result when it was made from the same weights, settings and data and passes its checks; None otherwise
    (it is recomputed)."""
    if (path := stored(path)) is None:
        return None
    try:
        kept = read_json(path)
    except (ValueError, OSError, EOFError) as err:  # gzip: BadGzipFile is an OSError, a file cut short an EOFError
        progress(f"{path}: unreadable ({type(err).__name__}); recomputing it.")
        return None
    if not isinstance(kept, dict) or kept.get("key") != key:
        progress(f"{path}: made from other weights or settings; recomputing it.")
        return None
    result = {k: v for k, v in kept.items() if k not in ("key", "checksum", "inputs")}
    problem = "its values do not match their checksum (changed or damaged after it was written)" \
        if kept.get("checksum") != content_checksum(result) else impossible_values(result) or (check(result) if check else None)
    if not problem and inputs is not None and kept.get("inputs") is not None and kept["inputs"] != inputs:
        problem = _changed(kept["inputs"], inputs)
    if problem:
        progress(f"{path}: {problem}; recomputing it.")
        return None
    if inputs is not None and kept.get("inputs") is None:  # written before inputs were recorded: from now on they are
        atomic_write_json(path, {**kept, "inputs": inputs})
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
