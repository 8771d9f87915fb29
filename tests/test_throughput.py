"""Tokens/s and MFU in every run: each logged step carries them, the manifest and the report hold the run's mean, and the
CPU's peak is measured once per machine."""

from __future__ import annotations

import json

import pytest

from dpo_align.train import throughput
from dpo_align.train.run import train

from .helpers import read_rows, tiny_config


def test_every_logged_step_has_tokens_per_second_and_mfu(tiny_gpt2, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_ALIGN_PEAK_CACHE", str(tmp_path / "cache" / "peak-flops.json"))
    calls = []
    real = throughput.measured_matmul_rate
    monkeypatch.setattr(throughput, "measured_matmul_rate", lambda dtype: calls.append(dtype) or real(dtype))
    monkeypatch.setattr(throughput, "_load", lambda: 0.2)  # a quiet CPU (the test suite itself may load it)
    manifest = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "a", max_steps=6, logging_steps=2), progress=lambda m: None)
    rows = [r for r in read_rows(tmp_path / "a") if "loss" in r]
    assert len(rows) == 3 and all(r["tokens_per_s"] > 0 for r in rows)
    t = manifest["throughput"]
    for r in rows:  # MFU is 6 N tokens/s over the peak the run recorded
        assert r["mfu"] == pytest.approx(6 * t["params"] * r["tokens_per_s"] / t["peak_flops"], rel=1e-3)
    assert t["tokens"] == max(r["num_tokens"] for r in rows) and t["tokens_per_s"] > 0 and "measured" in t["peak_source"]
    # N leaves out the tables a token only looks up (GPT-2's tokens and positions) and the LM head tied to the first
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    tables = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert t["params"] == sum(p.numel() for p in model.parameters()) - tables and t["flops_per_token"] == 6 * t["params"]
    assert "tokens/s, MFU" in (tmp_path / "a" / "README.md").read_text()
    # the peak is measured once per machine: a second run reads it from the cache
    train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "b", max_steps=2), progress=lambda m: None)
    assert len(calls) == 1 and len(json.loads((tmp_path / "cache" / "peak-flops.json").read_text())) == 1


def test_a_peak_measured_under_load_is_measured_again_when_the_cpu_is_quieter(tmp_path, monkeypatch):
    """A cached peak taken while other processes computed is too low (it once gave MFU above 1): the next call on a
    quieter CPU measures again and keeps the higher rate; a quiet measurement is not repeated, and a busy one never
    replaces a higher rate."""
    monkeypatch.setenv("DPO_ALIGN_PEAK_CACHE", str(tmp_path / "peak.json"))
    rates = iter([10e9, 50e9, 20e9])
    calls = []
    monkeypatch.setattr(throughput, "measured_matmul_rate", lambda dtype: calls.append(dtype) or next(rates))
    monkeypatch.setattr(throughput, "_load", lambda: 3.0)  # two other processes on the cores
    peak, source = throughput.peak_flops("cpu", "fp32")
    assert peak == 10e9 and "may be understated" in source
    monkeypatch.setattr(throughput, "_load", lambda: 3.5)  # busier still: not measured again
    assert throughput.peak_flops("cpu", "fp32")[0] == 10e9 and len(calls) == 1
    monkeypatch.setattr(throughput, "_load", lambda: 0.3)  # quiet: measured again, the higher rate kept
    peak, source = throughput.peak_flops("cpu", "fp32")
    assert peak == 50e9 and "understated" not in source and len(calls) == 2
    assert throughput.peak_flops("cpu", "fp32")[0] == 50e9 and len(calls) == 2  # quiet entries are final
    # the cache's first form (a bare number) is measured again once, and a lower new rate does not replace it
    key = next(iter(json.loads((tmp_path / "peak.json").read_text())))
    (tmp_path / "peak.json").write_text(json.dumps({key: 30e9}))
    assert throughput.peak_flops("cpu", "fp32")[0] == 30e9 and len(calls) == 3
    assert throughput.peak_flops("cpu", "fp32")[0] == 30e9 and len(calls) == 3  # quiet now: not measured again
