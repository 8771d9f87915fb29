"""One rule for every output folder: checked before any work, then locked for the life of the command.

``locked`` first checks the folder (``check_output_folder``: not a file, and somewhere this
user can write), then holds the lock; ``check_output_file`` is the same rule for a command
that writes one file (``report -o``, ``generate -o``).

The lock is one command per output folder: an advisory lock held for the life of the command.

The lock is ``flock`` on a small file *beside* the folder (``.<name>.lock``), so the folder itself
stays exactly what the command writes. The operating system drops the lock when its process
ends, however it ends, so a lock left by a killed process is simply taken over; the file keeps
the holder's process id and command only to name them in the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from dpo_align.core.errors import UserError


def lock_path(folder: Path) -> Path:
    """The lock of the real folder: two symbolic links to one folder share it (links resolved, `..` folded)."""
    folder = Path(folder).expanduser().resolve()
    return folder.parent / f".{folder.name}.lock"


def check_run_folders(runs_dir: Path, output: Path) -> None:
    """``--runs-dir`` and ``--output`` of a command that trains (sweep, search), before any work: each an output folder
    (``check_output_folder``), and two places: the runs (weights) are not for git, the output is, and each is locked on
    its own."""
    check_output_folder(runs_dir, "--runs-dir")
    check_output_folder(output, "--output")
    runs, out = Path(runs_dir).expanduser().resolve(), Path(output).expanduser().resolve()
    if runs == out or out in runs.parents:
        raise UserError(f"--runs-dir {runs_dir} is {'the same folder as' if runs == out else 'inside'} --output {output}: the adapters "
                        "and checkpoints (not for git) would sit in the results (for git), under two locks. Give --runs-dir a folder of its "
                        "own, such as runs/NAME.")


def _writable_ancestor(path: Path, option: str) -> None:
    path = Path(path).expanduser().absolute()
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write there ({parent} is not a writable folder). Choose a writable location.")


def check_output_folder(folder: Path, option: str = "--output") -> None:
    """An output folder: a folder or nothing yet (never a file), in a place this user can write."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder. Give a folder (a new one, or one this command wrote).")
    _writable_ancestor(folder, option)


def check_output_file(path: Path, option: str = "--output") -> None:
    """An output file: a file or nothing yet (never a folder), in a place this user can write."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; this option takes the path of the file to write (e.g. {path / 'report.html'}).")
    _writable_ancestor(path.parent, option)


@contextlib.contextmanager
def locked(folder: Path, command: str, option: str = "--output"):
    """Check ``folder`` (``check_output_folder``), then hold its lock while the block runs; exit 2 (UserError) when
    another process holds it."""
    check_output_folder(folder, option)
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held open for the whole block)
    except OSError as err:
        raise UserError(f"{folder}: cannot write there (its lock file {path}: {err.strerror}). Choose a writable location.") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{folder} is in use by {holder}. Two commands must not write one folder: wait for it to "
                            "finish (or stop it), or choose another output folder.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({command})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


@contextlib.contextmanager
def waiting_for(path: Path):
    """A lock a process waits for, where ``locked`` refuses: for a result that the first process computes and the others
    then read (the model cache, a study's baseline). ``flock`` on ``path``, dropped by the system however its holder ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
