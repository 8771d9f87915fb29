"""`dpo-align compare` on real scored folders: both input kinds, the verdicts, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dpo_align.cli import app
from dpo_align.core.errors import UserError

from .conftest import REPO
from .helpers import noisy_adapter

runner = CliRunner()


def evaluate(model, tiny_data, out, *extra):
    args = ["eval", *([str(model)] if model else []), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--device", "cpu",
            "--batch-size", "4", "-o", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def scored(tiny_gpt2, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    base = evaluate(tiny_gpt2, tiny_data, root / "base")
    adapter = noisy_adapter(tiny_gpt2, root / "adapter")
    tuned = evaluate(None, tiny_data, root / "tuned", "--peft", str(adapter))  # the adapter alone, on its base
    # the same base model through lm-eval's own CLI, the way a third party would score it
    metadata = json.dumps({"data_dir": str(tiny_data), "pku_path": str(tiny_data / "pku.jsonl.gz")})
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_gpt2}", "--include_path",
           str(REPO / "lm_eval_tasks"), "--tasks", "dpo_ppl_suite", "--device", "cpu", "--metadata", metadata,
           "--output_path", str(root / "lm"), "--log_samples"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return {"base": base, "tuned": tuned, "lm": root / "lm", "root": root}


def test_compare_two_eval_folders_writes_markdown_json_and_png(scored, tmp_path):
    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["tuned"]), "-o", str(tmp_path / "cmp"),
                                 "--bootstrap", "500", "--permutations", "500"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (label,) = report["ce"]
    rows = report["ce"][label]
    assert [r["dataset"] for r in rows] == ["dpo_ppl_truthfulqa", "dpo_ppl_winogrande", "dpo_ppl_pku", "mean"]
    # the changes are the ones in the two results files
    base = json.loads((scored["base"] / "results.json").read_text())["models"][0]["table"]
    tuned = json.loads((scored["tuned"] / "results.json").read_text())["models"][0]["table"]
    for row, key in zip(rows, ("truthfulqa", "winogrande", "pku", "mean"), strict=True):
        assert row["base"] == pytest.approx(base[key]["ce"][0]) and row["other"] == pytest.approx(tuned[key]["ce"][0])
        assert row["low"] <= row["relative"] <= row["high"] and 0 < row["p"] <= row["p_holm"] <= 1
    assert "Holm" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # the tiny data has 2-3 documents per dataset: the intervals are said to be untrustworthy
    few = next(line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines() if "Too few documents" in line)
    assert "TruthfulQA (3)" in few and "WinoGrande (2)" in few


def test_gzipped_samples_compare_as_the_plain_ones_and_both_at_once_are_refused(scored, tmp_path):
    """results/ keeps bulky per-document files gzipped: a folder whose samples are TASK.jsonl.gz pairs the same."""
    import gzip
    import shutil

    packed = tmp_path / "tuned-gz"
    shutil.copytree(scored["tuned"], packed)
    plain = sorted(packed.glob("samples/*/*.jsonl"))
    assert plain
    for path in plain:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    args = ["--bootstrap", "200", "--permutations", "200"]
    runner.invoke(app, ["compare", str(scored["base"]), str(scored["tuned"]), "-o", str(tmp_path / "a"), *args])
    result = runner.invoke(app, ["compare", str(scored["base"]), str(packed), "-o", str(tmp_path / "b"), *args])
    assert result.exit_code == 0, result.output
    a, b = (json.loads((tmp_path / name / "compare.json").read_text())["ce"] for name in ("a", "b"))
    assert list(a.values()) == list(b.values())
    shutil.copy(scored["tuned"] / plain[0].relative_to(packed), plain[0])  # the same task twice: which one is meant?
    twice = runner.invoke(app, ["compare", str(scored["base"]), str(packed), "-o", str(tmp_path / "c"), *args])
    assert twice.exit_code == 2 and f"{plain[0].stem} is there twice" in twice.output
    plain[0].with_name(plain[0].name + ".gz").write_bytes(b"\x1f\x8b cut short")  # a damaged archive names its file
    plain[0].unlink()
    damaged = runner.invoke(app, ["compare", str(scored["base"]), str(packed), "-o", str(tmp_path / "d"), *args])
    assert damaged.exit_code == 2 and f"{plain[0].name}.gz: not readable as gzipped UTF-8 text" in damaged.output


def test_an_lm_eval_folder_of_the_same_model_shows_no_change(scored):
    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["lm"]), "--bootstrap", "300", "--permutations", "300"])
    assert result.exit_code == 0, result.output
    from dpo_align.report import compare

    models = compare.load([str(scored["base"]), str(scored["lm"])])
    changes = compare.compare(models, replicates=300, permutations=300)
    for c in changes["ce"][models[1].label]:  # same model, same documents: dpo-hf and lm-eval's hf agree per document
        assert abs(c.relative) < 1e-5 and c.verdict == "no detectable change"


def test_a_folder_with_several_models_and_a_sweep_style_results_file(scored, tiny_gpt2, tiny_data, tmp_path):
    both = evaluate(tiny_gpt2, tiny_data, tmp_path / "both", "--peft", str(scored["root"] / "adapter"))
    result = runner.invoke(app, ["compare", str(both), "--bootstrap", "200", "--permutations", "200", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "adapter (LoRA)" in result.output
    # --baseline turns the comparison round: the adapter becomes the baseline and each change is the inverse one
    result = runner.invoke(app, ["compare", str(both), "--baseline", "lora", "--bootstrap", "200", "--permutations", "200",
                                 "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    forward, backward = (json.loads((tmp_path / d / "compare.json").read_text())["ce"] for d in "ab")
    ((adapter, there),), ((base, back),) = forward.items(), backward.items()
    assert "LoRA" in adapter and "LoRA" not in base
    for a, b in zip(there, back, strict=True):
        assert a["dataset"] == b["dataset"] and (1 + a["relative"]) * (1 + b["relative"]) == pytest.approx(1, rel=1e-9)
    for name, said in (("nothing-like-it", "names no model"), ("", "names 2 models")):
        refused = runner.invoke(app, ["compare", str(both), "--baseline", name])
        assert refused.exit_code != 0 and said in refused.output, refused.output


def test_refusals_name_the_reason(scored, tiny_gpt2, tiny_data, tmp_path):
    fewer = evaluate(tiny_gpt2, tiny_data, tmp_path / "fewer", "--limit", "1")
    # lm-eval gives a one-document task the stderr "N/A": the tables say n/a instead of failing
    assert "± n/a" in (fewer / "table.md").read_text() and ",," in (fewer / "table.csv").read_text()
    result = runner.invoke(app, ["compare", str(scored["base"]), str(fewer)])
    assert result.exit_code == 2 and "different documents" in result.output and "Traceback" not in result.output
    chat = evaluate(tiny_gpt2, tiny_data, tmp_path / "chat", "--template", "raw")
    result = runner.invoke(app, ["compare", str(scored["base"]), str(chat)])
    assert result.exit_code == 2 and "template 'raw'" in result.output
    # an edited document (same id): lm-eval's document hash differs
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(scored["base"]), str(edited)], check=True)
    sample = next((edited / "samples").iterdir()) / "dpo_ppl_pku.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    rows[0]["doc_hash"] = "0" * 64
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["compare", str(scored["base"]), str(edited)])
    assert result.exit_code == 2 and "dpo_ppl_pku document 0" in result.output
    result = runner.invoke(app, ["compare", str(scored["base"])])
    assert result.exit_code == 2 and "at least two models" in result.output
    result = runner.invoke(app, ["compare", str(scored["base"]), str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere: no such folder" in result.output


def test_controls_are_read_where_both_models_have_them_and_their_absence_is_said(scored, tmp_path):
    import math

    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["tuned"]), "-o", str(tmp_path / "cmp"),
                                 "--bootstrap", "300", "--permutations", "300"])
    assert result.exit_code == 0, result.output
    assert "Did it get better, or only cheaper?" in result.output and "No control was scored" not in result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (label,) = report["controls"]
    base = json.loads((scored["base"] / "results.json").read_text())["models"][0]["table"]
    tuned = json.loads((scored["tuned"] / "results.json").read_text())["models"][0]["table"]
    for row, key in zip(report["controls"][label], ("truthfulqa", "winogrande", "pku", "mean"), strict=True):
        # the specific change is the ratio of the two results files' ce against the ratio of their foils' ce
        expected = math.log(tuned[key]["ce"][0] / base[key]["ce"][0]) - math.log(tuned[key]["ce_foil"][0] / base[key]["ce_foil"][0])
        assert row["specific"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert row["specific_low"] <= row["specific"] <= row["specific_high"]
        assert row["verdict"] in ("better", "format shift", "worse", "no detectable change")
        assert row["acc_base"] == pytest.approx(base[key]["acc"][0]) and row["acc_other"] == pytest.approx(tuned[key]["acc"][0])
    # lm_eval's own folder was scored without the contrast tasks: the comparison says so and reads ce alone
    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["lm"]), "--bootstrap", "300", "--permutations", "300"])
    assert result.exit_code == 0, result.output
    assert "No control was scored" in result.output and "verdict (ce alone)" in result.output


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tokens", -3, "tokens is -3; token and byte counts are whole numbers >= 1"),
    ("nll", float("nan"), "nll is nan; a negative log-likelihood is a finite number >= 0"),
    ("nll", -1.5, "nll is -1.5"),
    ("foil_tokens", 0, "foil_tokens is 0"),
])
def test_impossible_numbers_in_a_samples_file_name_the_file_and_line(scored, tmp_path, field, value, message):
    edited = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(scored["tuned"]), str(edited)], check=True)
    task = "dpo_contrast_winogrande" if field.startswith("foil") else "dpo_ppl_winogrande"
    sample = next((edited / "samples").iterdir()) / f"{task}.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    rows[1][field] = value
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["compare", str(scored["base"]), str(edited)])
    assert result.exit_code == 2 and f"{task}.jsonl:2: {message}" in result.output and "Traceback" not in result.output, result.output


def test_the_same_folder_twice_is_refused(scored):
    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["base"])])
    assert result.exit_code == 2 and "is given twice" in result.output


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable preference.json"),
    ('{"table": [1, 2]}', "its 'table' is not an object"),
    ('{"table": {"tuned": {"displacement": {"chosen_per_token": -0.1}}}}', "lacks both_fell, pairs, rejected_per_token"),
])
def test_a_damaged_preference_json_is_named_not_taken_for_an_absent_one(tmp_path, content, message):
    from dpo_align.report import compare

    (tmp_path / "preference.json").write_text(content, encoding="utf-8")
    models = [compare.Scored("base", str(tmp_path), {}), compare.Scored("tuned", str(tmp_path), {})]
    with pytest.warns(UserWarning, match=message) as caught:
        assert compare.displacement_rows(models) == []
    assert str(tmp_path / "preference.json") in str(caught[0].message)
    whole = {"chosen_per_token": -0.1, "rejected_per_token": -0.2, "both_fell": 0.5, "pairs": 8}
    (tmp_path / "preference.json").write_text(json.dumps({"table": {"tuned": {"displacement": whole}}}), encoding="utf-8")
    assert compare.displacement_rows(models) == [{"model": "tuned", **whole}]
    (tmp_path / "preference.json").unlink()  # no file: no section, and nothing to say
    assert compare.displacement_rows(models) == []


def test_compare_prints_the_scorecard_and_picks_only_against_the_base_model(scored, tmp_path):
    import shutil

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    shutil.copytree(scored["base"], base)
    shutil.copytree(scored["tuned"], tuned)
    labels = [json.loads((f / "results.json").read_text())["models"][0]["label"] for f in (base, tuned)]
    # what a sweep writes: the base model's row has no reward (it is the reference), the adapter's has
    (base / "preference.json").write_text(json.dumps({"table": {labels[0]: {"length_normalised": {}}}}))
    (tuned / "preference.json").write_text(json.dumps({"table": {labels[1]: {
        "reward": {"accuracy": 0.9, "stderr": 0.01, "pairs": 8},
        "displacement": {"chosen_per_token": 0.2, "rejected_per_token": -0.3, "both_fell": 0.0, "pairs": 8}}}}))
    args = ["--bootstrap", "300", "--permutations", "300"]
    result = runner.invoke(app, ["compare", str(base), str(tuned), "-o", str(tmp_path / "cmp"), *args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())["scorecard"]
    (answers,) = report["cards"]
    mean = json.loads((tmp_path / "cmp" / "compare.json").read_text())["controls"][labels[1]][-1]
    assert answers["verdict"] == mean["verdict"] and answers["q1"] == (mean["verdict"] == "better")
    assert answers["q2"] is True and answers["q3"] is True and report["pick"] == labels[1]
    assert "## Scorecard" in result.output and f"**{labels[1]}**" in result.output
    assert (tmp_path / "cmp" / "scorecard.png").read_bytes()[:4] == b"\x89PNG"
    # read against the adapter, Q1 is no longer against the base model: the table is there, the pick is not
    result = runner.invoke(app, ["compare", str(base), str(tuned), "--baseline", labels[1], "-o", str(tmp_path / "cmp2"), *args])
    assert result.exit_code == 0, result.output
    assert "No pick here" in result.output
    assert json.loads((tmp_path / "cmp2" / "compare.json").read_text())["scorecard"]["pick"] is None
    # without a preference table there is no scorecard at all
    result = runner.invoke(app, ["compare", str(scored["base"]), str(scored["tuned"]), "-o", str(tmp_path / "cmp3"), *args])
    assert result.exit_code == 0 and "## Scorecard" not in result.output
    assert not (tmp_path / "cmp3" / "scorecard.png").exists()


def test_baseline_by_a_word_of_its_label_picks_plain_dpo_among_its_variants():
    from types import SimpleNamespace

    from dpo_align.report.compare import with_baseline

    models = [SimpleNamespace(label=label) for label in
              ("baseline (smollm2)", "DPO loss_type-sigmoid", "DPO loss_type-sigmoid+sft", "DPO loss_type-sigmoid_norm")]
    assert with_baseline(models, "sigmoid")[0].label == "DPO loss_type-sigmoid"  # the word, not the three labels holding it
    assert with_baseline(models, "sigmoid+sft")[0].label == "DPO loss_type-sigmoid+sft"
    assert with_baseline(models, "loss_type-sigmoid")[0].label == "DPO loss_type-sigmoid"  # the run's folder name
    assert with_baseline(models, "NORM")[0].label == "DPO loss_type-sigmoid_norm"  # a part naming one model, any case
    assert [m.label for m in with_baseline(models, "sigmoid")[1:]] == [m.label for m in models if m.label != "DPO loss_type-sigmoid"]
    with pytest.raises(UserError, match="names 3 models"):
        with_baseline(models, "loss_type")


def test_a_degenerate_interval_is_drawn_not_a_crash():
    """A bootstrap over one document can leave the point a rounding error outside its interval: the plot clamps the
    error bar at 0 instead of matplotlib refusing it (compare once wrote compare.md and crashed in the plot)."""
    from dpo_align.report import compare as compare_module
    from dpo_align.report.paired import Change

    row = [Change("dpo_ppl_truthfulqa", 2.0, 1.9, -0.05, -0.05 + 1e-17, -0.05 + 2e-17, 1), Change("mean", 2.0, 1.9, -0.05, -0.05, -0.05, 1)]
    assert compare_module.plot({"ce": {"adapter": row}})[:4] == b"\x89PNG"


def test_a_label_two_folders_hold_is_shown_with_its_folder_and_keeps_its_scorecard_row(scored, tmp_path):
    """Two sweeps of one grid (a confirmation's seed=42,7 for two trials) hold the same labels: each is shown with its
    folder's name, and its held-out preference row (filed under the plain label) still answers Q2 and Q3."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(scored["base"], base)
    label = json.loads((scored["tuned"] / "results.json").read_text())["models"][0]["label"]
    for name, accuracy in (("confirm-1", 0.9), ("confirm-2", 0.5)):
        shutil.copytree(scored["tuned"], tmp_path / name)
        (tmp_path / name / "preference.json").write_text(json.dumps({"table": {label: {
            "reward": {"accuracy": accuracy, "stderr": 0.01, "pairs": 8},
            "displacement": {"chosen_per_token": 0.2, "rejected_per_token": -0.3, "both_fell": 0.0, "pairs": 8}}}}))
    # confirm-2's adapter is another training (other weights) that happens to score the same
    results = json.loads((tmp_path / "confirm-2" / "results.json").read_text())
    results["models"][0]["revision"] = {"adapter": {"sha256": {"adapter_model.safetensors": "0" * 64}}}
    (tmp_path / "confirm-2" / "results.json").write_text(json.dumps(results))
    shutil.copytree(scored["base"], tmp_path / "base-again")  # the base model a second sweep holds too: the same weights and numbers
    result = runner.invoke(app, ["compare", str(base), str(tmp_path / "confirm-1"), str(tmp_path / "confirm-2"), str(tmp_path / "base-again"),
                                 "-o", str(tmp_path / "cmp"), "--bootstrap", "300", "--permutations", "300"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(report["ce"]) == [f"{label} (confirm-1)", f"{label} (confirm-2)"]  # the base model once, as the baseline
    cards = {card["model"]: card for card in report["scorecard"]["cards"]}
    assert cards[f"{label} (confirm-1)"]["q2"] is True and cards[f"{label} (confirm-2)"]["q2"] is False
