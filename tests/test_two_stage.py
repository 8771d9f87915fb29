"""The two-stage recipe (SFT, folded in, then DPO from it with it as the reference) as one run: its second stage is the
by-hand run's, and its one adapter for the original base scores as the stages do by hand."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.train.merge import merge
from dpo_align.train.run import train

from .helpers import tiny_config

runner = CliRunner()


def test_two_stages_equal_the_stages_by_hand_and_one_adapter_scores_them(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    common = dict(max_steps=-1, epochs=1.0, max_pairs=8, pair_sample="random", save_steps=1, learning_rate=5e-2)
    manifest = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "two", sft_first_pairs=8, loss_type="sigmoid", **common),
                     progress=lambda m: None)
    out = tmp_path / "two"
    assert manifest["stages"]["sft"]["global_steps"] == 2 and manifest["stages"]["preference"]["global_steps"] == 2
    assert manifest["stages"]["sft"]["reference_logps"]["train"]["mode"].startswith("skipped")  # SFT needs no reference
    assert {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {1, 2}
    # by hand: SFT, merge, DPO with the merged model as base and reference
    train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "h1", loss_type="sft", **common), progress=lambda m: None)
    merge(tmp_path / "h1", tmp_path / "hm", base=str(tiny_gpt2), progress=lambda m: None)
    train(tiny_config(tmp_path / "hm", pairs_file, tmp_path / "h2", loss_type="sigmoid", **common), progress=lambda m: None)
    ours, by_hand = load_file(str(out / "stage-2" / "adapter_model.safetensors")), load_file(str(tmp_path / "h2" / "adapter_model.safetensors"))
    assert ours.keys() == by_hand.keys()
    for name in ours:
        assert (ours[name] - by_hand[name]).abs().max() <= 1e-6 * by_hand[name].abs().max().clamp(min=1e-12), name
    # the one adapter on the original base scores as the merged SFT model with the stage-2 adapter
    scored = {}
    for label, args in (("combined", [str(tiny_gpt2), "--peft", str(out)]), ("by hand", [str(tmp_path / "hm"), "--peft", str(tmp_path / "h2")])):
        result = runner.invoke(app, ["eval", *args, "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--no-controls",
                                     "-o", str(tmp_path / f"eval-{label}")])
        assert result.exit_code == 0, result.output
        scored[label] = json.loads((tmp_path / f"eval-{label}" / "results.json").read_text())["models"][-1]["table"]
    for dataset in ("truthfulqa", "winogrande", "pku"):
        assert scored["combined"][dataset]["ce"][0] == pytest.approx(scored["by hand"][dataset]["ce"][0], rel=1e-6), dataset
    base = json.loads((tmp_path / "eval-combined" / "results.json").read_text())["models"][0]["table"]
    assert base["truthfulqa"]["ce"][0] != pytest.approx(scored["combined"]["truthfulqa"]["ce"][0], rel=1e-4)  # the stages moved it


def test_an_interrupted_second_stage_resumes_without_training_the_first_again(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    from dpo_align.train import two_stage

    config = tiny_config(tiny_gpt2, pairs_file, tmp_path / "two", sft_first_pairs=8, loss_type="sigmoid", max_steps=-1, epochs=1.0,
                         max_pairs=8, save_steps=1)
    real = two_stage._write_combined
    monkeypatch.setattr(two_stage, "_write_combined", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=lambda m: None)
    assert (tmp_path / "two" / "stage-1-sft" / "manifest.json").is_file() and not (tmp_path / "two" / "manifest.json").exists()
    stamp = (tmp_path / "two" / "stage-1-sft" / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(two_stage, "_write_combined", real)
    said = []
    manifest = train(config, resume=True, progress=said.append)
    assert manifest["status"] == "complete" and any("stage-1-sft: already finished, kept" in m for m in said)
    assert (tmp_path / "two" / "stage-1-sft" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
