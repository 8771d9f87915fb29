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
    manifest = train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "a", max_steps=6, logging_steps=2), progress=lambda m: None)
    rows = [r for r in read_rows(tmp_path / "a") if "loss" in r]
    assert len(rows) == 3 and all(r["tokens_per_s"] > 0 for r in rows)
    t = manifest["throughput"]
    for r in rows:  # MFU is 6 N tokens/s over the peak the run recorded
        assert r["mfu"] == pytest.approx(6 * t["params"] * r["tokens_per_s"] / t["peak_flops"], rel=1e-3)
    assert t["tokens"] == max(r["num_tokens"] for r in rows) and t["tokens_per_s"] > 0 and "measured" in t["peak_source"]
    assert "tokens/s, MFU" in (tmp_path / "a" / "README.md").read_text()
    # the peak is measured once per machine: a second run reads it from the cache
    train(tiny_config(tiny_gpt2, pairs_file, tmp_path / "b", max_steps=2), progress=lambda m: None)
    assert len(calls) == 1 and len(json.loads((tmp_path / "cache" / "peak-flops.json").read_text())) == 1
