"""`dpo-align train` and `merge` on tiny models: outputs, config round trip, resume, merge, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.data.fitting import fit_to_length
from dpo_align.data.pairs import Pair
from dpo_align.data.templates import render_prompt
from dpo_align.train import run as train_module
from dpo_align.train.config import TrainConfig
from dpo_align.train.run import Interrupted, InterruptedAfterFinishing, train

from .conftest import SHARED_DATA, needs_shared_data
from .helpers import killed_before_outputs, read_rows, tiny_config

runner = CliRunner()

def last(rows, key):
    return next(r[key] for r in reversed(rows) if key in r)


def test_train_writes_every_output(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--eval-data", str(pairs_file), "--eval-max-pairs", "8",
        "--eval-steps", "3", "--max-steps", "6", "--batch-size", "4", "--max-length", "96", "--logging-steps", "1",
        "--save-steps", "2", "--precision", "fp32", "--lr", "5e-3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml", "manifest.json",
                 "metrics.jsonl", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("checkpoint-*")) and not (out / "training_args.bin").exists()
    assert {p.name for p in (out / "plots").iterdir()} == {
        "loss.png", "rewards_chosen.png", "rewards_rejected.png", "reward_margin.png", "reward_accuracy.png", "logps_chosen.png",
        "logps_rejected.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_steps"] == 6 and manifest["seed"] == 42
    source = manifest["data"]["sources"][0]
    assert source["rows"] == 48 and len(source["sha256"]) == 64
    assert manifest["versions"]["trl"] and manifest["device"] == "cpu" and manifest["wall_time_s"] > 0
    assert manifest["model"]["revision"]["sha256"]["model.safetensors"]
    rows = read_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    # A real learning signal at this lr: the chosen reward separates from the rejected one.
    assert last(rows, "rewards/margins") > 0
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "library_name: peft" in card and "held-out rewards/accuracies" in card
    assert "Final train:" in result.output


def test_config_file_repeats_the_run_and_options_override_it(tiny_gpt2, pairs_file, tmp_path):
    first = tmp_path / "a"
    train(tiny_config(tiny_gpt2, pairs_file, first, max_steps=3), progress=lambda m: None)
    result = runner.invoke(app, ["train", "--config", str(first / "config.yaml"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert last(read_rows(tmp_path / "b"), "loss") == pytest.approx(last(read_rows(first), "loss"), rel=1e-6)
    result = runner.invoke(app, ["train", "--config", str(first / "config.yaml"), "-o", str(tmp_path / "c"), "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "learning_rate: 0.0001" in (tmp_path / "c" / "config.yaml").read_text()


class InterruptAt(TrainerCallback):
    """Sends this process a real SIGINT at the end of one step, as Ctrl-C would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(tiny_config(tiny_gpt2, pairs_file, whole), progress=lambda m: None)

    cut = tmp_path / "cut"
    from dpo_align.train import fast_dpo

    class InterruptedTrainer(fast_dpo.SharedPromptDPOTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[InterruptAt(3), *(callbacks or [])], **kwargs)

    monkeypatch.setattr(fast_dpo, "SharedPromptDPOTrainer", InterruptedTrainer)
    with pytest.raises(Interrupted) as stop:
        train(tiny_config(tiny_gpt2, pairs_file, cut), progress=lambda m: None)
    assert stop.value.checkpoint == cut / "checkpoint-3"
    assert "--resume" in str(stop.value)
    assert not (cut / "manifest.json").exists()  # nothing that looks complete
    monkeypatch.undo()

    result = runner.invoke(app, ["train", "-o", str(cut), "--resume"])
    assert result.exit_code == 0, result.output
    assert last(read_rows(cut), "loss") == pytest.approx(last(read_rows(whole), "loss"), rel=1e-5)
    assert [r["step"] for r in read_rows(cut) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    from safetensors.torch import load_file

    a, b = load_file(whole / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key

    # A finished run cannot be resumed, and a resume cannot change the settings.
    result = runner.invoke(app, ["train", "-o", str(cut), "--resume"])
    assert result.exit_code == 2 and "already finished" in result.output
    result = runner.invoke(app, ["train", "-o", str(cut), "--resume", "--max-steps", "9"])
    assert result.exit_code == 2 and "--max-steps" in result.output


def test_resume_skips_a_checkpoint_that_was_cut_while_being_written(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from dpo_align.train.run_folder import COMPLETE_MARKER, latest_checkpoint

    settings = dict(max_steps=8, save_steps=2, lr_scheduler="constant", learning_rate=5e-2, lora_dropout=0.0)
    whole = tmp_path / "whole"
    train(tiny_config(tiny_gpt2, pairs_file, whole, **settings), progress=lambda m: None)
    # The same run, killed after its last step but before its outputs: checkpoints 6 and 8 on disk (save_total_limit 2).
    out = tmp_path / "cut"

    killed_before_outputs(monkeypatch, tiny_config(tiny_gpt2, pairs_file, out, **settings))
    # The state of a SIGKILL during the save of checkpoint 8: half-written, no completion marker.
    (out / "checkpoint-8" / COMPLETE_MARKER).unlink()
    (out / "checkpoint-8" / "optimizer.pt").write_bytes(b"cut")
    assert latest_checkpoint(out) == out / "checkpoint-6"
    manifest = train(tiny_config(tiny_gpt2, pairs_file, out, **settings), resume=True, progress=lambda m: None)
    assert manifest["resumed_from"].endswith("checkpoint-6") and manifest["global_steps"] == 8
    # steps 7 and 8 were trained again from checkpoint 6 and end where the uninterrupted run ended
    assert [r["step"] for r in read_rows(out) if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in read_rows(out) if "loss" in r] == pytest.approx([r["loss"] for r in read_rows(whole) if "loss" in r], rel=1e-5)
    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert all(torch_allclose(a[k], b[k]) for k in a)


def torch_allclose(x, y) -> bool:
    import torch

    return bool(torch.allclose(x, y, rtol=1e-5, atol=1e-7))


def test_output_dir_in_use_and_bad_input(tiny_gpt2, pairs_file, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    base = ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "1", "--precision", "fp32"]
    result = runner.invoke(app, [*base, "-o", str(busy)])
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*base, "-o", str(busy), "--overwrite"])
    assert result.exit_code == 2 and "does not look like a dpo-align run" in result.output
    assert (busy / "notes.txt").read_text() == "mine"

    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "none.jsonl" in result.output
    result = runner.invoke(app, ["train", "--model", str(tmp_path / "no-model"), "--data", str(pairs_file), "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "no-model: no such model folder" in result.output
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "z"), "--lr", "-1"])
    assert result.exit_code == 2 and "--lr" in result.output
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "w"), "--resume"])
    assert result.exit_code == 2 and "no run to resume" in result.output
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("learning_rat: 1e-5\n")
    result = runner.invoke(app, ["train", "--config", str(bad_config)])
    assert result.exit_code == 2 and "learning_rat" in result.output and str(bad_config) in result.output


def test_prompts_are_cut_from_the_left_keeping_the_template(tiny_gpt2):
    from dpo_align.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_gpt2))
    long_dialogue = " ".join(f"word{i}" for i in range(300)) + " THE END?"
    pairs = [Pair(long_dialogue, "yes", "no", "mem:1"), Pair("short?", "yes", "no", "mem:2")]
    fitted, stats = fit_to_length(pairs, tokenizer, "alpaca", max_length=64)
    assert stats == {"prompt truncated from the left": 1}
    assert fitted[1] == pairs[1]
    assert fitted[0].instruction.endswith("THE END?") and not fitted[0].instruction.startswith("word0")
    prompt = render_prompt(fitted[0].instruction, "alpaca")
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:")
    assert len(tokenizer(prompt)["input_ids"]) + 2 <= 64


def test_decontamination_counts_and_drops_overlap(tiny_gpt2, pairs_file, tmp_path):
    import csv

    data_dir = tmp_path / "suite"
    (data_dir / "truthfulqa").mkdir(parents=True)
    with open(data_dir / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        writer.writerow(["A", "B", "What  is the capital of France? (0)", "Paris", "", "", ""])  # whitespace differs
    (data_dir / "winogrande").mkdir()
    (data_dir / "winogrande" / "dev.jsonl").write_text(json.dumps({"sentence": "The fox is _.", "option1": "quick", "option2": "slow",
                                                                   "answer": "1"}) + "\n")
    messages = []
    manifest = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "run", max_steps=1, eval_suite_data_dir=str(data_dir),
                                 drop_eval_overlap=True), progress=messages.append)
    assert manifest["eval_suite_overlap"] == {"truthfulqa": 1, "winogrande": 0}
    assert manifest["pairs_trained_on"] == 47
    assert any("truthfulqa 1" in m for m in messages)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # Gemma: tied, scaled embeddings
def test_merged_checkpoint_scores_like_base_plus_adapter(arch, request, pairs_file, tmp_path):
    from dpo_align.eval_run import run_eval

    model_path = request.getfixturevalue(f"tiny_{arch}")

    adapter = tmp_path / "adapter"
    train(tiny_config(model_path, pairs_file, adapter, learning_rate=5e-2, save_steps=100), progress=lambda m: None)
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert (merged / "model.safetensors").is_file()
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(merged)])
    assert result.exit_code == 2 and "--overwrite" in result.output

    common = dict(output=tmp_path / "scores", limit=None, data_dir=None, pku_path=str(pairs_file), template="alpaca",
                  batch_size=8, device="cpu", dtype="float32", trust_remote_code=False, datasets=["pku"], progress=lambda m: None)
    runs = run_eval([str(model_path), str(merged)], adapters=[str(adapter)], **common)
    base, merged_ce, peft_ce = (r["table"]["pku"]["ce"][0] for r in runs)
    assert merged_ce == pytest.approx(peft_ce, rel=1e-6)
    assert abs(peft_ce - base) / base > 1e-3  # the adapter really changes the model, so the check has teeth


@pytest.mark.slow
@needs_shared_data
def test_real_model_smoke(default_model_path, tmp_path):
    manifest = train(TrainConfig(data=[str(SHARED_DATA / "splits" / "train-pool.jsonl.gz")], output_dir=str(tmp_path / "run"),
                                 max_steps=2, batch_size=2, max_length=192, logging_steps=1, eval_data=[str(SHARED_DATA / "splits" / "heldout.jsonl.gz")],
                                 eval_max_pairs=4, eval_steps=2).validate(), progress=lambda m: None)
    assert manifest["global_steps"] == 2 and manifest["data"]["rows_kept"] == 7657
    assert 0.0 < manifest["final_train"]["loss"] < 2.0 and "eval_loss" in manifest["final_eval"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_sweep_trains_scores_tables_and_resumes(tiny_gpt2, pairs_file, tmp_path):
    args = ["sweep", "--lr", "1e-3,5e-2", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--eval-data", str(pairs_file),
            "--max-steps", "2", "--batch-size", "4", "--max-length", "96", "--precision", "fp32", "--pku-path", str(pairs_file),
            "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--eval-limit", "8"]
    # The suite needs truthfulqa/winogrande too: give it a tiny data dir.
    import csv

    data_dir = tmp_path / "suite"
    (data_dir / "truthfulqa").mkdir(parents=True)
    (data_dir / "winogrande").mkdir()
    with open(data_dir / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writerow(["A", "B", "What is the capital of France?", "Paris.", "", "Lyon.; Rome.", ""])  # the foils of the controls
        w.writerow(["A", "B", "How do I bake bread?", "Bake it.", "", "Boil it.", ""])
    (data_dir / "winogrande" / "dev.jsonl").write_text(
        json.dumps({"sentence": "The fox is _.", "option1": "quick", "option2": "slow", "answer": "1"}) + "\n"
        + json.dumps({"sentence": "The dog is _.", "option1": "lazy", "option2": "fast", "answer": "1"}) + "\n")
    args += ["--data-dir", str(data_dir)]
    args += ["--preference-data", str(pairs_file), "--curve-docs", "3", "--bootstrap", "200"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    assert "baseline" in table and "DPO lr 0.001" in table and "DPO lr 0.05" in table and "Δ DPO lr 0.05" in table
    # below the ce table: each adapter against the baseline per dataset and the mean, with a verdict; then bpb
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"ce", "bpb", "controls"} and set(comparison["ce"]) == {"DPO lr 0.001", "DPO lr 0.05"}
    # the controlled verdict of every adapter, per dataset and for the mean (ce read beside its foils)
    assert [r["dataset"] for r in comparison["controls"]["DPO lr 0.05"]] == ["dpo_contrast_truthfulqa", "dpo_contrast_winogrande",
                                                                           "dpo_contrast_pku", "mean"]
    assert all(r["verdict"] in ("better", "format shift", "worse", "no detectable change") for r in comparison["controls"]["DPO lr 0.05"])
    assert "Did it get better, or only cheaper?" in table
    rows = comparison["ce"]["DPO lr 0.05"]
    assert [r["dataset"] for r in rows] == ["dpo_ppl_truthfulqa", "dpo_ppl_winogrande", "dpo_ppl_pku", "mean"]
    assert all(r["low"] <= r["relative"] <= r["high"] and r["verdict"] in ("better", "worse", "no detectable change") for r in rows)
    assert "paired bootstrap" in table and "Bits per byte" in table
    # held-out preference: every model; the implicit reward only for adapters (against the base model)
    preference = json.loads((out / "preference.json").read_text())
    assert list(preference["table"]) == ["baseline (" + str(tiny_gpt2) + ")", "DPO lr 0.001", "DPO lr 0.05"]
    assert "reward" not in preference["table"]["baseline (" + str(tiny_gpt2) + ")"] and preference["pairs"] == 48
    assert 0 <= preference["table"]["DPO lr 0.05"]["reward"]["accuracy"] <= 1
    # compare on the sweep folder shows each adapter's likelihood displacement, as preference.json measured it
    compared = runner.invoke(app, ["compare", str(out), "--bootstrap", "100", "--permutations", "100", "-o", str(tmp_path / "cmp")])
    assert compared.exit_code == 0, compared.output
    moved = preference["table"]["DPO lr 0.05"]["displacement"]
    assert "Likelihood displacement on the held-out pairs" in compared.output
    assert f"| DPO lr 0.05 | {moved['chosen_per_token']:+.4f} | {moved['rejected_per_token']:+.4f} |" in compared.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["displacement"][1] == {"model": "DPO lr 0.05", **moved}
    # the scorecard: the sweep's table and compare give the same answers and the rule's pick
    card = json.loads((tmp_path / "cmp" / "compare.json").read_text())["scorecard"]
    assert [c["model"] for c in card["cards"]] == ["DPO lr 0.001", "DPO lr 0.05"] and card["pick"] in ("DPO lr 0.001", "DPO lr 0.05")
    assert card["cards"][1]["q3"] == (moved["chosen_per_token"] >= 0) and card["cards"][1]["verdict"] == comparison["controls"]["DPO lr 0.05"][-1]["verdict"]
    assert "## Scorecard" in table and card["reason"] in table and card["pick"] in card["reason"]
    assert (out / "scorecard.png").read_bytes()[:4] == b"\x89PNG"
    # learning curve of the better run: step 0 (the base model) and each of its checkpoints, on 3 documents per dataset
    curve = json.loads((out / "learning-curve.json").read_text())
    assert curve["label"] == card["pick"]  # the scorecard's pick, not the lowest ce
    assert curve["run"] == {"DPO lr 0.001": "lr-0.001", "DPO lr 0.05": "lr-0.05"}[card["pick"]]  # its folder
    assert [p["step"] for p in curve["points"]] == [0, 1, 2]
    assert {task: len(v) for task, v in curve["documents"].items()} == {"dpo_ppl_truthfulqa": 2, "dpo_ppl_winogrande": 2, "dpo_ppl_pku": 3}
    assert curve["points"][0]["table"]["truthfulqa"]["n"] == 2  # the tiny TruthfulQA has 2 documents: both
    assert (out / "learning-curve.png").read_bytes()[:4] == b"\x89PNG"
    # the report: every section, and the generations of the base model beside each adapter
    page = (out / "report.html").read_text()
    for section in ("Scorecard: did each adapter do the job?", "Cross-entropy", "Against the baseline", "Held-out preference accuracy",
                    "Learning curve", "Training curves", "Generations, side by side", "Runs"):
        assert section in page, section
    assert f"{card['pick']}</b>" in page  # the pick, in bold in both renderings
    assert page.count("<img ") >= 4 and "DPO lr 0.05" in (out / "report.md").read_text()
    # the curve's checkpoints keep their adapters, not the optimizer state (only --resume needs that)
    kept = sorted(p.name for p in (tmp_path / "runs" / "lr-0.05" / "checkpoint-1").iterdir())
    assert "adapter_model.safetensors" in kept and "optimizer.pt" not in kept and "trainer_state.json" in kept
    # each run's record: manifest, settings and training curves (what a machine without the adapters needs)
    assert {p.name for p in (out / "manifests").iterdir() if p.is_file()} == {f"lr-{lr}{suffix}" for lr in ("0.001", "0.05")
                                                                              for suffix in (".json", ".yaml", ".metrics.jsonl")}
    assert (out / "curves" / "loss.png").is_file() and (out / "table.csv").is_file() and (out / "results.json").is_file()
    # Run again: nothing is trained or scored twice.
    before = (out / "scores" / "DPO-lr-0.05.json.gz").stat().st_mtime_ns
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("already finished, kept") == 2 and result.output.count("already scored, kept") == 3 + 3
    assert result.output.count("already computed, kept") == 3
    assert (out / "scores" / "DPO-lr-0.05.json.gz").stat().st_mtime_ns == before
    # a run folder moved away: the report is rebuilt from results.json and says which one is missing
    import shutil

    shutil.move(tmp_path / "runs" / "lr-0.001", tmp_path / "moved")
    rebuilt = runner.invoke(app, ["report", str(out), "--generations", "0"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "Run folder(s) not found" in rebuilt.output and str(tmp_path / "runs" / "lr-0.001") in (out / "report.md").read_text()


def test_crash_after_the_last_step_resumes_without_an_extra_step(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    train(tiny_config(tiny_gpt2, pairs_file, whole, max_steps=4), progress=lambda m: None)
    out = tmp_path / "crashed"

    killed_before_outputs(monkeypatch, tiny_config(tiny_gpt2, pairs_file, out, max_steps=4), "killed while writing the outputs")
    assert (out / "checkpoint-4").is_dir() and not (out / "manifest.json").exists()
    manifest = train(tiny_config(tiny_gpt2, pairs_file, out, max_steps=4), resume=True, progress=lambda m: None)
    assert manifest["global_steps"] == 4
    assert [r["step"] for r in read_rows(out) if "loss" in r] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    a, b = load_file(whole / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)


def test_report_to_needs_its_package(tiny_gpt2, pairs_file, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = runner.invoke(app, ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "-o", str(tmp_path / "r"),
                                 "--report-to", "wandb"])
    assert result.exit_code == 2 and "pip install wandb" in result.output
    assert not (tmp_path / "r").exists()


def test_epochs_grad_accum_and_lora_options(tiny_gpt2, pairs_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-pairs", "16", "--epochs", "2",
        "--batch-size", "2", "--grad-accum", "2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--lora-targets", "c_attn", "--beta", "0.2", "--loss-type", "ipo", "--template", "raw", "--seed", "7",
        "--max-length", "96", "--precision", "fp32", "--logging-steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["global_steps"] == 8  # 16 pairs / (2 x 2) per step x 2 epochs
    assert manifest["pairs_trained_on"] == 16 and manifest["seed"] == 7
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["target_modules"] == ["c_attn"]
    # --beta, --loss-type and --seed are tested by their effects in test_option_effects.py


def test_reference_log_probs_are_cached_reused_and_keyed_on_what_they_depend_on(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    cache = tmp_path / "ref-cache"
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(cache))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:8]))

    def run(name, model=tiny_gpt2, **overrides):  # 2 steps of 4: every one of the 8 pairs, so the reference is computed up front
        manifest = train(tiny_config(model, pairs, tmp_path / name, max_steps=2, **overrides), progress=lambda m: None)
        return manifest["reference_logps"]["train"], read_rows(tmp_path / name)

    first, rows_first = run("first")
    assert first["cached"] is False and first["pairs"] == 8 and len(list(cache.glob("*.safetensors"))) == 1
    again, rows_again = run("again")  # a re-run (and every run of a sweep) reads them back
    assert again["cached"] is True and again["key"] == first["key"]
    assert [r["loss"] for r in rows_again if "loss" in r] == [r["loss"] for r in rows_first if "loss" in r]
    assert [r["logps/chosen"] for r in rows_again if "loss" in r] == [r["logps/chosen"] for r in rows_first if "loss" in r]

    # each thing the numbers depend on changes the key
    assert run("shorter", max_length=80)[0]["cached"] is False
    assert run("template", template="raw")[0]["cached"] is False
    assert run("bf16", precision="bf16")[0]["cached"] is False
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = tmp_path / "changed-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.5
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(changed)
    assert run("weights", model=changed)[0]["cached"] is False
    assert len(list(cache.glob("*.safetensors"))) == 5

    # a damaged cache file is recomputed, not trusted
    (cache / f"{first['key']}.safetensors").write_bytes(b"not a safetensors file")
    damaged, rows_damaged = run("damaged")
    assert damaged["cached"] is False
    assert [r["loss"] for r in rows_damaged if "loss" in r] == [r["loss"] for r in rows_first if "loss" in r]


def test_a_damaged_reference_cache_is_recomputed_and_trains_as_a_clean_run(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    """A cache file is not trusted because it parses: flipped bytes in its values, a cut-off file, and a file of
    another pair count each fail their check, are recomputed with a word, and give the clean run's losses."""
    cache = tmp_path / "ref-cache"
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(cache))

    def run(name, **overrides):  # 16 pairs in 4 steps: every pair, so the reference is computed up front
        said = []
        settings = {"max_pairs": 16, "max_steps": 4, **overrides}
        manifest = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / name, **settings), progress=said.append)
        losses = [(r["loss"], r["rewards/chosen"]) for r in read_rows(tmp_path / name) if "loss" in r]
        return manifest["reference_logps"]["train"], losses, " ".join(said)

    from dpo_align.train import ref_logps

    clean, clean_losses, _ = run("clean")
    path = cache / f"{clean['key']}.safetensors"
    pristine = path.read_bytes()

    def flip_values(data: bytes) -> bytes:  # the header stays valid: only the stored floats change
        header = 8 + int.from_bytes(data[:8], "little")
        body = bytearray(data[header:])
        for i in range(0, len(body), 7):
            body[i] ^= 0x5A
        return data[:header] + bytes(body)

    _, _, _ = run("fewer", max_pairs=12, max_steps=3)  # a cache file of 12 pairs
    other = next(p for p in cache.glob("*.safetensors") if p != path)
    damages = {"flipped": flip_values(pristine), "truncated": pristine[: len(pristine) - 50], "other pair count": other.read_bytes()}
    for name, damaged in damages.items():
        path.write_bytes(damaged)
        report, losses, said = run(name.replace(" ", "-"))
        assert report["cached"] is False, name
        assert "is not used" in said and "Recomputing" in said, (name, said)
        assert losses == clean_losses, name
        assert ref_logps.load(clean["key"], 16) is not None, name  # rewritten whole by the recomputation
    reused, losses, said = run("reused")
    assert reused["cached"] is True and losses == clean_losses and "is not used" not in said


def test_a_sweep_computes_reference_log_probs_once(tiny_gpt2, pairs_file, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(tmp_path / "ref-cache"))
    from dpo_align.sweep import sweep

    base = tiny_config(tiny_gpt2, pairs_file, tmp_path / "unused", max_steps=12, eval_data=[str(pairs_file)], eval_max_pairs=8)
    sweep(base, {"learning_rate": [1e-3, 5e-2, 1e-1]}, runs_dir=tmp_path / "runs", output=tmp_path / "out", eval_limit=2, data_dir=str(tiny_data),
          pku_path=str(tiny_data / "pku.jsonl.gz"), replicates=100, progress=lambda m: None)
    reports = [json.loads((tmp_path / "runs" / name / "manifest.json").read_text())["reference_logps"]
               for name in ("lr-0.001", "lr-0.05", "lr-0.1")]
    assert [r["train"]["cached"] for r in reports] == [False, True, True]
    assert [r["eval"]["cached"] for r in reports] == [False, True, True]


def test_a_short_run_on_a_large_pool_computes_the_reference_per_step_with_the_same_numbers(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    """--max-steps covering part of the data must not pay a reference pass over all of it."""
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(tmp_path / "ref-cache"))
    settings = dict(lr_scheduler="constant", learning_rate=5e-2)
    short = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "short", max_steps=3, **settings), progress=lambda m: None)
    whole = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "whole", max_steps=12, **settings), progress=lambda m: None)
    assert short["reference_logps"]["train"]["mode"].startswith("per step")
    assert "mode" not in whole["reference_logps"]["train"] and whole["reference_logps"]["train"]["pairs"] == 48
    rows_short, rows_whole = read_rows(tmp_path / "short"), read_rows(tmp_path / "whole")
    for key in ("loss", "rewards/chosen", "logps/rejected"):
        assert [r[key] for r in rows_short if key in r] == pytest.approx([r[key] for r in rows_whole if key in r][:3], rel=1e-4, abs=1e-6)
    assert rows_short[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy = reference before the first update


def test_pair_sample_random_draws_across_the_file_and_is_seeded(tiny_gpt2, pairs_file, tmp_path):
    from dpo_align.data.fitting import take_pairs

    pairs = list(range(100))
    first, drawn = take_pairs(pairs, 10, "first", 0), take_pairs(pairs, 10, "random", 0)
    assert first == list(range(10)) and drawn == sorted(drawn) and max(drawn) > 50  # from the whole file, in file order
    assert take_pairs(pairs, 10, "random", 0) == drawn and take_pairs(pairs, 10, "random", 1) != drawn
    assert take_pairs(pairs, 200, "random", 0) == pairs
    # through a run: the manifest's data hash is the file's, but the pairs trained on differ, so the losses do
    runs = {how: train(tiny_config(tiny_gpt2, pairs_file, tmp_path / how, max_steps=2, max_pairs=8, pair_sample=how), progress=lambda m: None)
            for how in ("first", "random")}
    assert runs["first"]["final_train"]["loss"] != runs["random"]["final_train"]["loss"]
    with pytest.raises(Exception, match="--pair-sample must be one of first, random"):
        TrainConfig(pair_sample="shuffled").validate()


def test_sweep_never_reuses_work_made_with_other_settings(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    args = ["sweep", "--lr", "1e-3", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "2", "--max-length", "96",
            "--precision", "fp32", "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
            "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--bootstrap", "100"]
    first = runner.invoke(app, [*args, "--eval-limit", "2"])
    assert first.exit_code == 0, first.output
    # other scoring settings: the run is kept, every score is made again
    again = runner.invoke(app, [*args, "--eval-limit", "1"])
    assert again.exit_code == 0, again.output
    assert "already finished, kept" in again.output and "already scored, kept" not in again.output
    assert again.output.count("made from other weights or settings; recomputing it") == 2
    # the same settings again: everything is reused
    same = runner.invoke(app, [*args, "--eval-limit", "1"])
    assert same.output.count("already scored, kept") == 2
    # other training settings: refused, naming what differs, instead of reusing or continuing the old run
    other = runner.invoke(app, [*args, "--eval-limit", "1", "--max-pairs", "8"])
    assert other.exit_code == 2 and "max_pairs: None there, 8 now" in other.output and "another --runs-dir" in other.output
    # a retrained adapter (same settings, other weights) is scored again
    import shutil

    shutil.rmtree(tmp_path / "runs" / "lr-0.001")
    retrained = runner.invoke(app, [*args, "--eval-limit", "1", "--seed", "3"])
    assert retrained.exit_code == 0, retrained.output
    # the base model's score is still valid (same weights, same scoring settings); the new adapter's is not
    assert retrained.output.count("already scored, kept") == 1 and "[score 1/2] baseline" in retrained.output
    assert retrained.output.count("made from other weights or settings; recomputing it") == 1


def test_a_sweep_on_a_machine_without_its_adapters_rebuilds_from_its_records(tiny_gpt2, pairs_file, tiny_data, tmp_path, monkeypatch):
    """The output folder (committed without the adapters) holds each run's record and cached results: the same command,
    with an empty --runs-dir, trains nothing and writes the same tables; a run whose cached score is damaged, or whose
    record was made with other settings, is trained again, from the reference log-probs the record kept."""
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(tmp_path / "ref-cache"))
    args = ["sweep", "--lr", "1e-3,5e-2", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-pairs", "8", "--batch-size", "4",
            "--max-length", "96", "--precision", "fp32", "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
            "--preference-data", str(pairs_file), "--report-generations", "0", "--eval-limit", "2", "--bootstrap", "100",
            "-o", str(tmp_path / "out")]
    first = runner.invoke(app, [*args, "--runs-dir", str(tmp_path / "runs")])
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    tables = {name: (out / name).read_text() for name in ("table.md", "preference.md")}
    curves = sorted(p.name for p in (out / "curves").iterdir())
    elsewhere = [*args, "--runs-dir", str(tmp_path / "runs")]
    import shutil

    kept = list((out / "manifests" / "reference-logps").glob("*.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == (tmp_path / "ref-cache" / kept[0].name).read_bytes()
    shutil.rmtree(tmp_path / "runs")  # another machine: the output folder only
    shutil.rmtree(tmp_path / "ref-cache")
    again = runner.invoke(app, elsewhere)
    assert again.exit_code == 0, again.output
    assert again.output.count("trained earlier") == 2 and "[train" not in again.output.replace("[train 1/2] lr-0.001: trained", "") \
        .replace("[train 2/2] lr-0.05: trained", "")
    assert not (tmp_path / "runs" / "lr-0.001").exists() and not (tmp_path / "runs" / "lr-0.05").exists()
    assert again.output.count("already scored, kept") == 3 and again.output.count("already computed, kept") == 3
    assert {name: (out / name).read_text() for name in tables} == tables
    assert curves and sorted(p.name for p in (out / "curves").iterdir()) == curves  # drawn from the records
    # a damaged score of one run: that run alone is trained again (its adapter is needed to score it)
    cache = out / "scores" / "DPO-lr-0.05.json.gz"
    cache.write_bytes(gzip.compress(gzip.decompress(cache.read_bytes()).replace(b'"nll": ', b'"nll": 1', 1)))
    damaged = runner.invoke(app, elsewhere)
    assert damaged.exit_code == 0, damaged.output
    assert "lr-0.05: its record in" in damaged.output and "is missing, stale or damaged" in damaged.output
    assert damaged.output.count("trained earlier") == 1 and (tmp_path / "runs" / "lr-0.05" / "manifest.json").is_file()
    retrained = json.loads((tmp_path / "runs" / "lr-0.05" / "manifest.json").read_text())["reference_logps"]["train"]
    assert retrained["cached"] is True and retrained["key"] == kept[0].stem  # no reference pass: the record's, restored
    assert not (tmp_path / "runs" / "lr-0.001").exists()
    # a record made with other settings is not used: the run is trained under the new ones
    shutil.rmtree(tmp_path / "runs")
    other = runner.invoke(app, [*elsewhere, "--seed", "7"])
    assert other.exit_code == 0, other.output
    assert "its record in" in other.output and "made with other settings (seed)" in other.output
    assert "trained earlier" not in other.output and (tmp_path / "runs" / "lr-0.001" / "manifest.json").is_file()


def test_sweep_recomputes_a_cached_score_that_fails_its_checks(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """A score cache is not trusted because it parses and its key matches: an edited value fails the checksum, and a
    value no model gives (nll < 0, written with a valid checksum) fails the range check. Both are scored again, with
    a word, and the results equal the clean run's."""
    from dpo_align.core.files import atomic_write_json, content_checksum, read_json

    args = ["sweep", "--lr", "1e-3", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "2", "--max-length", "96",
            "--precision", "fp32", "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
            "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--bootstrap", "100", "--eval-limit", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    clean = json.loads((tmp_path / "out" / "results.json").read_text())["models"]
    cache = next((tmp_path / "out" / "scores").glob("baseline*.json.gz"))
    stored = read_json(cache)
    task = next(iter(stored["documents"]))

    edited = json.loads(json.dumps(stored))
    edited["documents"][task][0]["nll"] *= 0.5  # still a possible value, but not the one written
    impossible = json.loads(json.dumps(stored))
    impossible["documents"][task][0]["nll"] = -3.0
    impossible["checksum"] = content_checksum({k: v for k, v in impossible.items() if k not in ("key", "checksum", "inputs")})
    for damaged, said in ((edited, "do not match their checksum"), (impossible, "nll is -3.0")):
        atomic_write_json(cache, damaged)
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert said in again.output and "recomputing it" in again.output, again.output
        assert again.output.count("already scored, kept") == 1  # the adapter's cache was sound
        assert json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["table"] == clean[0]["table"]
    assert read_json(cache)["documents"] == stored["documents"]  # rewritten with the model's own numbers


def test_a_cached_result_is_keyed_on_the_files_its_paths_name_not_on_how_they_are_written(tmp_path, monkeypatch):
    """../data/x and /abs/data/x are one setting (a sweep run with the README's relative paths reuses results made with
    absolute ones); another file is another setting."""
    from dpo_align.result_cache import key_of
    from dpo_align.score.evaluate import ModelSpec, ScoreOptions

    (tmp_path / "data").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    spec = ModelSpec("m", str(tmp_path / "data"))

    def keys(path):
        return key_of(spec, ScoreOptions(data_dir=str(path.parent), pku_path=str(path))), key_of(spec, {"sources": [str(path)]})

    absolute = tmp_path / "data" / "a.jsonl"
    assert keys(Path("../data/a.jsonl")) == keys(absolute)
    assert keys(tmp_path / "data" / "b.jsonl")[0] != keys(absolute)[0] and keys(tmp_path / "data" / "b.jsonl")[1] != keys(absolute)[1]


def test_a_cached_result_covering_another_number_of_pairs_is_recomputed(tmp_path):
    """Sound bytes, a matching key and checksum, possible values, but 3 log-probs where the held-out set has 4 pairs:
    the caller's check refuses it, and the result is computed again and stored."""
    from dpo_align.result_cache import cached

    path, said, calls = tmp_path / "model.json", [], []

    def compute():
        calls.append(1)
        return {"logps": {"chosen": [-1.0] * 4, "rejected": [-2.0] * 4}}

    def covers(result):
        return None if all(len(v) == 4 for v in result["logps"].values()) else "it covers another number of pairs than 4"

    cached(path, "k", said.append, "here", "kept", lambda: {"logps": {"chosen": [-1.0] * 3, "rejected": [-2.0] * 3}})
    result = cached(path, "k", said.append, "here", "kept", compute, check=covers)
    assert calls == [1] and len(result["logps"]["chosen"]) == 4
    assert any("covers another number of pairs than 4; recomputing it" in m for m in said)
    assert cached(path, "k", said.append, "here", "kept", compute, check=covers) == result and calls == [1]  # now kept


def test_a_cached_result_is_kept_gzipped_or_plain_and_a_gzip_cut_short_is_recomputed(tmp_path):
    """A ``.json.gz`` cache is written gzipped and reproducibly (the same values, the same bytes); the same result under
    the other spelling (written plain by an earlier version, or gzipped by hand with its own header) is kept, not
    recomputed; a gzip cut short is recomputed with a word; a stale plain copy is replaced, not left beside the new one."""
    import gzip

    from dpo_align.result_cache import cached

    said, calls = [], []

    def compute():
        calls.append(1)
        return {"logps": {"chosen": [-1.0, -2.5], "rejected": [-3.0, -0.5]}}

    gz, plain = tmp_path / "m.json.gz", tmp_path / "m.json"
    first = cached(gz, "k", said.append, "here", "kept", compute)
    written = gz.read_bytes()
    assert written[:2] == b"\x1f\x8b" and not plain.exists()
    gz.unlink()
    assert cached(gz, "k", said.append, "here", "kept", compute) == first and gz.read_bytes() == written and calls == [1, 1]
    plain.write_bytes(gzip.decompress(written))  # a plain cache from an earlier version, where a gzipped one is asked for
    gz.unlink()
    assert cached(gz, "k", said.append, "here", "kept", compute) == first and calls == [1, 1] and not gz.exists()
    other = tmp_path / "n.json"  # asked for plain, found gzipped by hand (another header: name and time)
    with open(tmp_path / "n.json.gz", "wb") as raw, gzip.GzipFile(filename="n.json", mode="wb", fileobj=raw, mtime=1234) as f:
        f.write(gzip.decompress(written))
    assert cached(other, "k", said.append, "here", "kept", compute) == first and calls == [1, 1]
    gz.write_bytes(written[: len(written) // 2])  # cut short: read before the plain copy beside it, and refused
    assert cached(gz, "k", said.append, "here", "kept", compute) == first and calls == [1, 1, 1]
    assert any("unreadable" in m and "recomputing it" in m for m in said) and gz.read_bytes() == written and not plain.exists()
    plain.write_text(gzip.decompress(written).decode().replace('"key": "k"', '"key": "old"'))
    gz.unlink()
    assert cached(gz, "k", said.append, "here", "kept", compute) == first and calls == [1, 1, 1, 1]
    assert gz.read_bytes() == written and not plain.exists()  # made from other weights: recomputed, the old copy gone


def test_ctrl_c_stops_a_real_sweep_in_its_training_and_the_rerun_equals_an_uninterrupted_one(tiny_gpt2, pairs_file, tiny_data, tmp_path):
    """SIGINT to a sweep process while it trains: exit 130 with the command to run again, no results.json and no
    tables; the re-run resumes the cut run from its checkpoint and ends with the uninterrupted sweep's numbers."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}

    def command(name):
        return [sys.executable, "-m", "dpo_align", "sweep", "--lr", "1e-3", "--model", str(tiny_gpt2), "--data", str(pairs_file),
                "--max-steps", "60", "--save-steps", "5", "--logging-steps", "1", "--max-length", "96", "--precision", "fp32", "--report-generations", "0",
                "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2", "--bootstrap", "100",
                "--runs-dir", str(tmp_path / name / "runs"), "-o", str(tmp_path / name / "out")]

    whole = subprocess.run(command("whole"), env=env, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(command("cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "cut" / "runs" / "lr-0.001" / "metrics.jsonl"
    deadline = time.time() + 600
    # sent at step 6 of 60, after the first checkpoint: far from the last step, which would finish the run instead (next test)
    while proc.poll() is None and time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"loss"') >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Sweep interrupted" in output and "Traceback" not in output
    out = tmp_path / "cut" / "out"
    assert not (out / "results.json").exists() and not list(out.glob("table.*")) and not (out / "scores").exists()
    assert not (tmp_path / "cut" / "runs" / "lr-0.001" / "manifest.json").exists()
    again = subprocess.run(command("cut"), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    expected = json.loads((tmp_path / "whole" / "out" / "results.json").read_text())["models"]
    resumed = json.loads((out / "results.json").read_text())["models"]
    for before, after in zip(expected, resumed, strict=True):
        for name, row in before["table"].items():
            assert after["table"][name]["ce"][0] == pytest.approx(row["ce"][0], rel=1e-5), (before["label"], name)


def test_ctrl_c_in_the_last_step_of_a_sweep_finishes_the_run_and_stops_before_the_scoring(tiny_gpt2, pairs_file, tiny_data, tmp_path,
                                                                                              monkeypatch):
    """The race the test above steers clear of: Ctrl-C lands in the run's last step. The run is finished and recorded (a
    checkpoint to resume would be one step too many), and the sweep stops there with 130 instead of scoring for minutes;
    the same command then reuses the run and scores it."""
    from dpo_align.train.callbacks import GracefulInterrupt

    real_step_end = GracefulInterrupt.on_step_end

    def ctrl_c_in_the_last_step(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps and not self.requested:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step_end(self, args, state, control, **kwargs)

    command = ["sweep", "--lr", "1e-3", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "3", "--max-length", "96",
               "--precision", "fp32", "--report-generations", "0", "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
               "--eval-limit", "2", "--bootstrap", "100", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")]
    monkeypatch.setattr(GracefulInterrupt, "on_step_end", ctrl_c_in_the_last_step)
    cut = runner.invoke(app, command)
    assert cut.exit_code == 130 and "Sweep interrupted" in cut.output, cut.output
    assert (tmp_path / "runs" / "lr-0.001" / "manifest.json").is_file() and (tmp_path / "out" / "manifests" / "lr-0.001.json").is_file()
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "scores").exists()
    monkeypatch.setattr(GracefulInterrupt, "on_step_end", real_step_end)
    again = runner.invoke(app, command)
    assert again.exit_code == 0 and "already finished, kept" in again.output, again.output
    assert (tmp_path / "out" / "results.json").is_file()


def test_ctrl_c_while_the_outputs_are_written_finishes_them(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    """Aimed at the window between the adapter being saved and the manifest being written."""
    out = tmp_path / "run"
    real_plot_runs = train_module.plot_runs
    sent = []

    def plot_then_ctrl_c(*args, **kwargs):
        # inside the window: the adapter is saved (staged, moved in with the manifest) and the manifest not yet written
        assert list(out.glob(".staging-*/adapter_model.safetensors")) and not (out / "manifest.json").exists()
        os.kill(os.getpid(), signal.SIGINT)
        sent.append(True)
        return real_plot_runs(*args, **kwargs)

    monkeypatch.setattr(train_module, "plot_runs", plot_then_ctrl_c)
    with pytest.raises(InterruptedAfterFinishing, match="it finished, and its outputs are complete"):  # finished, then stopped as asked
        train(tiny_config(tiny_gpt2, pairs_file, out, max_steps=2), progress=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sent and manifest["status"] == "complete" and manifest["global_steps"] == 2
    for name in ("manifest.json", "README.md", "adapter_model.safetensors", "config.yaml"):
        assert (out / name).is_file()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".staging-*"))  # the cleanup after the manifest ran too


def test_resume_refuses_an_edited_config_naming_the_key(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "run"

    killed_before_outputs(monkeypatch, tiny_config(tiny_gpt2, pairs_file, out, max_steps=4, save_steps=2))
    config = out / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("learning_rate: 0.005", "learning_rate: 0.5"))
    result = runner.invoke(app, ["train", "-o", str(out), "--resume"])
    assert result.exit_code == 2 and "learning_rate: 0.005 in checkpoint-4, 0.5 now" in result.output, result.output
    config.write_text(original)  # restored: the resume goes ahead
    result = runner.invoke(app, ["train", "-o", str(out), "--resume"])
    assert result.exit_code == 0, result.output


def test_resume_refuses_data_that_changed_and_accepts_the_same_file_by_another_path(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    """Provenance checked against the call: the checkpoint records the data's sha256, so a resume on an edited file
    is refused naming both digests; the same file spelt as a relative path is the same setting and resumes."""
    import shutil

    data = tmp_path / "pairs.jsonl"
    shutil.copyfile(pairs_file, data)
    out = tmp_path / "run"
    killed_before_outputs(monkeypatch, tiny_config(tiny_gpt2, data, out, max_steps=4, save_steps=2))
    original = data.read_bytes()
    data.write_bytes(b"".join(original.splitlines(keepends=True)[::-1]))  # the same pairs in another order: other bytes
    refused = runner.invoke(app, ["train", "-o", str(out), "--resume"])
    assert refused.exit_code == 2, refused.output
    assert "the data changed since" in refused.output and "sha256" in refused.output and "restore the file" in refused.output
    assert not (out / "manifest.json").exists()
    data.write_bytes(original)
    monkeypatch.chdir(tmp_path)
    resumed = runner.invoke(app, ["train", "-o", str(out), "--resume", "--data", "pairs.jsonl"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_warmup_that_covers_the_whole_run_is_said(tiny_gpt2, pairs_file, tmp_path):
    from dpo_align.train.run import warmup_warning

    messages = []
    train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "one", max_steps=1, warmup_ratio=0.1), progress=messages.append)
    assert any("--warmup-ratio 0.1 of a 1-step run" in m and "trains at 0" in m for m in messages), messages
    from safetensors.torch import load_file

    # what the warning says: the only step ran at learning rate 0, so LoRA's B (initialised at 0) never moved
    assert all(not w.any() for k, w in load_file(tmp_path / "one" / "adapter_model.safetensors").items() if "lora_B" in k)
    train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "trained", max_steps=1, warmup_ratio=0.0), progress=lambda m: None)
    assert any(w.any() for k, w in load_file(tmp_path / "trained" / "adapter_model.safetensors").items() if "lora_B" in k)
    # a warmup shorter than the run, or none: no word
    assert warmup_warning(tiny_config(tiny_gpt2, pairs_file, tmp_path / "x", max_steps=20, warmup_ratio=0.1), 48) is None
    assert warmup_warning(tiny_config(tiny_gpt2, pairs_file, tmp_path / "x", max_steps=1, warmup_ratio=0.0), 48) is None
    # epochs: 48 pairs at batch 4 is 12 steps; a warmup ratio of 0.95 covers them all
    assert "12-step run" in warmup_warning(tiny_config(tiny_gpt2, pairs_file, tmp_path / "x", max_steps=-1, epochs=1.0, warmup_ratio=0.95), 48)
