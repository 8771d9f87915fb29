"""Settings are validated before any model loads, each error naming the option; a diverging run is not a success."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app

runner = CliRunner()

CASES = [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--beta", "inf"], "--beta must be a finite number"),
    (["--loss-type", "unknown"], "--loss-type 'unknown' is not one of TRL's"),
    (["--logging-steps", "0"], "--logging-steps must be at least 1"),
    (["--eval-steps", "0"], "--eval-steps must be at least 1"),
    (["--save-steps", "0"], "--save-steps must be a whole number"),
    (["--pair-sample", "shuffled"], "--pair-sample must be one of first, random"),
    (["--report-generations", "-1"], "--report-generations must be 0"),
]
YAML_CASES = [
    ("learning_rate: fast\n", "learning_rate: expected float, got 'fast'"),
    ("lora_r: [1, 2]\n", "lora_r: expected int, got [1, 2]"),
    ('max_steps: "1"\n', "max_steps: expected int, got '1'"),
    ("data: [1, 2]\n", "data: expected a list of strings"),
    ("save_total_limit: 0\n", "save_total_limit must be at least 1"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
def test_bad_options_are_refused_before_anything_is_written(args, message, tmp_path, pairs_file):
    out = tmp_path / "run"
    # the model does not exist: a model load would fail differently, so the settings were checked first
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--data", str(pairs_file), "-o", str(out), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(("text", "message"), YAML_CASES)
def test_yaml_values_of_the_wrong_type_name_their_key(text, message, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(config), "--model", str(tmp_path / "m"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_diverging_run_stops_with_exit_2_and_leaves_nothing_finished(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(out), "--lr", "1e30",
                                 "--max-steps", "6", "--logging-steps", "1", "--precision", "fp32", "--max-length", "96",
                                 "--report-generations", "0"])
    assert result.exit_code == 2 and "Training diverged at step" in result.output and "Traceback" not in result.output, result.output
    assert not (out / "manifest.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_a_sweep_marks_a_diverging_run_failed_and_scores_the_others(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    result = runner.invoke(app, ["sweep", "--lr", "1e-3,1e30", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "4",
                                 "--max-length", "96", "--precision", "fp32", "--data-dir", str(tiny_data),
                                 "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2", "--bootstrap", "100",
                                 "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "1 of 2 runs failed (lr-1e+30)" in result.output
    table = (tmp_path / "out" / "table.md").read_text()
    assert "DPO lr-0.001" in table and "## Failed runs" in table and "lr-1e+30: Training diverged at step" in table
    assert "nan ±" not in table and "DPO lr-1e+30" not in table  # the failed run has no column
    models = json.loads((tmp_path / "out" / "results.json").read_text())["models"]
    assert [m["label"] for m in models] == [models[0]["label"], "DPO lr-0.001"]
