"""Files: written so that an interruption or a full disk never leaves one half-written, and hashed."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def input_file(path: str | Path, what: str = "") -> Path:
    """A path given as an input file, checked before it is opened: there, a regular file (a FIFO would hang the
    reader, a folder is another mistake), with a message naming the option (``what``) and the path."""
    import stat

    from dpo_align.core.errors import UserError

    prefix = f"{what} {path}" if what else str(path)
    file = Path(path).expanduser()
    if not os.path.exists(file):
        if os.path.lexists(file):
            raise UserError(f"{prefix}: a broken symbolic link or a link loop (it points at {os.readlink(file)}).")
        raise UserError(f"{prefix}: no such file.")
    mode = os.stat(file).st_mode
    if stat.S_ISDIR(mode):
        raise UserError(f"{prefix}: a folder, not a file.")
    if not stat.S_ISREG(mode):
        raise UserError(f"{prefix}: not a regular file (a FIFO, socket or device). Save the input to a file and give that.")
    return file


def decode_utf8(raw: bytes, where: str) -> str:
    """Text from bytes; a byte that is not UTF-8 names the file, line and column (one rule for every text input)."""
    from dpo_align.core.errors import UserError

    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(f"{where}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}). Save the file as "
                        "UTF-8 and run the command again.") from None


def read_text(path: str | Path, what: str = "") -> str:
    """The UTF-8 text of an input file (checked by ``input_file``; decoded by ``decode_utf8``)."""
    file = input_file(path, what)
    return decode_utf8(file.read_bytes(), f"{what} {path}" if what else str(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def located(value):
    """A path setting as the file it names: each existing local path made absolute (links resolved), so ``../data/x``
    and ``/home/me/data/x`` are one setting; hub ids and paths that are not there stay as written. Lists item by item."""
    if isinstance(value, list):
        return [located(item) for item in value]
    return os.path.realpath(value) if isinstance(value, str) and value and os.path.exists(value) else value


def atomic_copy(source: str | Path, target: str | Path) -> None:
    """Copy a file so that ``target`` is never seen half-written: beside it first, then renamed over it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def content_checksum(obj) -> str:
    """sha256 of a JSON value as written (keys sorted): a cache stores it beside its values and checks it on every read,
    so a file edited or damaged after it was written is recomputed rather than trusted because it parses."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON; a path ending in ``.gz`` is gzip-compressed, reproducibly (no name, no time in
    its header), so the same values give the same bytes and git sees no change."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    if Path(path).suffix == ".gz":
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    else:
        atomic_write_text(path, text)


def read_maybe_gzipped(path: str | Path) -> str:
    """The UTF-8 text of a file, decompressed first when its name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text(encoding="utf-8")


def read_json(path: str | Path):
    """The JSON value of a file written by ``atomic_write_json``, gzipped when its name ends in ``.gz``."""
    return json.loads(read_maybe_gzipped(path))


def write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


# errno values of a disk that cannot take the write: full, read-only, over quota
WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


@contextmanager
def named_write_errors(path: str | Path):
    """Turn a full or read-only disk met inside the block into ``OSError(errno, strerror, path)``.

    Writers in Rust (safetensors, tokenizers) report it as their own exception carrying only
    "os error 28"; Python's own carry the errno but sometimes no file name. Either way the
    command can then say which path could not be written."""
    try:
        yield
    except OSError as err:
        if err.errno in WRITE_ERRNOS and not err.filename:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except Exception as err:
        found = re.search(r"os error (\d+)", str(err))
        if found and int(found.group(1)) in WRITE_ERRNOS:
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


@contextmanager
def atomic_directory(target: str | Path):
    """Build a folder beside ``target`` and rename it into place only if the block succeeds,
    so an interruption never leaves a folder that looks complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        with named_write_errors(target):
            yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders a killed process left beside ``target`` (``.NAME-PID-*``, PID no longer running; a
    killed ``models prepare`` left 517 MB that no later run removed). Older ones without a PID go after a day."""
    import time

    for path in target.parent.glob(f".{target.name}-*"):
        if not path.is_dir():
            continue
        pid = path.name[len(target.name) + 2:].split("-", 1)[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
        elif time.time() - path.stat().st_mtime < 86_400:
            continue
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_files(folder: str | Path, *, last: str = "manifest.json"):
    """Write a set of files into ``folder/.staging-*``, then move them into ``folder`` only if
    the block succeeds (``last`` moved last: it is the one that says the set is complete).

    Unlike :func:`atomic_directory` this keeps what ``folder`` already holds (a run's
    checkpoints); renames within one filesystem need no free space, so a full disk fails
    inside the block, where nothing has been moved yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        with named_write_errors(folder):
            yield staging
        items = sorted(staging.iterdir(), key=lambda p: p.name == last)
        for item in items:
            target = folder / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def slug(label: str) -> str:
    """A model label as a file or folder name (``samples/<slug>/``, cached scores)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "model"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
