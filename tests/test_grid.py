"""`dpo-align sweep --grid`: any training setting spanned, runs named by what differs, every point checked first."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.core.errors import UserError
from dpo_align.grid import parse_grid, points, run_names
from dpo_align.train.config import TrainConfig

runner = CliRunner()


def test_values_are_typed_as_their_settings_and_lists_use_plus():
    grid = parse_grid(["beta=0.1,0.5", "loss_type=sigmoid,sigmoid+sft", "lora_r=4", "drop_eval_overlap=true", "save_steps=0.1,50"])
    assert grid == {"beta": [0.1, 0.5], "loss_type": ["sigmoid", "sigmoid,sft"], "lora_r": [4], "drop_eval_overlap": [True],
                    "save_steps": [0.1, 50]}
    assert len(points(grid)) == 8 and points(grid)[0] == {"beta": 0.1, "loss_type": "sigmoid", "lora_r": 4, "drop_eval_overlap": True,
                                                         "save_steps": 0.1}


def test_runs_are_named_by_what_differs_and_lr_keeps_its_old_names():
    assert run_names(parse_grid([], lr="5e-6,1e-5,1e-4")) == ["lr-5e-06", "lr-1e-05", "lr-0.0001"]
    names = run_names(parse_grid(["loss_type=sigmoid,ipo,sigmoid+sft", "beta=0.1"], lr="1e-4"))
    assert names == ["loss_type-sigmoid", "loss_type-ipo", "loss_type-sigmoid+sft"]  # lr and beta are the same for all
    # --lr varies slowest, then each --grid in the order given
    assert run_names(parse_grid(["beta=0.1,0.5"], lr="1e-5,1e-4")) == ["beta-0.1_lr-1e-05", "beta-0.5_lr-1e-05", "beta-0.1_lr-0.0001",
                                                                      "beta-0.5_lr-0.0001"]


@pytest.mark.parametrize(("items", "lr", "message"), [
    (["betta=0.1,0.5"], None, "'betta' is not a training setting. Known: "),
    (["beta=fast"], None, "--grid beta=fast: 'fast' is not a value of beta"),
    (["lora_r=4.5"], None, "'4.5' is not a value of lora_r"),
    (["beta=0.1,0.1"], None, "a value is listed twice (a duplicate grid point)"),
    (["beta=0.1", "beta=0.5"], None, "--grid beta is given twice"),
    (["learning_rate=1e-5"], "1e-4", "--lr and --grid learning_rate=... both give learning rates"),
    (["output_dir=a,b"], None, "'output_dir' is not a training setting"),
    (["beta"], None, "write NAME=V1,V2"),
])
def test_bad_grids_name_the_option(items, lr, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("+", r"\+")):
        parse_grid(items, lr=lr)


def test_a_grid_of_two_settings_trains_two_named_runs_sharing_one_reference_pass(tiny_gpt2, pairs_file, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_ALIGN_REF_CACHE", str(tmp_path / "ref-cache"))
    result = runner.invoke(app, ["sweep", "--grid", "loss_type=sigmoid,sigmoid+sft", "--grid", "loss_weights=1+0.5", "--model", str(tiny_gpt2),
                                 "--data", str(pairs_file), "--max-steps", "2", "--max-length", "96", "--precision", "fp32",
                                 "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2",
                                 "--bootstrap", "100", "--report-generations", "0", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")])
    # a one-component loss with two weights is refused for that run before anything trains
    assert result.exit_code == 2 and "--loss-weights '1,0.5' gives 2 weight(s) for 1 loss type(s)" in result.output, result.output
    assert not (tmp_path / "runs" / "loss_type-sigmoid").exists()
    # 8 pairs in 2 steps: each run covers its data, so the reference is one pass over it (cached), not one per step
    result = runner.invoke(app, ["sweep", "--grid", "loss_type=sigmoid,sigmoid+sft", "--lr", "1e-3", "--model", str(tiny_gpt2),
                                 "--data", str(pairs_file), "--max-pairs", "8", "--max-steps", "2", "--logging-steps", "1", "--max-length", "96",
                                 "--precision", "fp32",
                                 "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--eval-limit", "2",
                                 "--bootstrap", "100", "--report-generations", "0", "--runs-dir", str(tmp_path / "runs"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifests = {name: json.loads((tmp_path / "runs" / name / "manifest.json").read_text()) for name in ("loss_type-sigmoid", "loss_type-sigmoid+sft")}
    assert [m["reference_logps"]["train"]["cached"] for m in manifests.values()] == [False, True]  # one reference pass for both
    configs = {name: (tmp_path / "runs" / name / "config.yaml").read_text() for name in manifests}
    assert "loss_type: sigmoid\n" in configs["loss_type-sigmoid"] and "loss_type: sigmoid,sft\n" in configs["loss_type-sigmoid+sft"]
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line] for name in manifests}
    assert losses["loss_type-sigmoid+sft"][0] > losses["loss_type-sigmoid"][0] + 0.5  # the NLL term is in the second run's loss
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["label"] for m in results["models"]][1:] == ["DPO", "RPO"]
    assert results["settings"]["grid"] == {"learning_rate": [1e-3], "loss_type": ["sigmoid", "sigmoid,sft"]}


def test_runs_are_labelled_by_their_recipe():
    """Tables name a run by its objective and the other settings its grid varies (SFT, RPO, SFT → DPO, DPO lr 1e-05), not
    "DPO loss_type-sft"; two runs that would read alike keep their run names."""
    from dpo_align.grid import recipe_labels, run_names

    def labels(grid, **base):
        configs = {name: TrainConfig(model="m", data=["d.jsonl"], **base, **point)
                   for name, point in zip(run_names(grid), points(grid), strict=True)}
        return recipe_labels(configs, grid)

    assert labels({"loss_type": ["sigmoid", "sft", "sigmoid,sft", "ipo", "apo_zero"]}) == {
        "loss_type-sigmoid": "DPO", "loss_type-sft": "SFT", "loss_type-sigmoid+sft": "RPO", "loss_type-ipo": "IPO",
        "loss_type-apo_zero": "APO-zero"}
    assert labels({"learning_rate": [5e-6, 1e-5]}) == {"lr-5e-06": "DPO lr 5e-06", "lr-1e-05": "DPO lr 1e-05"}
    assert labels({"loss_type": ["sigmoid,sft"], "loss_weights": ["1,0.5", "1,1"], "beta": [0.1, 0.5]}) == {
        "beta-0.1_loss_weights-1+0.5": "RPO (1+0.5) beta 0.1", "beta-0.1_loss_weights-1+1": "RPO beta 0.1",
        "beta-0.5_loss_weights-1+0.5": "RPO (1+0.5) beta 0.5", "beta-0.5_loss_weights-1+1": "RPO beta 0.5"}
    assert labels({"sft_first_pairs": [None, 100]}) == {"sft_first_pairs-None": "DPO", "sft_first_pairs-100": "SFT → DPO"}
    assert labels({"loss_type": ["ipo,sft"], "loss_weights": ["1,2"]}) == {"loss_type-ipo+sft_loss_weights-1+2": "IPO + SFT (1+2)"}
    assert labels({"lora_dropout": [0.0, 0.1]}) == {"lora_dropout-0": "DPO lora_dropout 0", "lora_dropout-0.1": "DPO lora_dropout 0.1"}
    # weights left to TRL (1 each) and written out as 1+1 read alike: the run names, not two columns named "RPO"
    assert labels({"loss_type": ["sigmoid,sft"], "loss_weights": [None, "1,1"]}) == {
        "loss_weights-None": "DPO loss_weights-None", "loss_weights-1+1": "DPO loss_weights-1+1"}
