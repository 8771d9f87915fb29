"""One command per output folder: an advisory lock held for the life of the command.

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
    folder = Path(folder).expanduser().absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def locked(folder: Path, command: str):
    """Hold the lock of ``folder`` while the block runs; exit 2 (UserError) when another process holds it."""
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
