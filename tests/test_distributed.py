"""`accelerate launch` runs `dpo-align train` data-parallel: 2 CPU processes (gloo) give the
same per-step DPO loss as one process at the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_two_cpu_processes_match_one_at_the_same_global_batch(tiny_gpt2, pairs_file, tmp_path):  # noqa: F811
    common = ["train", "--model", str(tiny_gpt2), "--data", str(pairs_file), "--max-steps", "4", "--max-length", "96",
              "--logging-steps", "1", "--precision", "fp32", "--lr", "5e-3", "--lora-dropout", "0", "--save-steps", "100"]
    run([sys.executable, "-m", "dpo_align", *common, "--batch-size", "4", "-o", str(tmp_path / "single")])
    # accelerate starts one process per `accelerate launch` on CPUs and leaves the ranks to the
    # caller (mpirun sets them; here two launches get RANK 0 and 1 by hand).
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu-2proc.yaml"),
              "--main_process_port", "29517", "-m", "dpo_align", *common, "--batch-size", "2", "-o", str(tmp_path / "ddp")]
    procs = [subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4
    assert ddp == pytest.approx(single, rel=1e-3)
    assert single[-1] < single[0]  # it learns, so matching losses compare real updates
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["status"] == "complete"


@pytest.mark.slow
def test_two_cpu_processes_score_like_one_document_by_document(tiny_llama, tiny_data, tmp_path):
    """`accelerate launch` splits dpo-hf's requests (the suite and its controls) across 2 CPU processes: every
    document's reference and foil NLLs equal a 1-process run's, and only the first process writes the folder."""
    common = ["eval", str(tiny_llama), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"), "--device", "cpu",
              "--batch-size", "2"]
    done = subprocess.run([sys.executable, "-m", "dpo_align", *common, "-o", str(tmp_path / "single")], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    single_log = done.stdout + done.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu-2proc.yaml"),
              "--main_process_port", "29519", "-m", "dpo_align", *common, "-o", str(tmp_path / "ddp")]
    procs = [subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    def documents(folder):
        (samples,) = (folder / "samples").iterdir()
        return {p.stem: sorted((json.loads(line) for line in p.read_text().splitlines()), key=lambda d: d["doc_id"])
                for p in samples.glob("*.jsonl")}

    single, ddp = documents(tmp_path / "single"), documents(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) and "dpo_contrast_pku" in single
    for task, rows in single.items():
        assert [d["doc_id"] for d in ddp[task]] == [d["doc_id"] for d in rows]
        assert [d["nll"] for d in ddp[task]] == pytest.approx([d["nll"] for d in rows], rel=1e-6)
        if task.startswith("dpo_contrast"):
            assert [r[0] for d in ddp[task] for r in d["responses"]] == pytest.approx([r[0] for d in rows for r in d["responses"]], rel=1e-6)
    # the work was split: the first process scored fewer documents than the single one, the second wrote nothing
    assert 0 < documents_scored(outputs[0]) < documents_scored(single_log)
    assert "Wrote" in outputs[0] and "Wrote" not in outputs[1]


def documents_scored(log: str) -> int:
    """Documents dpo-hf scored, from its progress bar's total (one bar per model)."""
    import re

    totals = re.findall(r"Scoring documents: 100%[^\n\r]*?\| *\d+/(\d+)", log)
    assert totals, log[-2000:]
    return int(totals[-1])
