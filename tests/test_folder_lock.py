"""One command per output folder: a second one on a busy folder exits 2 naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.core.folder_lock import lock_path

runner = CliRunner()

HOLD = """
import sys, time
from pathlib import Path
from dpo_align.core.folder_lock import locked
with locked(Path(sys.argv[1]), "dpo-align train"):
    print("holding", flush=True)
    time.sleep(120)
"""


def hold(folder):
    """Another process holding the folder's lock, as a running command does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_command_on_a_busy_folder_exits_2_naming_the_holder(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        for args in (["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--max-steps", "1"],
                     ["eval", str(tiny_gpt2), "-o", str(out)],
                     ["merge", str(tmp_path / "adapter"), "-o", str(out)],
                     ["sweep", "--data", str(pairs_file), "-o", str(out), "--runs-dir", str(tmp_path / "runs")]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (args, result.output)
            assert f"is in use by process {holder.pid} (dpo-align train)" in result.output and "Traceback" not in result.output
        assert not out.exists()  # nothing was written into the busy folder
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    os.kill(holder.pid, signal.SIGKILL)  # kill -9: no chance to clean up
    holder.wait()
    assert lock_path(out).is_file()  # the file stays; the operating system dropped the lock
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--max-steps", "1",
                                 "--precision", "fp32", "--max-length", "96", "--report-generations", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    assert f"process {os.getpid()}" in lock_path(out).read_text()  # the new holder named itself


def test_two_links_to_one_folder_share_its_lock(tiny_gpt2, tmp_path):
    """Two evals whose -o are two symbolic links to one folder: the lock is the real folder's, so the second is refused
    (each took its own lock before, and the second replaced the first's results)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "a").symlink_to(real)
    (tmp_path / "b").symlink_to(real)
    holder = hold(tmp_path / "a")
    try:
        result = runner.invoke(app, ["eval", str(tiny_gpt2), "-o", str(tmp_path / "b")])
        assert result.exit_code == 2 and f"is in use by process {holder.pid}" in result.output, result.output
        assert list(real.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
