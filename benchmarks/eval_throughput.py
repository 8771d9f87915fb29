"""Scoring speed and memory of ``--model dpo-hf`` against lm-eval's ``--model hf``, and what the controls cost,
side by side in one run.

The documents are drawn at evenly spaced quantiles of token length from each dataset of the
full suite (TruthfulQA, WinoGrande, the PKU stand-in), so every length range is represented.
Each configuration scores exactly those documents through ``dpo-align``'s lm-eval path, in a
process of its own, one after another, so its peak resident memory is its own:

* ``hf``: lm-eval's ``hf`` model at ``--batch-size`` (16), fp32, the suite alone (dpo_ppl);
* ``dpo_hf``: our ``dpo-hf`` model, same batch, fp32, the suite alone;
* ``dpo_hf_head1024``: ``dpo-hf`` with the LM head applied to 1,024 positions per call (the default before
  256), to show what the smaller chunk changes in time and peak memory;
* ``hf_defaults``: lm-eval's ``hf`` with lm-eval's own default batch size (1), fp32, the suite alone;
* ``dpo_hf_bf16``: ``dpo-hf`` with bf16 weights, the suite alone, to state the deviation bf16 costs;
* ``hf_controls``: lm-eval's ``hf``, the suite and its controls (dpo_ppl + dpo_contrast);
* ``hf_controls_b1``: the same at batch 1 (no padding): the floor, how far lm-eval ``hf`` agrees with itself
  per document in fp32 when only its batching changes (``hf_self_max_rel_doc_nll_diff``);
* ``controls_plain``: ``dpo-hf`` with the suite and its controls fed as plain requests (every
  request its own row, the reference scored once per family): the unshared layout;
* ``controls``: ``dpo-hf`` with the suite and its controls, each context computed once for all its
  continuations (the default of ``dpo-align eval``);
* ``plain_loop``: the ceiling to beat, an independent loop written here without lm-eval or dpo-align's
  scoring code (sorted by length, 8,192-token batches, the LM head at continuation positions only):
  ``dpo_hf_vs_plain_loop`` is ``dpo_hf``'s seconds over its seconds.

Time is the wall time of ``simple_evaluate`` (model loading included, the same for all);
rate is scored response tokens per second. ``ce`` of ``dpo_hf`` must equal ``hf``'s
(``max_rel_ce_diff``, per dataset; ``max_rel_doc_nll_diff``, per document), and every
reference's and foil's NLL of ``controls`` must equal ``hf_controls``' (``controls_max_rel_doc_nll_diff``).
The controls' cost is ``controls_cost`` (``controls`` seconds / ``dpo_hf`` seconds; the target is 1.5;
with ``--repeats N`` every configuration runs N times in interleaved rounds, and the figure is the median of
the N ratios taken within a round, since this host's pace drifts by 25% between runs)
and ``plain_controls_cost`` (the same for the unshared layout). The last line is
``speedup=<dpo_hf rate / hf rate>``.

    python benchmarks/eval_throughput.py --per-dataset 64 --data-dir ../shared/data \
        --pku-path ../shared/data/splits/heldout.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK_OF = {"truthfulqa": "dpo_ppl_truthfulqa", "winogrande": "dpo_ppl_winogrande", "pku": "dpo_ppl_pku"}
CONTRAST_OF = {"truthfulqa": "dpo_contrast_truthfulqa", "winogrande": "dpo_contrast_winogrande", "pku": "dpo_contrast_pku"}
CONFIGS = {
    "hf": {"lm_eval_model": "hf", "dtype": "float32", "batch": None},
    "dpo_hf": {"lm_eval_model": "dpo-hf", "dtype": "float32", "batch": None},
    "dpo_hf_head1024": {"lm_eval_model": "dpo-hf", "dtype": "float32", "batch": None, "head_chunk": 1024},
    "hf_defaults": {"lm_eval_model": "hf", "dtype": "float32", "batch": 1},
    "dpo_hf_bf16": {"lm_eval_model": "dpo-hf", "dtype": "bfloat16", "batch": None},
    "hf_controls": {"lm_eval_model": "hf", "dtype": "float32", "batch": None, "controls": True},
    "hf_controls_b1": {"lm_eval_model": "hf", "dtype": "float32", "batch": 1, "controls": True},
    "controls_plain": {"lm_eval_model": "dpo-hf", "dtype": "float32", "batch": None, "controls": True, "plain": True},
    "controls": {"lm_eval_model": "dpo-hf", "dtype": "float32", "batch": None, "controls": True},
    "plain_loop": {"independent": True},
}
BATCH_TOKENS = 8192  # the independent loop's padded tokens per forward


def pick_documents(model_path: str, per_dataset: int, data_dir: str | None, pku_path: str | None) -> dict:
    """{task: [doc indices]} at evenly spaced quantiles of context + continuation tokens."""
    from transformers import AutoTokenizer

    from dpo_align.data.suite_docs import load_docs
    from dpo_align.data.templates import render_prompt, render_response

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    picked = {}
    for name, task in TASK_OF.items():
        docs = load_docs(name, data_dir=data_dir, pku_path=pku_path)
        texts = [render_prompt(d["instruction"], "alpaca", None) + render_response(d["response"], "alpaca") for d in docs]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        order = sorted(range(len(docs)), key=lambda i: lengths[i])
        step = (len(order) - 1) / (per_dataset - 1)
        picked[task] = sorted({order[round(i * step)] for i in range(per_dataset)})
        picked[CONTRAST_OF[name]] = picked[task]  # the same documents with their foils (every document has one)
    return picked


def plain_loop(args, samples: dict) -> dict:
    """The ceiling to beat, written without lm-eval or dpo-align's scoring code: the same documents rendered the same
    way, split into (context, continuation) as lm-eval does, sorted by length, right-padded batches of at most
    BATCH_TOKENS tokens, the backbone once per batch and the LM head only where a continuation token is predicted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_align.core.models import resolve_model
    from dpo_align.data.suite_docs import load_docs
    from dpo_align.data.templates import render_prompt, render_response

    path = resolve_model(args.model)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []  # (task, doc index, input ids, number of continuation tokens)
    for name, task in TASK_OF.items():
        docs = load_docs(name, data_dir=args.data_dir, pku_path=args.pku_path)
        for i in samples[task]:
            context = render_prompt(docs[i]["instruction"], "alpaca", None)
            continuation = render_response(docs[i]["response"], "alpaca")
            spaces = len(context) - len(context.rstrip())  # lm-eval moves the context's trailing whitespace over
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            rows.append((task, i, whole, len(whole) - len(context_ids)))
    rows.sort(key=lambda r: len(r[2]))
    nll = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch: list = []

    def run(batch):
        width = max(len(r[2]) for r in batch) - 1
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (_, _, whole, _) in enumerate(batch):
            ids[b, : len(whole) - 1], mask[b, : len(whole) - 1] = torch.tensor(whole[:-1]), 1
        with torch.inference_mode():
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, (task, i, whole, n) in enumerate(batch):
                logits = model.get_output_embeddings()(hidden[b, len(whole) - 1 - n: len(whole) - 1]).float()
                targets = torch.tensor(whole[len(whole) - n:])
                nll[(task, i)] = -torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()

    for row in rows:
        if batch and (len(batch) + 1) * (len(row[2]) - 1) > BATCH_TOKENS:
            run(batch)
            batch = []
        batch.append(row)
    if batch:
        run(batch)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "ce": {name: sum(nll[(t, i)] for (t, i, _, _) in rows if t == task) / sum(n for (t, _, _, n) in rows if t == task)
                   for name, task in TASK_OF.items()},
            "nll": {task: [nll[(task, i)] for i in samples[task]] for task in TASK_OF.values()},
            "tokens": sum(r[3] for r in rows), "documents": len(rows)}


def child(args) -> None:
    from dpo_align.core.models import resolve_model
    from dpo_align.score.evaluate import ModelSpec, ScoreOptions, per_document, score, summarize

    config = CONFIGS[args.child]
    samples = json.loads(Path(args.samples).read_text())
    if config.get("independent"):
        print("RESULT " + json.dumps(plain_loop(args, samples)), flush=True)
        return
    controls = config.get("controls", False)
    if not controls:
        samples = {task: ids for task, ids in samples.items() if task in TASK_OF.values()}
    from dpo_align.score.lm_eval_model import ResponseOnlyHFLM

    ResponseOnlyHFLM.head_chunk = config.get("head_chunk", ResponseOnlyHFLM.head_chunk)
    ResponseOnlyHFLM.plain_requests = config.get("plain", False)
    options = ScoreOptions(data_dir=args.data_dir, pku_path=args.pku_path, batch_size=config["batch"] or args.batch_size, device="cpu",
                           dtype=config["dtype"], lm_eval_model=config["lm_eval_model"], samples=samples, controls=controls)
    start = time.perf_counter()
    results = score(ModelSpec(args.model, resolve_model(args.model)), options)
    seconds = time.perf_counter() - start
    docs = per_document(results)
    out = {"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "ce": {k: v["ce"][0] for k, v in summarize(results).items()},
           "nll": {task: [d["nll"] for d in sorted(rows, key=lambda d: d["doc_id"])] for task, rows in docs.items()},
           "responses": {task: [r[0] for d in sorted(rows, key=lambda d: d["doc_id"]) for r in d["responses"]]
                         for task, rows in docs.items() if task in CONTRAST_OF.values()},
           "tokens": sum(d["tokens"] for task, rows in docs.items() if task in TASK_OF.values() for d in rows),
           "documents": sum(len(rows) for task, rows in docs.items() if task in TASK_OF.values())}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-dataset", type=int, default=64, help="documents per dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pku-path", default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of: " + ", ".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every configuration; times are medians over rounds")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--raw", default=None, help="also write every configuration's per-document numbers here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    names = args.configs.split(",")  # checked before anything runs: a bad list fails in a second, not after minutes
    if unknown := [n for n in names if n not in CONFIGS]:
        sys.exit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    if "dpo_hf" not in names:
        sys.exit("--configs must include dpo_hf: every ratio is taken against it")

    import tempfile

    import torch

    from dpo_align.core.models import resolve_model

    path = resolve_model(args.model)
    runs, seconds, commands = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.json"
        samples.write_text(json.dumps(pick_documents(path, args.per_dataset, args.data_dir, args.pku_path)))
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--samples", str(samples), "--model", args.model,
                       "--batch-size", str(args.batch_size)]
            command += ["--data-dir", args.data_dir] if args.data_dir else []
            command += ["--pku-path", args.pku_path] if args.pku_path else []
            commands[name] = command
        # --repeats rounds, each running every configuration once in turn, so that a slow spell of the host falls on
        # all of them alike; a configuration's time is its median over the rounds, a ratio the median of the rounds'
        for round_ in range(args.repeats):
            for name, command in commands.items():
                print(f"running {name} (round {round_ + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
                result = json.loads(line.removeprefix("RESULT "))
                if name in runs:  # the numbers of every round must be the same; only the time may differ
                    if result["ce"] != runs[name]["ce"]:
                        sys.exit(f"{name}: round {round_ + 1} scored other numbers than round 1: {result['ce']} != {runs[name]['ce']}")
                    seconds[name].append(result["seconds"])
                    runs[name]["peak_rss_gb"] = max(runs[name]["peak_rss_gb"], result["peak_rss_gb"])
                else:
                    runs[name], seconds[name] = result, [result["seconds"]]
        for name in runs:
            runs[name]["seconds"] = statistics.median(seconds[name])

    hf, ours = runs.get("hf"), runs["dpo_hf"]  # without hf (a timing-only run) the comparisons with it are left out
    numbers = {"model": args.model, "documents": ours["documents"], "scored_tokens": ours["tokens"], "batch_size": args.batch_size,
               "torch_threads": torch.get_num_threads()}
    for name, run in runs.items():
        numbers[f"{name}_seconds"] = round(run["seconds"], 1)
        numbers[f"{name}_tokens_per_s"] = round(run["tokens"] / run["seconds"], 1)
        numbers[f"{name}_peak_rss_gb"] = round(run["peak_rss_gb"], 2)
        numbers[f"{name}_ce"] = {k: round(v, 6) for k, v in run["ce"].items()}

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    if hf is not None:
        numbers["max_rel_ce_diff"] = max(rel(ours["ce"][k], hf["ce"][k]) for k in hf["ce"])
        numbers["max_rel_doc_nll_diff"] = max(rel(a, b) for task in hf["nll"] for a, b in zip(ours["nll"][task], hf["nll"][task], strict=True))
        if "dpo_hf_bf16" in runs:
            numbers["bf16_rel_ce_deviation"] = {k: round(rel(runs["dpo_hf_bf16"]["ce"][k], hf["ce"][k]), 5) for k in hf["ce"]}
        if "hf_defaults" in runs:
            numbers["speedup_vs_hf_defaults"] = round(runs["hf_defaults"]["seconds"] / ours["seconds"], 3)
        numbers["memory_ratio"] = round(ours["peak_rss_gb"] / hf["peak_rss_gb"], 3)
        if "plain_loop" in runs:  # the ceiling: how close dpo-hf comes to a loop that does only the needed work
            numbers["dpo_hf_vs_plain_loop"] = round(ours["seconds"] / runs["plain_loop"]["seconds"], 3)
            numbers["plain_loop_max_rel_doc_nll_diff"] = max(rel(a, b) for task in hf["nll"]
                                                             for a, b in zip(runs["plain_loop"]["nll"][task], hf["nll"][task], strict=True))
    if args.repeats > 1:
        numbers["repeats"] = args.repeats
        for name in runs:
            numbers[f"{name}_seconds_each_round"] = [round(x, 1) for x in seconds[name]]
    if "controls" in runs:
        numbers["controls_cost"] = round(runs["controls"]["seconds"] / ours["seconds"], 3)
        if args.repeats > 1:  # the same ratio within each round, where the host's pace is shared; the figure is their median
            each = [c / d for c, d in zip(seconds["controls"], seconds["dpo_hf"], strict=True)]
            numbers["controls_cost_each_round"] = [round(x, 3) for x in each]
            numbers["controls_cost"] = round(statistics.median(each), 3)
        numbers["foil_continuations"] = sum(len(v) for v in runs["controls"]["responses"].values()) - numbers["documents"]
    if "controls_plain" in runs:
        numbers["plain_controls_cost"] = round(runs["controls_plain"]["seconds"] / ours["seconds"], 3)
        if "controls" in runs:
            numbers["shared_vs_plain_speedup"] = round(runs["controls_plain"]["seconds"] / runs["controls"]["seconds"], 3)
    if "hf_controls" in runs:
        reference = runs["hf_controls"]["responses"]
        for name in ("controls", "controls_plain"):
            if name in runs:
                numbers[f"{name}_max_rel_doc_nll_diff"] = max(rel(a, b) for task in reference
                                                              for a, b in zip(runs[name]["responses"][task], reference[task], strict=True))
        if "hf_controls_b1" in runs:  # the floor: every layout against unpadded hf, hf at batch 16 (hf_self) included
            unpadded = runs["hf_controls_b1"]["responses"]
            for name, key in (("hf_controls", "hf_self"), ("controls", "controls_vs_hf_b1"), ("controls_plain", "controls_plain_vs_hf_b1")):
                if name in runs:
                    diffs = [rel(a, b) for task in unpadded for a, b in zip(runs[name]["responses"][task], unpadded[task], strict=True)]
                    numbers[f"{key}_max_rel_doc_nll_diff"] = max(diffs)
                    numbers[f"{key}_share_over_1e-6"] = round(sum(d > 1e-6 for d in diffs) / len(diffs), 4)
        if "controls" in runs:
            numbers["controls_speedup_vs_hf_controls"] = round(runs["hf_controls"]["seconds"] / runs["controls"]["seconds"], 3)
    if args.raw:
        Path(args.raw).write_text(json.dumps(runs) + "\n")
    for key, value in numbers.items():
        print(f"{key}={value}")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    if hf is not None:
        print(f"speedup={hf['seconds'] / ours['seconds']:.3f}")


if __name__ == "__main__":
    main()
