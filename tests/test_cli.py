"""The command line as users meet it: help, data inspect, and errors without tracebacks."""

import json

from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.data.templates import render_prompt

from .conftest import SHARED_DATA, needs_shared_data
from .helpers import hh

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output and "data" in result.output


def test_data_inspect_counts_and_prints_the_prompt_byte_exact(tmp_path, tiny_gpt2):
    rows = [
        {"chosen": hh("What is 2+2?", "4"), "rejected": hh("What is 2+2?", "5")},
        {"chosen": hh("same", "x"), "rejected": hh("same", "x")},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_gpt2)])
    assert result.exit_code == 0, result.output
    assert "rows read  2" in result.output and "rows kept  1" in result.output
    assert "chosen and rejected identical: 1" in result.output
    expected = render_prompt("What is 2+2?", "alpaca")
    block = result.output.split("----- prompt", 1)[1].split("\n", 1)[1].split("\n----- chosen", 1)[0]
    assert block == expected


def test_bad_input_is_one_message_and_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": \n')
    result = runner.invoke(app, ["data", "inspect", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1" in result.output and "Traceback" not in result.output


def test_unknown_template_is_rejected_with_choices(tmp_path):
    result = runner.invoke(app, ["data", "inspect", "x.jsonl", "--template", "vicuna"])
    assert result.exit_code == 2 and "alpaca, chat, raw" in result.output


@needs_shared_data
def test_inspect_real_train_pool(tiny_gpt2):
    result = runner.invoke(app, ["data", "inspect", str(SHARED_DATA / "splits" / "train-pool.jsonl.gz"), "--model", str(tiny_gpt2)])
    assert result.exit_code == 0, result.output
    assert "rows read  7716" in result.output and "rows kept  7657" in result.output


def test_tasks_path_points_at_the_installed_tasks_and_the_wheel_ships_them(tmp_path):
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    result = CliRunner().invoke(app, ["tasks-path"])
    assert result.exit_code == 0
    folder = Path(result.output.strip())
    assert {"dpo_ppl_suite.yaml", "dpo_pref_heldout.yaml", "dpo_ppl.py", "dpo_pref.py"} <= {p.name for p in folder.iterdir()}
    # a user who installed the wheel (no clone) has the same files
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(repo), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dpo_align-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("dpo_ppl_suite.yaml", "dpo_ppl_truthfulqa.yaml", "_dpo_ppl_template_yaml", "dpo_pref_heldout.yaml", "dpo_ppl.py", "dpo_pref.py",
                 "README.md"):
        assert f"dpo_align/lm_eval_tasks/{name}" in names


def test_results_record_the_commit_and_time_the_command_started_with_not_the_checkouts_at_the_end(tiny_gpt2, tiny_data, tmp_path, monkeypatch):
    """A scoring run takes hours; commits land meanwhile. results.json says the code the run loaded: the commit (and
    start time) taken as the command starts, not when the folder is written."""
    import subprocess
    import types

    from dpo_align.core import provenance

    asked = {"rev-parse": 0, "strftime": 0}

    def git(args, **kwargs):  # each `git rev-parse HEAD` answers a newer commit: the checkout moving on
        if args[1] == "rev-parse":
            asked["rev-parse"] += 1
            return subprocess.CompletedProcess(args, 0, stdout=f"{asked['rev-parse']:040x}\n", stderr="")
        return subprocess.CompletedProcess(args, 0, stdout="", stderr="")

    def strftime(spec):  # and each reading of the clock a later time
        asked["strftime"] += 1
        return f"2026-12-05T00:00:{asked['strftime']:02d}+0000"

    monkeypatch.setattr(provenance, "subprocess", types.SimpleNamespace(run=git, SubprocessError=subprocess.SubprocessError))
    monkeypatch.setattr(provenance, "time", types.SimpleNamespace(strftime=strftime))
    provenance.git_commit.cache_clear()
    provenance.started.cache_clear()
    try:
        result = runner.invoke(app, ["eval", str(tiny_gpt2), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
                                     "--dataset", "truthfulqa", "--limit", "1", "--no-controls", "--device", "cpu", "-o", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        settings = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
        # the first answers, taken before any scoring; asking again as the folder is written would say 2 and :02
        assert settings["git_commit"] == f"{1:040x}" and settings["started"] == "2026-12-05T00:00:01+0000"
        assert asked == {"rev-parse": 1, "strftime": 1}
    finally:
        provenance.git_commit.cache_clear()  # the real checkout's for the tests after this one
        provenance.started.cache_clear()
