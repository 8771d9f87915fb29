"""Held-out preference accuracy: log-probs against an independent loop, and the two accuracies by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpo_align.score.preference import displacement, length_normalised_accuracy, load_for, model_logps, preference_table, reward_accuracy

from .helpers import lora_adapter, transcript


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    rows = []
    for i in range(6):
        context = [f"Where is the fox number {i}?"] + (["In the den.", "And the dog?"] if i % 2 else [])
        rows.append({"chosen": transcript(context + ["The quick brown fox is in the den. " * (1 + i % 2)]),
                     "rejected": transcript(context + [f"No {i}."])})
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def independent(model, dataset) -> dict[str, list[float]]:
    """Each response scored alone: prompt + response in one row, full logits, log_softmax, sum."""
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for ex in dataset:
            for side in ("chosen", "rejected"):
                ids = torch.tensor([ex["prompt_ids"] + ex[f"{side}_ids"]])
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                start = len(ex["prompt_ids"]) - 1
                targets = ids[0, start + 1:]
                out[side].append(logps[start:].gather(1, targets[:, None]).sum().item())
    return out


@pytest.mark.parametrize("with_adapter", [False, True])
def test_log_probs_match_an_independent_loop(tiny_llama, heldout, tmp_path, with_adapter):
    from transformers import AutoModelForCausalLM

    dataset, pad, report = load_for(str(tiny_llama), [str(heldout)], template="alpaca", max_length=256)
    assert len(dataset) == 6 and report.rows_kept == 6
    adapter = str(tmp_path / "adapter") if with_adapter else None
    reference = lora_adapter(tiny_llama, adapter, init_lora_weights=False, seed=None).eval() if with_adapter else AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    got = model_logps(str(tiny_llama), adapter, dataset, pad_token_id=pad, max_length=256, label="t")
    want = independent(reference, dataset)
    assert got["chosen"] == pytest.approx(want["chosen"], rel=1e-4) and got["rejected"] == pytest.approx(want["rejected"], rel=1e-4)
    assert got["chosen_tokens"].tolist() == [len(ex["chosen_ids"]) for ex in dataset]
    assert got["rejected_tokens"].tolist() == [len(ex["rejected_ids"]) for ex in dataset]


def test_an_adapter_that_changes_nothing_has_no_reward_preference(tiny_llama, heldout, tmp_path):
    dataset, pad, _ = load_for(str(tiny_llama), [str(heldout)], template="alpaca", max_length=256)
    lora_adapter(tiny_llama, tmp_path / "zero", init_lora_weights=True, seed=None).eval()  # LoRA B = 0: the adapter is the identity
    base = model_logps(str(tiny_llama), None, dataset, pad_token_id=pad, max_length=256, label="base")
    same = model_logps(str(tiny_llama), str(tmp_path / "zero"), dataset, pad_token_id=pad, max_length=256, label="zero")
    table = preference_table({"base": base, "zero": same}, baseline="base", beta=0.1)
    assert table["zero"]["reward"]["accuracy"] == 0.5 and table["zero"]["reward"]["mean_margin"] == 0.0  # all ties: half each
    assert "reward" not in table["base"]
    assert table["zero"]["length_normalised"] == table["base"]["length_normalised"]


def test_the_accuracies_by_hand():
    lp = {"chosen": np.array([-10.0, -30.0, -8.0, -5.0]), "rejected": np.array([-12.0, -10.0, -8.0, -1.0]),
          "chosen_tokens": np.array([10, 30, 4, 5]), "rejected_tokens": np.array([4, 5, 4, 1])}
    # per token: chosen -1, -1, -2, -1 against rejected -3, -2, -2, -1: wins 1, 1, tie, tie
    assert length_normalised_accuracy(lp)["accuracy"] == 0.75
    ref = {"chosen": np.array([-11.0, -30.0, -9.0, -5.0]), "rejected": np.array([-11.0, -11.0, -7.0, -2.0])}
    # log-ratios chosen +1, 0, +1, 0 against rejected -1, +1, -1, +1: wins, loses, wins, loses
    result = reward_accuracy(lp, ref, beta=0.5)
    assert result["accuracy"] == 0.5 and result["mean_margin"] == pytest.approx(0.5 * (2 - 1 + 2 - 1) / 4)
    assert result["stderr"] == pytest.approx(np.sqrt(0.25 / 4))


def test_the_displacement_by_hand():
    lp = {"chosen": np.array([-12.0, -30.0]), "rejected": np.array([-9.0, -10.0]),
          "chosen_tokens": np.array([4, 10]), "rejected_tokens": np.array([3, 5])}
    ref = {"chosen": np.array([-10.0, -31.0]), "rejected": np.array([-6.0, -12.0])}
    moved = displacement(lp, ref)
    # per token: chosen -2/4 and +1/10, rejected -3/3 and +2/5; pair 0's chosen and rejected both fell, pair 1's both rose
    assert moved["chosen_per_token"] == pytest.approx((-0.5 + 0.1) / 2) and moved["rejected_per_token"] == pytest.approx((-1 + 0.4) / 2)
    assert moved["both_fell"] == 0.5 and moved["pairs"] == 2


def test_the_displacement_equals_an_independent_loop(tiny_llama, heldout, tmp_path):
    from transformers import AutoModelForCausalLM

    dataset, pad, _ = load_for(str(tiny_llama), [str(heldout)], template="alpaca", max_length=256)
    adapter = str(tmp_path / "adapter")
    tuned = independent(lora_adapter(tiny_llama, adapter, init_lora_weights=False, seed=None).eval(), dataset)
    base = independent(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), dataset)
    got = displacement(model_logps(str(tiny_llama), adapter, dataset, pad_token_id=pad, max_length=256, label="a"),
                       model_logps(str(tiny_llama), None, dataset, pad_token_id=pad, max_length=256, label="b"))
    chosen = np.mean([(t - b) / len(ex["chosen_ids"]) for t, b, ex in zip(tuned["chosen"], base["chosen"], dataset, strict=True)])
    rejected = np.mean([(t - b) / len(ex["rejected_ids"]) for t, b, ex in zip(tuned["rejected"], base["rejected"], dataset, strict=True)])
    both = np.mean([tc < bc and tr < br for tc, bc, tr, br in zip(tuned["chosen"], base["chosen"], tuned["rejected"], base["rejected"], strict=True)])
    assert got["chosen_per_token"] == pytest.approx(chosen, rel=1e-4) and got["rejected_per_token"] == pytest.approx(rejected, rel=1e-4)
    assert got["both_fell"] == both and abs(chosen) > 1e-4  # the adapter really moves the log-probs
