"""Training options tested by what they change (a reward, a loss, an order, a learning rate), not by their echo."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from dpo_align.train.run import train

from .helpers import read_rows, tiny_config


def run(model, data, out, **overrides):
    settings = dict(max_steps=3, logging_steps=1, learning_rate=5e-2, lr_scheduler="constant", warmup_ratio=0.0, lora_dropout=0.0)
    manifest = train(tiny_config(model, data, out, **{**settings, **overrides}), progress=lambda m: None)
    return manifest, read_rows(out)


def first(rows, key):
    return next(r[key] for r in rows if key in r)


def test_beta_scales_the_rewards(tiny_gpt2, pairs_file, tmp_path):
    # One Adam step moves the adapter by lr * sign(gradient) whatever beta scales the gradient by, so
    # after it both runs hold the same adapter, and the held-out rewards (beta * log-ratio) differ by
    # exactly the factor of the betas.
    common = dict(max_steps=1, eval_data=[str(pairs_file)], eval_max_pairs=8, eval_steps=1)
    _, low = run(tiny_gpt2, pairs_file, tmp_path / "b1", beta=0.1, **common)
    _, high = run(tiny_gpt2, pairs_file, tmp_path / "b2", beta=0.2, **common)
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"):
        assert first(low, key) != 0 and first(high, key) == pytest.approx(2 * first(low, key), rel=1e-3)
    assert first(high, "eval_loss") != first(low, "eval_loss")


def test_loss_type_ipo_changes_the_loss(tiny_gpt2, pairs_file, tmp_path):
    _, sigmoid = run(tiny_gpt2, pairs_file, tmp_path / "s", loss_type="sigmoid", max_steps=1)
    _, ipo = run(tiny_gpt2, pairs_file, tmp_path / "i", loss_type="ipo", max_steps=1)
    margin = first(sigmoid, "rewards/margins") / 0.1  # the log-ratio difference (same first batch)
    # sigmoid: -log sigmoid(beta * h); ipo: (h - 1 / (2 beta))^2, per pair then averaged; at step 1 the
    # adapter is at its init (B = 0), so h = 0 for every pair and the losses are exact constants.
    assert margin == pytest.approx(0.0, abs=1e-6)
    assert first(sigmoid, "loss") == pytest.approx(math.log(2), rel=1e-5)
    assert first(ipo, "loss") == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)


def test_seed_changes_the_data_order_and_the_lora_init(tiny_gpt2, pairs_file, tmp_path):
    _, a = run(tiny_gpt2, pairs_file, tmp_path / "a", seed=1, max_steps=2)
    _, a_again = run(tiny_gpt2, pairs_file, tmp_path / "a2", seed=1, max_steps=2)
    _, b = run(tiny_gpt2, pairs_file, tmp_path / "b", seed=2, max_steps=2)
    # same seed, same batches (the reference log-probs of the first batch match); another seed, other batches
    assert first(a, "logps/chosen") == first(a_again, "logps/chosen")
    assert first(a, "logps/chosen") != first(b, "logps/chosen")
    # the LoRA A matrices are drawn from the seed: identical for one seed, different for another
    def lora_a(name):
        weights = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        return {k: v for k, v in weights.items() if "lora_A" in k}

    wa, wa2, wb = lora_a("a"), lora_a("a2"), lora_a("b")
    assert all((wa[k] == wa2[k]).all() for k in wa) and any((wa[k] != wb[k]).any() for k in wa)


def test_warmup_ratio_is_a_fraction_of_the_steps(tiny_gpt2, pairs_file, tmp_path):
    # 10 steps, warmup_ratio 0.4: 4 warmup steps. The rate logged at step s is the one step s used,
    # lr * (s - 1) / 4 while warming up, then the cosine decay over the 6 steps left. (Had 0.4 been
    # read as a step count, there would be no warmup: the first rate would be the peak.)
    _, rows = run(tiny_gpt2, pairs_file, tmp_path / "w", max_steps=10, warmup_ratio=0.4, lr_scheduler="cosine", learning_rate=1e-2)
    lrs = [r["learning_rate"] for r in rows if "learning_rate" in r]
    assert lrs[:4] == pytest.approx([1e-2 * k / 4 for k in range(4)])
    assert lrs[4:] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])


def test_label_smoothing_makes_robust_another_loss_than_sigmoid(tiny_gpt2, pairs_file, tmp_path):
    # TRL's robust loss, (-(1-e) log s(bh) + e log s(-bh)) / (1-2e), is sigmoid's -log s(bh) at e = 0 for every margin
    # (why --loss-type robust without --label-smoothing is refused) and at h = 0 (the LoRA init) for every e. Once the
    # first step has moved the margins, e = 0.25 gives another loss, and another adapter.
    _, sigmoid = run(tiny_gpt2, pairs_file, tmp_path / "s", loss_type="sigmoid", max_steps=3)
    _, robust = run(tiny_gpt2, pairs_file, tmp_path / "r", loss_type="robust", label_smoothing=0.25, max_steps=3)
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (sigmoid, robust)]
    assert losses[0][0] == pytest.approx(math.log(2), rel=1e-5) and losses[1][0] == pytest.approx(math.log(2), rel=1e-5)
    assert abs(losses[1][2] - losses[0][2]) > 1e-4 * losses[0][2]
    a, b = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("s", "r"))
    assert any(not (a[k] == b[k]).all() for k in a)


def test_sft_alone_runs_no_reference_pass_and_logs_no_rewards(tiny_gpt2, pairs_file, tmp_path):
    manifest, rows = run(tiny_gpt2, pairs_file, tmp_path / "sft", loss_type="sft", max_steps=2)
    assert manifest["reference_logps"]["train"]["mode"].startswith("skipped") and manifest["reference_logps"]["train"]["seconds"] == 0
    logged = {k for r in rows for k in r}
    assert "loss" in logged and not any(k.startswith("rewards/") or "rejected" in k for k in logged)
    _, dpo = run(tiny_gpt2, pairs_file, tmp_path / "dpo", loss_type="sigmoid", max_steps=2)
    assert any(k.startswith("rewards/") for r in dpo for k in r)  # DPO logs them: the SFT run's absence is its own
