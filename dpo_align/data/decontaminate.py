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
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.data.suite import DATASETS
from dpo_align.data.suite_docs import load_docs, local_data_dir


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def suite_docs(data_dir: str | None, pku_path: str | None, *, include_hub: bool = False, foils: bool = False) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """({dataset: documents}, {dataset: why it was not checked}).

    Sets given as files are always read, and a wrong --data-dir / --pku-path is an error naming
    the file, never a silent "no overlap". Sets that would be scored from the hub are read from
    the hub with ``include_hub`` (as the sweep does, which scores them); when the hub cannot be
    reached they are listed as not checked, with the reason, instead of counting as clean."""
    found, unchecked = {}, {}
    for name in DATASETS:
        local = bool(pku_path) if name == "pku" else bool(local_data_dir(data_dir))
        if not local and not include_hub:
            continue
        if local:
            found[name] = load_docs(name, data_dir=data_dir, pku_path=pku_path, foils=foils)
            continue
        try:
            found[name] = load_docs(name)
        except UserError as err:
            unchecked[name] = f"the hub set could not be read ({str(err).splitlines()[0][:160]})"
    return found, unchecked


def instruction_sets(docs: dict[str, list[dict]]) -> dict[str, set[str]]:
    """{dataset: normalised instructions}, what ``overlap`` compares training prompts with."""
    return {name: {normalise(d["instruction"]) for d in rows} for name, rows in docs.items()}


def document_texts(docs: dict[str, list[dict]]) -> dict[str, list[str]]:
    """{dataset: instruction + response of each document}, what ``ngram_overlap`` searches."""
    return {name: [d["instruction"] + "\n" + d["response"] for d in rows] for name, rows in docs.items()}


def suite_instructions(data_dir: str | None, pku_path: str | None) -> dict[str, set[str]]:
    """Normalised instructions of the suite sets given as files (train's check before every run)."""
    return instruction_sets(suite_docs(data_dir, pku_path)[0])


# PKU-Alignment/processed-hh-rlhf's test split is hh-rlhf's test split, reformatted (8,492 =
# 8,552 minus 60 rows with duplicate responses); ../shared/data's train pool is carved from
# hh-rlhf's test files too.
HH_RLHF_TEST_NOTE = ("PKU-Alignment/processed-hh-rlhf's test split is hh-rlhf's test split, reformatted; ../shared/data's "
                     "splits/train-pool is carved from hh-rlhf's test files too")


def _pku_from_hub(pku_path: str | None) -> bool:
    """PKU is scored from the hub: no --pku-path (the default), or a hub id of the PKU dataset."""
    from dpo_align.data.hub import split_revision

    return not pku_path or split_revision(str(pku_path))[0].startswith("PKU-Alignment/processed-hh-rlhf")


def same_source_split(training: list[str], split: str, pku_path: str | None) -> str | None:
    """The warning when the training data is hub hh-rlhf's test split and PKU is scored from the hub."""
    from dpo_align.data.hub import split_revision

    if not _pku_from_hub(pku_path):
        return None
    hub_test = [s for s in training if split_revision(s)[0].split(":")[0] == "Anthropic/hh-rlhf" and split == "test"]
    if not hub_test:
        return None
    return (f"the training data ({', '.join(hub_test)}, split test) and the PKU scoring set come from the same source split: "
            f"{HH_RLHF_TEST_NOTE}. PKU then scores the training documents themselves. Train on hh-rlhf's train split, "
            "or score PKU on held-out pairs (--pku-path ../shared/data/splits/heldout.jsonl.gz).")


def same_source(training: list[str], split: str, pku_path: str | None) -> str | None:
    """A plain warning when the PKU scoring set may be the training data's own source split, else None."""
    if not _pku_from_hub(pku_path):
        return None
    definite = same_source_split(training, split, pku_path)
    if definite:
        return definite
    files = [s for s in training if Path(s).expanduser().exists()]
    if files:
        return (f"PKU is scored from the hub, and the training files ({', '.join(files)}) cannot be traced to a split from here: "
                f"{HH_RLHF_TEST_NOTE}. If they come from hh-rlhf's test split, PKU scores the training documents themselves; "
                "score PKU on held-out pairs instead (--pku-path ../shared/data/splits/heldout.jsonl.gz).")
    return None


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


def markdown(report: dict[str, dict], exact: dict[str, int], training: str, unchecked: dict[str, str] | None = None,
             warning: str | None = None) -> str:
    lines = [f"Training data: {training}.", "",
             "| scoring set | documents | training prompt identical to its instruction | documents sharing a 13-gram with the training text | share |",
             "|---|---|---|---|---|"]
    for name, row in report.items():
        lines.append(f"| {name} | {row['documents']} | {exact.get(name, 0)} | {row['contaminated']} | {100 * row['fraction']:.2f}% |")
    for name, why in (unchecked or {}).items():
        lines.append(f"| {name} | not checked: {why} | | | |")
    if warning:
        lines += ["", f"**Warning:** {warning}"]
    return "\n".join(lines) + "\n"
