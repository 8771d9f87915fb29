"""How much of the suite's cross-entropy is the template's "\\n" separator?

The alpaca template renders a response as ``"\\n" + response``, and lm-eval's pair encoding
counts the continuation's tokens as ``len(encode(ctx + cont)) - len(encode(ctx))``, so the
separator is a scored response token. This script scores every document of each dataset
with the given model, exactly as the suite does (float32, same context and continuation),
and splits each document's NLL and token count into the separator's share and the rest.

    python benchmarks/separator_share.py --data-dir ../shared/data --pku-path ../shared/data/splits/heldout.jsonl.gz

Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
from tqdm import tqdm

from dpo_align.core.models import load_model, load_tokenizer, resolve_model
from dpo_align.data.suite_docs import load_docs
from dpo_align.data.templates import render_prompt, render_response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--pku-path", required=True)
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--json")
    args = parser.parse_args()

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32).eval()
    rows = {}
    for name in ("truthfulqa", "winogrande", "pku"):
        docs = load_docs(name, data_dir=args.data_dir, pku_path=args.pku_path)
        nll_sep = nll_rest = tokens = separate = 0.0
        for doc in tqdm(docs, desc=name):
            ctx = render_prompt(doc["instruction"], args.template, tokenizer)
            cont = render_response(doc["response"], args.template)
            ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            ids = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
            n = len(ids) - len(ctx_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -n - 1:-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[-n:])[:, None])[:, 0]
            first = tokenizer.decode(ids[-n])
            separate += first == "\n"  # the separator is a token of its own (not merged with the text)
            nll_sep += nll[0].item()
            nll_rest += nll[1:].sum().item()
            tokens += n
        ce = (nll_sep + nll_rest) / tokens
        ce_without = nll_rest / (tokens - len(docs))
        rows[name] = {"documents": len(docs), "tokens": int(tokens), "separator_own_token": int(separate),
                      "token_share": len(docs) / tokens, "nll_share": nll_sep / (nll_sep + nll_rest),
                      "separator_mean_nll": nll_sep / len(docs), "ce": ce, "ce_without_separator": ce_without}
    print(f"model {args.model}, template {args.template}, float32; {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}\n")
    print("| dataset | documents | separator its own token | tokens scored | separator's share of tokens | of NLL | "
          "mean separator NLL | ce (as scored) | ce without the separator |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['documents']} | {r['separator_own_token']} | {r['tokens']} | {100 * r['token_share']:.1f}% | "
              f"{100 * r['nll_share']:.1f}% | {r['separator_mean_nll']:.3f} | {r['ce']:.4f} | {r['ce_without_separator']:.4f} |")
    assert all(math.isfinite(r["ce"]) for r in rows.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "template": args.template, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
