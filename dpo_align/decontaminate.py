"""How many training prompts also appear in the scoring suite's evaluation sets.

Exact match after whitespace normalisation (runs of whitespace collapsed, ends stripped,
case kept): the same test lm-eval's decontamination uses for whole documents, cheap
enough to run before every training run.
"""

from __future__ import annotations

import re

from dpo_align.errors import UserError
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
        try:
            docs = load_docs(name, data_dir=data_dir, pku_path=pku_path)
        except UserError:
            continue
        found[name] = {normalise(d["instruction"]) for d in docs}
    return found


def overlap(instructions: list[str], suite: dict[str, set[str]]) -> dict[str, list[int]]:
    """{dataset: indices of training instructions found in it}."""
    normalised = [normalise(t) for t in instructions]
    return {name: [i for i, t in enumerate(normalised) if t in texts] for name, texts in suite.items()}
