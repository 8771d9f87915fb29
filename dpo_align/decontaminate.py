"""How much of the scoring suite the training data already contains.

Two tests:

* **exact prompts** (``overlap``): a training instruction equal to a suite document's
  instruction after whitespace normalisation. Cheap; run before every training run, and
  ``--drop-eval-overlap`` removes those pairs.
* **13-gram overlap** (``ngram_overlap``): a suite document (instruction + response) counts as
  contaminated when any of its word 13-grams occurs anywhere in the training prompts or
  responses, as in the GPT-3 paper and lm-eval's decontamination (lower-cased words,
  punctuation removed). Documents shorter than 13 words are compared whole.
"""

from __future__ import annotations

import re

from dpo_align.eval_data import DATASETS, load_docs


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def suite_instructions(data_dir: str | None, pku_path: str | None) -> dict[str, set[str]]:
    """Normalised instructions of every suite dataset that can be loaded offline."""
    found = {}
    for name in DATASETS:
        if name == "pku" and not pku_path:
            continue
        if name != "pku" and not data_dir:
            continue
        # a wrong --data-dir / --pku-path is an error naming the file, never a silent "no overlap"
        docs = load_docs(name, data_dir=data_dir, pku_path=pku_path)
        found[name] = {normalise(d["instruction"]) for d in docs}
    return found


def overlap(instructions: list[str], suite: dict[str, set[str]]) -> dict[str, list[int]]:
    """{dataset: indices of training instructions found in it}."""
    normalised = [normalise(t) for t in instructions]
    return {name: [i for i, t in enumerate(normalised) if t in texts] for name, texts in suite.items()}


N = 13
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int = N) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def ngram_overlap(training_texts: list[str], suite_docs: dict[str, list[str]], n: int = N) -> dict[str, dict]:
    """{dataset: {"documents", "contaminated", "fraction", "examples"}} for each suite dataset."""
    seen: set[tuple[str, ...]] = set()  # a short training text enters whole
    for text in training_texts:
        seen |= ngrams(words(text), n)
    report = {}
    for name, docs in suite_docs.items():
        hits = [i for i, doc in enumerate(docs) if ngrams(words(doc), n) & seen]
        report[name] = {"documents": len(docs), "contaminated": len(hits), "fraction": len(hits) / max(len(docs), 1),
                        "examples": [docs[i][:200] for i in hits[:3]]}
    return report


def suite_documents(data_dir: str | None, pku_path: str | None) -> dict[str, list[str]]:
    """Instruction + response of every suite document, for the datasets given (errors are not swallowed)."""
    found = {}
    for name in DATASETS:
        if (name == "pku" and not pku_path) or (name != "pku" and not data_dir):
            continue
        found[name] = [d["instruction"] + "\n" + d["response"] for d in load_docs(name, data_dir=data_dir, pku_path=pku_path)]
    return found


def markdown(report: dict[str, dict], exact: dict[str, int], training: str) -> str:
    lines = [f"Training data: {training}.", "",
             "| scoring set | documents | training prompt identical to its instruction | documents sharing a 13-gram with the training text | share |",
             "|---|---|---|---|---|"]
    for name, row in report.items():
        lines.append(f"| {name} | {row['documents']} | {exact.get(name, 0)} | {row['contaminated']} | {100 * row['fraction']:.2f}% |")
    return "\n".join(lines) + "\n"
