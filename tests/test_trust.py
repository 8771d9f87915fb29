"""Untrusted checkpoints, interruption at random points, and bad input across the commands."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.core.errors import UserError
from dpo_align.data import pairs as data
from dpo_align.train.run_folder import COMPLETE_MARKER, latest_checkpoint

from .conftest import make_tiny_model

runner = CliRunner()


class Payload:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def pickle_only_model(tmp_path):
    directory = make_tiny_model(tmp_path / "pickled", "gpt2")
    (directory / "model.safetensors").unlink()
    return directory


def test_pickle_only_checkpoints_are_refused_by_every_command(pickle_only_model, pairs_file, tmp_path):  # noqa: F811
    import torch

    torch.save({}, pickle_only_model / "pytorch_model.bin")
    for args in (
        ["train", "--model", str(pickle_only_model), "--data", str(pairs_file), "-o", str(tmp_path / "t")],
        ["eval", str(pickle_only_model), "--pku-path", str(pairs_file), "--dataset", "pku", "-o", str(tmp_path / "e")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "--allow-pickle" in result.output and "pytorch_model.bin" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e" / "results.json").exists()


def test_allow_pickle_still_never_runs_code_from_the_checkpoint(pickle_only_model, pairs_file, tmp_path):  # noqa: F811
    import torch

    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": Payload(marker)}, pickle_only_model / "pytorch_model.bin")
    for args in (
        ["train", "--model", str(pickle_only_model), "--data", str(pairs_file), "-o", str(tmp_path / "t"), "--allow-pickle"],
        ["eval", str(pickle_only_model), "--pku-path", str(pairs_file), "--dataset", "pku", "-o", str(tmp_path / "e"), "--allow-pickle"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
    assert not marker.exists()


def test_allow_pickle_loads_a_plain_pickle_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    from dpo_align.core.models import load_model

    pickled = make_tiny_model(tmp_path / "pickled", "gpt2")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(UserError, match="--allow-pickle"):
        load_model(str(pickled))
    assert load_model(str(pickled), allow_pickle=True).config.model_type == "gpt2"


def test_remote_code_needs_trust_remote_code(tmp_path):
    from dpo_align.core.models import load_model

    directory = make_tiny_model(tmp_path / "custom", "gpt2")
    marker = tmp_path / "imported"
    (directory / "modeling_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2LMHeadModel\nclass CustomModel(GPT2LMHeadModel):\n    pass\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    # A known architecture loads as transformers' own class: the shipped code never runs.
    assert type(load_model(str(directory))).__name__ == "GPT2LMHeadModel"
    # An architecture only the shipped code defines is refused, naming the flag.
    config["model_type"] = "custom-only-here"
    config["auto_map"]["AutoConfig"] = "modeling_custom.CustomConfig"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(directory))
    assert not marker.exists()


def test_results_record_the_exact_weights(tiny_gpt2, pairs_file, tmp_path):  # noqa: F811
    from dpo_align.core.files import sha256_file

    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--pku-path", str(pairs_file), "--dataset", "pku", "--limit", "4",
                                 "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    revision = saved["models"][0]["revision"]["base"]
    assert revision["sha256"]["model.safetensors"] == sha256_file(tiny_gpt2 / "model.safetensors")


# --------------------------------------------------------------------------- interruption


def train_cmd(model, data_path, out):
    return [sys.executable, "-m", "dpo_align", "train", "--model", str(model), "--data", str(data_path), "-o", str(out),
            "--max-steps", "12", "--batch-size", "2", "--max-length", "64", "--logging-steps", "1", "--save-steps", "1",
            "--precision", "fp32", "--lr", "5e-3"]


def final_loss(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    return [r["loss"] for r in rows if "loss" in r][-1]


@pytest.mark.slow
def test_sigint_and_sigkill_at_random_points_never_lose_the_run(tiny_gpt2, pairs_file, tmp_path):  # noqa: F811
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(tiny_gpt2, pairs_file, reference), check=True, env=env, capture_output=True, timeout=600)
    expected = final_loss(reference)

    rng = random.Random(1234)
    for trial, sig in enumerate([signal.SIGINT, signal.SIGKILL, signal.SIGINT]):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen(train_cmd(tiny_gpt2, pairs_file, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # wait until training has started (metrics appear), then a random extra delay
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(sig)
        output = proc.communicate(timeout=300)[0].decode(errors="replace")
        complete = (out / "manifest.json").is_file()
        if sig == signal.SIGINT and not complete:  # Ctrl-C during training: a checkpoint and a resume hint
            assert proc.returncode == 130 and "--resume" in output and "Traceback" not in output, output[-2000:]
        # Whatever the moment: the latest complete checkpoint (if any) is loadable.
        latest = latest_checkpoint(out)
        if latest is not None:
            assert (latest / COMPLETE_MARKER).is_file() and (latest / "adapter_model.safetensors").is_file()
            from safetensors.torch import load_file

            assert load_file(latest / "adapter_model.safetensors")
        if complete:  # the signal landed after the run had finished
            assert final_loss(out) == pytest.approx(expected, rel=1e-5)
            continue
        assert not (out / "manifest.json").exists()
        resumed = subprocess.run([sys.executable, "-m", "dpo_align", "train", "-o", str(out), "--resume"],
                                 env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert final_loss(out) == pytest.approx(expected, rel=1e-5), f"trial {trial} ({sig.name})"
        assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


# --------------------------------------------------------------------------- bad input


def test_adapter_on_the_wrong_base_is_a_clear_error(tiny_gpt2, tiny_llama, pairs_file, tmp_path):  # noqa: F811
    from dpo_align.train.config import TrainConfig
    from dpo_align.train.run import train

    adapter = tmp_path / "adapter"
    train(TrainConfig(model=str(tiny_llama), data=[str(pairs_file)], output_dir=str(adapter), max_steps=1, batch_size=2,
                      max_length=64, precision="fp32").validate(), progress=lambda m: None)
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "m"), "--base", str(tiny_gpt2)])
    assert result.exit_code == 2 and "--base" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
    # An adapter whose config names the wrong base (e.g. copied between projects).
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_gpt2)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["eval", "--peft", str(adapter), "--pku-path", str(pairs_file),
                                 "--dataset", "pku", "--limit", "2", "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "adapter" in result.output and str(tiny_gpt2) in result.output
    assert not (tmp_path / "e" / "results.json").exists()


def test_huge_rows_are_truncated_and_counted_not_a_crash(tiny_gpt2, tmp_path):
    from dpo_align.train.config import TrainConfig
    from dpo_align.train.run import train

    rows = [{"prompt": "word " * 20000, "chosen": "yes " * 5000, "rejected": "no"}] + [
        {"prompt": f"q{i}?", "chosen": "a good answer", "rejected": "bad"} for i in range(7)]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = train(TrainConfig(model=str(tiny_gpt2), data=[str(path)], output_dir=str(tmp_path / "run"), max_steps=2,
                                 batch_size=4, max_length=128, precision="fp32").validate(), progress=lambda m: None)
    assert manifest["length_fitting"] == {"prompt truncated from the left": 1, "response truncated at the end": 1}
    assert manifest["pairs_trained_on"] == 8


def test_unwritable_output_locations(tiny_gpt2, pairs_file, tmp_path, monkeypatch):  # noqa: F811
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", "/proc/dpo-align-run"])
    assert result.exit_code == 2 and "cannot write" in result.output and "Traceback" not in result.output

    import dpo_align.core.files as files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--pku-path", str(pairs_file), "--dataset", "pku", "--limit", "2",
                                 "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "No space left" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e" / "results.json").exists()
    assert not [p for p in (tmp_path / "e").rglob("*") if p.is_file()]  # no temp files left behind


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    result = runner.invoke(app, ["--debug", "data", "inspect", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


# --------------------------------------------------------------------------- fuzzing the loader

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                         st.sampled_from(["chosen", "rejected", "prompt", "context", "role", "text", "x"]), inner, max_size=4),
                     max_leaves=8)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".jsonl.gz", ".json", ".parquet"]), st.booleans())
def test_arbitrary_bytes_never_crash_the_loader(tmp_path_factory, blob, suffix, skip_bad):
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(blob)
    try:
        pairs, report = data.read_pairs([str(path)], skip_bad_rows=skip_bad)
    except UserError as err:
        assert str(path) in str(err)
    else:
        assert report.rows_read == len(pairs) + sum(report.skipped.values())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_json, min_size=1, max_size=4), st.booleans())
def test_arbitrary_json_rows_never_crash_the_loader(tmp_path_factory, rows, skip_bad):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        pairs, report = data.read_pairs([str(path)], skip_bad_rows=skip_bad)
    except UserError as err:
        assert str(path) in str(err)
    else:
        assert report.rows_read == len(rows) == len(pairs) + sum(report.skipped.values())
