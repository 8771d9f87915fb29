"""Held-out preference accuracy of a base model and its DPO adapters.

Two questions, asked of the same held-out pairs, tokenized exactly as training tokenizes
them (the template, the fitting to ``max_length``, TRL's DPO tokenization with its EOS):

* **implicit-reward accuracy** (adapters only): how often the DPO reward
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` of the chosen response exceeds the rejected
  one's, with the base model (adapter off) as ``pi_ref``, as in training. beta only scales
  the reward, so the accuracy does not depend on it; the mean margin is given at ``beta``;
* **length-normalised likelihood accuracy** (every model, the baseline included): how often
  the chosen response has the higher mean log-prob per token.

Log-probs come from the training forward (one row per pair, ``pair_logps``) in inference
mode, with fp32 weights and no autocast (the scoring precision). Exact ties count half.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from dpo_align.core.models import load_model, load_tokenizer
from dpo_align.core.pair_batch import pair_length
from dpo_align.core.pair_logps import add_pair_logps, summed_logps
from dpo_align.data.fitting import fit_to_length
from dpo_align.data.pairs import read_pairs, to_dataset


def tokenized_pairs(sources: list[str], tokenizer, *, template: str, max_length: int):
    """Held-out pairs as training sees them: TRL's prompt_ids/chosen_ids/rejected_ids, plus row length."""
    from trl import DPOTrainer

    pairs, report = read_pairs(sources, split="test")
    pairs, _ = fit_to_length(pairs, tokenizer, template, max_length)
    dataset = to_dataset(pairs, template, tokenizer).remove_columns("instruction")
    # TRL's own tokenization (prompt extraction, EOS, prompt/response boundary), without building a
    # trainer: the method reads only the tokenizer from `self` (TRL is pinned to the tested minor).
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    dataset = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "held-out")
    dataset = dataset.add_column("length", [pair_length(ex, max_length) for ex in dataset])
    return dataset, report


def model_logps(model_path: str, adapter: str | None, dataset, *, pad_token_id: int, max_length: int, label: str,
                trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Summed log-probs and token counts of every pair's chosen and rejected response under one model."""
    import torch

    model = load_model(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, dtype=torch.float32)
    add_pair_logps(model)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    sums = summed_logps(model, dataset, adapter=True, max_length=max_length, pad_token_id=pad_token_id,
                        device=next(model.parameters()).device, progress_desc=f"Held-out pairs ({label})")
    return {name: values.numpy().astype(np.float64) for name, values in sums.items()}


def _wins(better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    return (better > worse) + 0.5 * (better == worse)


def _rate(wins: np.ndarray) -> dict:
    p = float(wins.mean())
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / len(wins)), "pairs": int(len(wins))}


def length_normalised_accuracy(lp: dict) -> dict:
    return _rate(_wins(lp["chosen"] / lp["chosen_tokens"], lp["rejected"] / lp["rejected_tokens"]))


def reward_accuracy(lp: dict, ref: dict, *, beta: float) -> dict:
    chosen = beta * (lp["chosen"] - ref["chosen"])
    rejected = beta * (lp["rejected"] - ref["rejected"])
    return {**_rate(_wins(chosen, rejected)), "mean_margin": float((chosen - rejected).mean())}


def displacement(lp: dict, ref: dict) -> dict:
    """Likelihood displacement against the base model: the mean change per token of the chosen and of the rejected
    log-prob (policy - reference, over each response's tokens, averaged over pairs), and the share of pairs where
    both fell. DPO can lower the chosen responses' likelihood too (arXiv 2410.08847): a rising margin alone hides it."""
    chosen = (lp["chosen"] - ref["chosen"]) / lp["chosen_tokens"]
    rejected = (lp["rejected"] - ref["rejected"]) / lp["rejected_tokens"]
    both = (lp["chosen"] < ref["chosen"]) & (lp["rejected"] < ref["rejected"])
    return {"chosen_per_token": float(chosen.mean()), "rejected_per_token": float(rejected.mean()), "both_fell": float(both.mean()),
            "pairs": int(len(chosen))}


def preference_table(logps: dict[str, dict], *, baseline: str, beta: float) -> dict[str, dict]:
    """{label: {"length_normalised": {...}, "reward": {...} and "displacement": {...} (adapters only)}}."""
    out = {}
    for label, lp in logps.items():
        out[label] = {"length_normalised": length_normalised_accuracy(lp)}
        if label != baseline:
            out[label]["reward"] = reward_accuracy(lp, logps[baseline], beta=beta)
            out[label]["displacement"] = displacement(lp, logps[baseline])
    return out


def markdown(table: dict[str, dict], *, beta: float) -> str:
    lines = ["| model | implicit-reward accuracy | mean reward margin (beta " + f"{beta:g}" + ") | length-normalised likelihood accuracy | "
             "Δ log p per token, chosen | Δ log p per token, rejected | both fell | pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in table.items():
        norm = row["length_normalised"]
        reward, moved = row.get("reward"), row.get("displacement")
        cells = [label,
                 f"{100 * reward['accuracy']:.1f}% ± {100 * reward['stderr']:.1f}" if reward else "n/a (it is the reference)",
                 f"{reward['mean_margin']:+.4f}" if reward else "",
                 f"{100 * norm['accuracy']:.1f}% ± {100 * norm['stderr']:.1f}",
                 f"{moved['chosen_per_token']:+.4f}" if moved else "", f"{moved['rejected_per_token']:+.4f}" if moved else "",
                 f"{100 * moved['both_fell']:.1f}%" if moved else "", str(norm["pairs"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Δ log p: the adapter's log-prob minus the base model's, per response token, averaged over the held-out pairs; "
              "\"both fell\": pairs whose chosen and rejected responses both became less likely (likelihood displacement)."]
    return "\n".join(lines) + "\n"


def load_for(model_path: str, sources: list[str], *, template: str, max_length: int, trust_remote_code: bool = False):
    """The tokenizer and the tokenized held-out pairs for one base model."""
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    dataset, report = tokenized_pairs(sources, tokenizer, template=template, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dataset, pad, report
