"""Does a model's lower WinoGrande cross-entropy mean it picks the right option more often?

The suite scores only the correct option's text after the template. A model can lower that
number in two ways: by preferring the correct option over the wrong one (what WinoGrande is
about), or by answering with a bare word more readily, which lowers the correct *and* the
wrong option alike. This script scores both options of every WinoGrande dev item, exactly as
the suite encodes a response (float32, the same context and continuation), for the base model
and each adapter, and reports:

* ce of the correct option (equals the suite's WinoGrande ce over the same documents),
* ce of the wrong option,
* accuracy: how often the correct option has the lower summed NLL.

    python benchmarks/winogrande_options.py --data-dir ../shared/data --peft runs/seed-reproduction/lr-0.0001

Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dpo_align.core.models import load_model, load_tokenizer, resolve_model
from dpo_align.data.suite_docs import load_docs
from dpo_align.data.templates import render_prompt, render_response

OPTIONS = re.compile(r"\nOption 1: (.*)\nOption 2: (.*)$")


def option_nlls(model, tokenizer, docs, template: str, label: str) -> list[tuple[float, int, float, int]]:
    """(NLL, tokens) of the correct option and of the wrong one, per document."""
    rows = []
    for doc in tqdm(docs, desc=label):
        first, second = OPTIONS.search(doc["instruction"]).groups()
        wrong = second if doc["response"] == first else first
        ctx = render_prompt(doc["instruction"], template, tokenizer)
        n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
        seqs = [tokenizer(ctx + render_response(answer, template), add_special_tokens=False)["input_ids"]
                for answer in (doc["response"], wrong)]
        width = max(map(len, seqs))  # both options in one right-padded batch: padding after a row cannot change it
        batch = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(batch, attention_mask=mask).logits.float(), -1)
        scored = []
        for row, ids in enumerate(seqs):
            n = len(ids) - n_ctx  # lm-eval's pair encoding: the continuation is what the context does not cover
            targets = torch.tensor(ids[-n:])
            scored += [-logprobs[row, len(ids) - n - 1:len(ids) - 1].gather(-1, targets[:, None]).sum().item(), n]
        rows.append(tuple(scored))
    return rows


def summary(rows) -> dict:
    nll_c, tok_c, nll_w, tok_w = (sum(r[i] for r in rows) for i in range(4))
    return {"ce_correct": nll_c / tok_c, "ce_wrong": nll_w / tok_w,
            "accuracy": sum(r[0] < r[2] for r in rows) / len(rows), "documents": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--peft", action="append", default=[], help="an adapter folder; repeat for several")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--limit", type=int, help="the first N documents (default: all 1,267)")
    parser.add_argument("--json")
    args = parser.parse_args()

    from peft import PeftModel

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    docs = load_docs("winogrande", data_dir=args.data_dir)[: args.limit]
    results, started = {}, time.time()
    for adapter in [None, *args.peft]:
        model = load_model(path, dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        label = Path(adapter).name if adapter else "baseline"
        results[label] = summary(option_nlls(model.eval(), tokenizer, docs, args.template, label))

    print("| model | ce, correct option | ce, wrong option | accuracy (correct has the lower NLL) |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['ce_correct']:.4f} | {r['ce_wrong']:.4f} | {r['accuracy']:.4f} |")
    print(f"\n{len(docs)} documents, {time.time() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
