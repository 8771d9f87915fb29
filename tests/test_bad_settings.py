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


EVAL_CASES = [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--limit", "0"], "--limit 0"),
    (["--limit", "-1"], "--limit -1"),
    (["--dtype", "float8"], "--dtype 'float8' is not one of"),
    (["--device", "foo"], "--device 'foo' is not one of"),
    (["--device", "cuda"], "no CUDA device"),
]


@pytest.mark.parametrize(("args", "message"), EVAL_CASES)
def test_bad_eval_options_are_refused_before_a_model_loads(args, message, tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_sweep_checks_its_scoring_options_before_training(tmp_path, pairs_file):
    result = runner.invoke(app, ["sweep", "--data", str(pairs_file), "--eval-batch-size", "0", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--batch-size 0" in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("name", "message"), [("no-such-model", "neither a built-in model"), ("/nonexistent/model", "no such model folder"),
                                               ("nobody/nothing", "Could not get 'nobody/nothing'")])
def test_models_prepare_refuses_what_it_cannot_prepare(name, message, tmp_path):
    result = runner.invoke(app, ["models", "prepare", name])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_folder_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["models", "prepare", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no config.json" in result.output


def _suite(tmp_path, truthfulqa: str, winogrande: str):
    (tmp_path / "truthfulqa").mkdir(parents=True)
    (tmp_path / "truthfulqa" / "TruthfulQA.csv").write_text(truthfulqa)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(winogrande)
    return tmp_path


GOOD_TQA = "Type,Category,Question,Best Answer\nA,B,What is it?,It is.\n"
GOOD_WINO = json.dumps({"sentence": "The fox is _.", "option1": "quick", "option2": "slow", "answer": "1"}) + "\n"


@pytest.mark.parametrize(("tqa", "wino", "message"), [
    ("Type,Category,Question\nA,B,What is it?\n", GOOD_WINO, "TruthfulQA.csv:1: the header has no 'Best Answer' column"),
    ("", GOOD_WINO, "TruthfulQA.csv:1: the header has no 'Question' or 'Best Answer' column"),
    ("Type,Category,Question,Best Answer\n", GOOD_WINO, "TruthfulQA.csv: no rows after the header"),
    (GOOD_TQA, GOOD_WINO + json.dumps({"sentence": "x _", "option1": "a", "answer": "1"}) + "\n", "dev.jsonl:2: missing or non-text field(s) option2"),
    (GOOD_TQA, "{not json\n", "dev.jsonl:1: not valid JSON"),
])
def test_malformed_scoring_data_names_the_file_line_and_column(tqa, wino, message, tmp_path):
    from dpo_align.core.errors import UserError
    from dpo_align.data.suite_docs import load_docs

    data = _suite(tmp_path / "suite", tqa, wino)
    with pytest.raises(UserError, match=re_escape(message)):
        load_docs("truthfulqa", data_dir=str(data))
        load_docs("winogrande", data_dir=str(data))


def re_escape(text):
    import re

    return re.escape(text)


def test_empty_responses_are_skipped_and_counted(tiny_gpt2, tmp_path):
    data = _suite(tmp_path / "suite", "Type,Category,Question,Best Answer\nA,B,What is it?,It is.\nA,B,Empty?,\nA,B,Blank?,  \n", GOOD_WINO)
    pku = tmp_path / "pku.jsonl"
    pku.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}) + "\n")
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(data), "--pku-path", str(pku), "--device", "cpu",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["table"]
    assert table["truthfulqa"]["n"] == 1 and table["truthfulqa"]["skipped_empty_responses"] == 2
    assert table["winogrande"]["skipped_empty_responses"] == 0
    # every answer empty: nothing to score is an error, not a ce of the separator alone
    data2 = _suite(tmp_path / "suite2", "Type,Category,Question,Best Answer\nA,B,Empty?,\n", GOOD_WINO)
    result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(data2), "--pku-path", str(pku), "--device", "cpu",
                                 "-o", str(tmp_path / "out2")])
    assert result.exit_code == 2 and "truthfulqa: all 1 documents have an empty response" in result.output
    assert not (tmp_path / "out2" / "results.json").exists()


def test_a_data_folder_warns_about_the_files_it_ignores(tmp_path, pairs_file):
    from dpo_align.data.pairs import read_pairs

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text(pairs_file.read_text())
    (folder / "more.csv").write_text("chosen,rejected\n")
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden").write_text("x")
    with pytest.warns(UserWarning, match=r"ignoring 2 file\(s\) that are not data files .*: more.csv, notes.txt$"):
        pairs, _ = read_pairs([str(folder)])
    assert len(pairs) == 48
