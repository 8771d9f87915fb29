"""The three scoring datasets as (instruction, response) documents, from the hub or offline.

Each loader returns a list of ``{"id", "instruction", "response"}`` dicts in file order,
all texts stripped, so ``--limit N`` scores the first N documents.

Offline layout (that of ``../shared/data``): ``DATA_DIR/truthfulqa/TruthfulQA.csv`` and
``DATA_DIR/winogrande/dev.jsonl``; the PKU stand-in is given as ``pku_path`` (processed
hh-rlhf JSONL, or hh-rlhf transcripts converted by the foundation's rule).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import read_text
from dpo_align.data.pairs import parse_record, read_pairs
from dpo_align.data.suite import DATASETS

DATA_DIR_ENV = "DPO_ALIGN_DATA_DIR"


def local_data_dir(data_dir: str | None) -> str | None:
    """The offline data folder: ``data_dir`` if given, else env DPO_ALIGN_DATA_DIR, else None (the hub)."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None

WINOGRANDE_INSTRUCTION = (
    'Fill in the blank "_" in the sentence below with the correct option.\n'
    "Sentence: {sentence}\nOption 1: {option1}\nOption 2: {option2}"
)


def _hub_rows(name: str, revision: str | None = None) -> list[dict]:
    from dpo_align.data.hub import load_split

    path, config, split = DATASETS[name].hub
    try:
        return list(load_split(path, config, split, revision=revision)[0])
    except Exception as err:
        raise UserError(
            f"Could not load {path} ({config or 'default'}, {split}{', revision ' + revision if revision else ''}) from the "
            f"Hugging Face hub: {err}\n"
            f"Offline? Point data_dir (--data-dir, or env {DATA_DIR_ENV}) at a folder laid out like "
            "../shared/data (truthfulqa/TruthfulQA.csv, winogrande/dev.jsonl) and pku_path at the PKU file(s)."
        ) from None


def _local_file(data_dir: str, relative: str, name: str) -> Path:
    path = Path(data_dir).expanduser() / relative
    if not path.is_file():
        hub, config, split = DATASETS[name].hub
        raise UserError(
            f"{name}: looked for {path} and it is not there. Put the file there, point data_dir at the "
            f"folder that holds {relative}, or leave data_dir unset to load {hub} ({config or 'default'}, {split}) from the hub."
        )
    return path


def truthfulqa_docs(data_dir: str | None = None, revision: str | None = None) -> list[dict]:
    """TruthfulQA generation/validation: instruction = Question, response = Best Answer, foils = Incorrect Answers
    (``;``-separated in the CSV, a list on the hub; None when the CSV has no such column)."""
    if data_dir:
        path = _local_file(data_dir, "truthfulqa/TruthfulQA.csv", "truthfulqa")
        with io.StringIO(read_text(path), newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("Question", "Best Answer") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}:1: the header has no {' or '.join(repr(c) for c in missing)} column"
                                f" (found: {', '.join(reader.fieldnames or []) or 'an empty file'}). TruthfulQA.csv needs "
                                "'Question' and 'Best Answer'.")
            rows = []
            for line, r in enumerate(reader, start=2):
                if r.get("Question") is None or r.get("Best Answer") is None:
                    raise UserError(f"{path}:{line}: the row has fewer columns than the header (no 'Best Answer').")
                incorrect = r.get("Incorrect Answers")
                rows.append((r["Question"], r["Best Answer"], None if incorrect is None else incorrect.split(";")))
        if not rows:
            raise UserError(f"{path}: no rows after the header.")
    else:
        rows = [(r["question"], r["best_answer"], list(r.get("incorrect_answers") or [])) for r in _hub_rows("truthfulqa", revision)]
    return [{"id": i, "instruction": q.strip(), "response": a.strip(), "foils": wrong} for i, (q, a, wrong) in enumerate(rows)]


def winogrande_docs(data_dir: str | None = None, revision: str | None = None) -> list[dict]:
    """WinoGrande xl/validation: the fill-in instruction; response = the correct option's text, foil = the other option's."""
    where = []
    if data_dir:
        path = _local_file(data_dir, "winogrande/dev.jsonl", "winogrande")
        rows = []
        with io.StringIO(read_text(path)) as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise UserError(f"{path}:{line_number}: not valid JSON.") from None
                    where.append(f"{path}:{line_number}")
        if not rows:
            raise UserError(f"{path}: no rows.")
    else:
        rows = _hub_rows("winogrande", revision)
    docs = []
    for i, row in enumerate(rows):
        place = where[i] if where else f"winogrande row {i + 1}"
        missing = [k for k in ("sentence", "option1", "option2", "answer") if not isinstance(row, dict) or not isinstance(row.get(k), str | int)]
        if missing:
            raise UserError(f"{place}: missing or non-text field(s) {', '.join(missing)}; each row needs sentence, option1, option2, answer.")
        sentence, option1, option2 = (str(row[k]).strip() for k in ("sentence", "option1", "option2"))
        answer = str(row["answer"]).strip()
        if answer not in ("1", "2"):
            raise UserError(f"{place}: answer must be '1' or '2', got {answer!r}.")
        instruction = WINOGRANDE_INSTRUCTION.format(sentence=sentence, option1=option1, option2=option2)
        right, wrong = (option1, option2) if answer == "1" else (option2, option1)
        docs.append({"id": i, "instruction": instruction, "response": right, "foils": [wrong]})
    return docs


def pku_docs(pku_path: str | list[str] | None = None, revision: str | None = None) -> list[dict]:
    """PKU processed-hh-rlhf test: instruction = the rendered context, response = chosen, foil = rejected.

    Rows whose chosen and rejected texts are identical are dropped (as are transcripts
    that do not end with an Assistant turn).
    """
    if pku_path:
        sources = [pku_path] if isinstance(pku_path, str) else list(pku_path)
        pairs, _ = read_pairs(sources, split="test", for_training=False, hash_files=False)  # a hub id: its test split
    else:
        pairs = []
        for i, row in enumerate(_hub_rows("pku", revision)):
            result = parse_record(row, f"pku:{i}", for_training=False)
            if not isinstance(result, str):
                pairs.append(result)
    return [{"id": i, "instruction": p.instruction, "response": p.chosen, "foils": [p.rejected]} for i, p in enumerate(pairs)]


def preference_docs(path: str | list[str] | None = None, data_dir: str | None = None, revision: str | None = None) -> list[dict]:
    """Held-out preference pairs as ``{"id", "instruction", "chosen", "rejected"}``.

    From ``path`` (hh-rlhf transcripts or processed PKU rows) if given; else offline from
    ``DATA_DIR/splits/heldout.jsonl.gz`` (``data_dir`` or env DPO_ALIGN_DATA_DIR); else the test
    split of PKU-Alignment/processed-hh-rlhf from the hub. Identical pairs are dropped.
    """
    data_dir = local_data_dir(data_dir)
    if path:
        sources = [path] if isinstance(path, str) else list(path)
    elif data_dir:
        sources = [str(_local_file(data_dir, "splits/heldout.jsonl.gz", "pku"))]
    else:
        sources = None
    if sources:
        pairs, _ = read_pairs(sources, split="test", for_training=False, hash_files=False)
    else:
        pairs = [r for i, row in enumerate(_hub_rows("pku", revision)) if not isinstance(r := parse_record(row, f"pku:{i}", for_training=False), str)]
    return [{"id": i, "instruction": p.instruction, "chosen": p.chosen, "rejected": p.rejected} for i, p in enumerate(pairs)]


# Documents with an empty response, skipped per dataset by the last load_docs (read by dpo-align eval for its
# results; plain lm_eval users get the warning); with foils, those left without one.
SKIPPED_EMPTY: dict[str, int] = {}
SKIPPED_NO_FOIL: dict[str, int] = {}


def clean_foils(foils: list[str], reference: str) -> list[str]:
    """A document's foils, stripped, without empty ones, repeats, or copies of the reference."""
    kept = []
    for foil in (f.strip() for f in foils):
        if foil and foil != reference and foil not in kept:
            kept.append(foil)
    return kept


def load_docs(name: str, *, data_dir: str | None = None, pku_path: str | list[str] | None = None, revision: str | None = None,
              foils: bool = False) -> list[dict]:
    """Documents of one scoring dataset; ``data_dir`` falls back to env DPO_ALIGN_DATA_DIR.

    A document whose response is empty is skipped and counted (``SKIPPED_EMPTY``): scoring it would score only
    the template's separator. Document ids stay the row numbers of the source. ``revision`` pins the hub
    dataset (branch, tag or commit) when the set is read from the hub; the commit read is in ``hub.COMMITS``.
    With ``foils`` each document keeps its ``foils`` (the wrong answers scored beside the reference, see
    ``clean_foils``) and one left without any is skipped and counted (``SKIPPED_NO_FOIL``); without, documents
    hold no ``foils`` field, exactly as the dpo_ppl tasks have always seen them.
    """
    data_dir = local_data_dir(data_dir)
    if name == "truthfulqa":
        docs = truthfulqa_docs(data_dir, revision)
    elif name == "winogrande":
        docs = winogrande_docs(data_dir, revision)
    elif name == "pku":
        docs = pku_docs(pku_path, revision)
    else:
        raise UserError(f"Unknown scoring dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    import warnings

    kept = [d for d in docs if d["response"]]
    SKIPPED_EMPTY[name] = len(docs) - len(kept)
    if not kept:
        raise UserError(f"{name}: all {len(docs)} documents have an empty response; there is nothing to score.")
    if len(kept) < len(docs):
        warnings.warn(f"{name}: {len(docs) - len(kept)} document(s) with an empty response skipped (of {len(docs)}).", stacklevel=2)
    if not foils:
        return [{k: v for k, v in d.items() if k != "foils"} for d in kept]
    if any(d["foils"] is None for d in kept):
        raise UserError(f"{name}: the data has no 'Incorrect Answers' column, which the dpo_contrast tasks score as foils. Use the "
                        "full TruthfulQA.csv, or score with the dpo_ppl tasks alone (dpo-align eval --no-controls).")
    for d in kept:
        d["foils"] = clean_foils(d["foils"], d["response"])
    with_foil = [d for d in kept if d["foils"]]
    SKIPPED_NO_FOIL[name] = len(kept) - len(with_foil)
    if not with_foil:
        raise UserError(f"{name}: no document has a foil (a wrong answer different from its reference); there is no control to score.")
    if len(with_foil) < len(kept):
        warnings.warn(f"{name}: {len(kept) - len(with_foil)} document(s) without a foil skipped by the contrast task (of {len(kept)}).",
                      stacklevel=2)
    return with_foil
