"""A full disk: every command exits 2 naming the path, and leaves nothing that looks finished.

Where the test runs as root (CI does) the output goes to a real tmpfs too small for it; elsewhere
the write error (ENOSPC) is injected at the point where the outputs are written.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app

from .helpers import noisy_adapter

runner = CliRunner()
FINISHED = ("manifest.json", "results.json", "table.md", "adapter_model.safetensors", "model.safetensors")


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of the given size (KiB); skipped where mounting is not allowed."""
    mounted = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the injected-error tests below cover this case")
    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def finished_left(folder: Path) -> list[str]:
    """Finished-looking files; a checkpoint's adapter is what --resume needs, and no finished run."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name in FINISHED and not any(part.startswith("checkpoint-") for part in p.relative_to(folder).parts))


def _assert_clean(result, folder: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "No space left on device" in result.output, result.output
    assert str(folder) in result.output, result.output  # the path is named
    assert finished_left(folder) == []
    assert not [p for p in folder.rglob(".staging-*")] if folder.exists() else True


def test_eval_on_a_full_disk(small_disk, tiny_gpt2, tiny_data):
    disk = small_disk(24)
    out = disk / "eval"
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
                                 "--batch-size", "4", "-o", str(out)])
    _assert_clean(result, disk)


def test_merge_on_a_full_disk(small_disk, tiny_gpt2, tmp_path):
    adapter = noisy_adapter(tiny_gpt2, tmp_path / "adapter")
    disk = small_disk(32)
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(disk / "merged")])
    _assert_clean(result, disk)
    assert not (disk / "merged").exists()


def test_train_on_a_full_disk(small_disk, tiny_gpt2, pairs_file):
    disk = small_disk(48)
    out = disk / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--max-steps", "2",
                                 "--max-length", "96", "--precision", "fp32", "--report-generations", "0"])
    _assert_clean(result, disk)


# --------------------------------------------------------------------------- injected, anywhere


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)


def test_eval_write_error_injected(monkeypatch, tiny_gpt2, tiny_data, tmp_path):
    import dpo_align.report.tables as tables

    monkeypatch.setattr(tables, "atomic_write_bytes", _enospc)  # table.png: the last file written
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
                                 "--batch-size", "4", "-o", str(out)])
    _assert_clean(result, out)
    assert not out.exists() or not any(out.iterdir())  # results.json, table.md and samples/ were staged, so none is left


def test_train_write_error_injected(monkeypatch, tiny_gpt2, pairs_file, tmp_path):
    import dpo_align.train.run as train_module

    monkeypatch.setattr(train_module, "atomic_write_json", _enospc)  # the manifest: the last file of the run
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--max-steps", "2",
                                 "--max-length", "96", "--precision", "fp32", "--report-generations", "0"])
    _assert_clean(result, out)
    assert (out / "config.yaml").is_file() and list(out.glob("checkpoint-*"))  # what --resume needs stays


def test_models_prepare_write_error_injected(monkeypatch, tmp_path):
    import dpo_align.core.models as models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "find_gguf", lambda *args: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "convert_gguf", _enospc)
    result = runner.invoke(app, ["models", "prepare"])
    assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output, result.output
    assert finished_left(tmp_path / "cache") == []


def test_sweep_write_error_injected(monkeypatch, tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """The sweep's tables and comparison are staged with results.json: a write error leaves none of them."""
    import dpo_align.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "atomic_write_bytes", _enospc)  # comparison.png, written after results.json is staged
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", "--lr", "1e-3", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "2",
                                 "--max-length", "96", "--precision", "fp32", "--data-dir", str(tiny_data),
                                 "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2", "--bootstrap", "100",
                                 "--report-generations", "0", "--runs-dir", str(tmp_path / "runs"), "-o", str(out)])
    _assert_clean(result, out)
    assert list((out / "scores").glob("*.json.gz"))  # the scores are kept: a re-run after freeing space reuses them
    assert (out / "manifests" / "lr-0.001.yaml").is_file()  # and so is the run's record, written when the run finished


def test_a_full_reference_cache_costs_only_time(small_disk, tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    """The reference log-prob cache on a disk too small for it (safetensors raises its own error, not an OSError): the run
    trains and finishes, as the README promises, and leaves no temporary file in the cache."""
    cache = small_disk(8)
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(cache))
    many = tmp_path / "many.jsonl"
    many.write_text(pairs_file.read_text() * 40)  # 1,920 pairs: more log-probs than 8 KiB holds
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(many), "-o", str(out), "--epochs", "1", "--batch-size", "64",
                                 "--max-length", "64", "--precision", "fp32", "--report-generations", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and list(cache.iterdir()) == []
