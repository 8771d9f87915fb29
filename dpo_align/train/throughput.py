"""Tokens per second and model FLOPs utilisation (MFU) of a training run, at every logged step and for the whole run.

FLOPs per token are the usual ``6 N`` (forward 2N, backward 4N), counted on the tokens actually fed (TRL's
``num_tokens``: the real tokens of each row, prompt once per pair in this trainer's layout), with N the parameters
outside the embeddings and the LM head (``body_parameters``: the scaling-law papers' non-embedding N). An embedding is a
lookup, not a matmul, and this trainer projects onto the vocabulary only at the response positions, so counting the
embedding table at every token overstates the work: Gemma 3 270M's 168M-parameter table (of 268M) once gave an MFU of
1.08. The head's matmuls at the response positions are left out (an MFU a little low on that side); a LoRA run computes
no weight gradients for the frozen matrices (its work nearer 4N: a little high on that side).

The peak: on a GPU, the device's published dense bf16 (or fp32) rate where this table knows the device; otherwise (a
CPU, or an unknown GPU) the best matmul rate measured on this machine, in the precision the run computes in, and
cached in ``~/.cache/dpo-align/peak-flops.json`` under the CPU model, thread count and torch version. Which one was
used is recorded beside the number (``peak_source``).

A rate measured while other processes load the CPU is too low (two search workers on two cores once cached 25 GFLOP/s
where the idle rate is 172-181, and every later run reported an MFU above 1). So each entry keeps the load average it
was measured under, an entry measured under load (above ``BUSY``) is measured again by the next run that finds the CPU
quieter, and the cache keeps the highest rate seen: a busy measurement can only understate the peak.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from transformers import TrainerCallback

# dense tensor-core peaks, TFLOP/s, from the vendors' data sheets (bf16, fp32 without sparsity)
PUBLISHED = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "A10G": (125.0, 31.2),
             "L4": (121.0, 30.3)}


BUSY = 1.0  # a one-minute load average above this: another process was computing while the rate was measured


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform: taken as quiet
        return 0.0


def _cache_file() -> Path:
    """``DPO_ALIGN_PEAK_CACHE`` (the tests point it away from the user's cache), else the user cache."""
    if os.environ.get("DPO_ALIGN_PEAK_CACHE"):
        return Path(os.environ["DPO_ALIGN_PEAK_CACHE"])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "dpo-align" / "peak-flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_matmul_rate(dtype) -> float:
    """Best FLOP/s over model-shaped and square matmuls in ``dtype`` on the CPU (a second or two)."""
    import torch

    best = 0.0
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 576), (1024, 1024, 1024)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 2 * m * k * n * 5 / (time.perf_counter() - start))
    return best


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for a run on ``device`` ("cpu"/"cuda") computing in ``precision``."""
    import torch

    bf16 = precision in ("bf16", "fp16")
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, (half, full) in PUBLISHED.items():
            if key in name:
                return (half if bf16 else full) * 1e12, f"published peak of the {name} ({'bf16' if bf16 else 'fp32'}, dense)"
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{'bf16' if bf16 else 'fp32'}"
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, int | float):  # the cache's first form: a bare rate, its load unknown
        entry = {"flops": float(entry), "load": None}
    load = _load()
    if entry is None or entry["load"] is None or (entry["load"] > BUSY and load < entry["load"]):
        rate = measured_matmul_rate(torch.bfloat16 if bf16 else torch.float32)
        # the highest rate seen, at this (lower) load: measured again only when the CPU is quieter still
        entry = {"flops": rate if entry is None else max(rate, entry["flops"]), "load": round(load, 2)}
        known[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=2))
            os.replace(tmp, path)
        except OSError:  # an unwritable cache: measured again next run
            pass
    busy = "" if entry["load"] is not None and entry["load"] <= BUSY else \
        f"; measured under a load average of {entry['load']}: other processes were computing, so the peak may be understated"
    return entry["flops"], f"measured {'bf16' if bf16 else 'fp32'} matmul rate of this CPU ({torch.get_num_threads()} threads), cached{busy}"


def body_parameters(model) -> int:
    """Parameters outside every embedding table (tokens, positions) and the LM head, a tied head counted once: the N of
    ``6 N`` FLOPs per token."""
    import torch

    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for m in [*tables, *([head] if head is not None else [])] for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def mfu(tokens_per_s: float, n_params: int, peak: float) -> float:
    return 6 * n_params * tokens_per_s / peak


class Throughput(TrainerCallback):
    """Adds ``tokens_per_s`` and ``mfu`` to every logged step (since the previous log), before the metrics file reads it."""

    def __init__(self, n_params: int, peak: float):
        self.n_params, self.peak = n_params, peak
        self.last_tokens = self.last_time = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.perf_counter(), 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        if self.last_tokens is not None and now > self.last_time and tokens > self.last_tokens:
            rate = (tokens - self.last_tokens) / (now - self.last_time)
            logs["tokens_per_s"] = round(rate, 1)
            logs["mfu"] = float(f"{mfu(rate, self.n_params, self.peak):.4g}")
        self.last_tokens, self.last_time = tokens, now


def run_summary(rows: list[dict], n_params: int, peak: float, source: str, train_runtime_s: float) -> dict:
    """The run's mean: all tokens fed over the training time, and its MFU."""
    tokens = max((float(r["num_tokens"]) for r in rows if "num_tokens" in r), default=0.0)
    rate = tokens / train_runtime_s if train_runtime_s > 0 else 0.0
    return {"tokens": tokens, "tokens_per_s": round(rate, 1), "mfu": float(f"{mfu(rate, n_params, peak):.4g}"), "params": n_params,
            "flops_per_token": 6 * n_params, "peak_flops": peak, "peak_source": source}
