"""`dpo-align generate`: side by side, greedy by default, seeded sampling, held-out default prompts."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.score.generate import DEFAULT_PROMPTS, is_held_out

from .conftest import SHARED_DATA, needs_shared_data
from .helpers import noisy_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return noisy_adapter(tiny_llama, tmp_path_factory.mktemp("gen") / "adapter")


@pytest.fixture(scope="module")
def gemma3_adapter(tiny_gemma3, tmp_path_factory):
    return noisy_adapter(tiny_gemma3, tmp_path_factory.mktemp("gen-gemma3") / "adapter")


def run_json(*args):
    result = runner.invoke(app, ["generate", *args, "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_base_and_adapter_side_by_side_greedy_is_deterministic(arch, request, tmp_path):
    model_path = request.getfixturevalue(f"tiny_{arch}")
    adapter = request.getfixturevalue("adapter" if arch == "llama" else "gemma3_adapter")
    args = [str(model_path), "--peft", str(adapter), "--prompt", "What is the capital of France?", "--prompt", "How do I bake bread?",
            "--max-new-tokens", "12"]
    first, again = run_json(*args), run_json(*args)
    assert first["rows"] == again["rows"]
    row = first["rows"][0]
    assert list(row["responses"]) == ["base", f"adapter {adapter}"]
    assert row["responses"]["base"] != row["responses"][f"adapter {adapter}"]  # the adapter changes the text
    # Markdown, to a file
    out = tmp_path / "gen.md"
    result = runner.invoke(app, ["generate", *args, "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## 1. What is the capital of France?" in text and "**base**" in text and "greedy" in text


def test_sampling_is_seeded(tiny_llama, tmp_path):
    args = [str(tiny_llama), "--prompt", "Tell me about the fox.", "--max-new-tokens", "16", "--temperature", "1.5"]
    a, b = run_json(*args, "--seed", "1"), run_json(*args, "--seed", "1")
    c = run_json(*args, "--seed", "2")
    assert a["rows"] == b["rows"] and a["rows"] != c["rows"]


def test_prompts_file_and_bad_options(tiny_llama, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("First question?\n\nSecond question?\n")
    assert [r["prompt"] for r in run_json(str(tiny_llama), "--prompts", str(lines), "--max-new-tokens", "2")["rows"]] == [
        "First question?", "Second question?"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "A?"}) + "\n" + json.dumps("B?") + "\n")
    assert [r["prompt"] for r in run_json(str(tiny_llama), "--prompts", str(jsonl), "--max-new-tokens", "2")["rows"]] == ["A?", "B?"]
    for args, message in ((["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
                          (["--format", "html"], "--format"), (["--prompts", str(tmp_path / "none.txt")], "none.txt: no such file"),
                          (["--peft", str(tmp_path)], "no adapter_config.json"), (["--template", "nope"], "alpaca, chat, raw")):
        result = runner.invoke(app, ["generate", str(tiny_llama), *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, (args, result.output)


def test_default_prompts_are_held_out():
    assert all(is_held_out(p) for p in DEFAULT_PROMPTS)
    assert not is_held_out("What is the capital of France?")


@needs_shared_data
def test_default_prompts_start_no_training_pool_conversation():
    def first_turn(transcript):
        return transcript.split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].strip().lower()

    with gzip.open(SHARED_DATA / "splits" / "train-pool.jsonl.gz", "rt") as f:
        pool = {first_turn(json.loads(line)["chosen"]) for line in f}
    with gzip.open(SHARED_DATA / "splits" / "heldout.jsonl.gz", "rt") as f:
        held = {first_turn(json.loads(line)["chosen"]) for line in f}
    defaults = {p.lower() for p in DEFAULT_PROMPTS}
    assert not defaults & pool and defaults <= held
