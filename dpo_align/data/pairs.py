"""Preference pairs from hh-rlhf (hub or files) into a `datasets.Dataset` ready for TRL.

Three row formats are understood, told apart by their fields:

* hh-rlhf transcripts: ``chosen``/``rejected`` are whole ``"\\n\\nHuman: ..."`` dialogues;
* PKU processed-hh-rlhf: ``context`` is a list of ``{role, text}``, ``chosen``/``rejected``
  are ``{role, text}``;
* plain: ``prompt``/``chosen``/``rejected`` strings (the prompt is the instruction).

Rows that cannot be trained on are skipped and counted by reason; rows that are broken
(invalid JSON, a missing or mistyped field, bytes that are not UTF-8) are errors naming
``file:line`` unless ``skip_bad_rows`` is set, in which case they are counted too.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import decode_utf8, input_file, sha256_file
from dpo_align.data.templates import DEFAULT_TEMPLATE, render_prompt, render_response
from dpo_align.data.transcripts import ASSISTANT, HUMAN, Turn, normalise_role, render_instruction, split_transcript

DEFAULT_DATASET = "Anthropic/hh-rlhf"
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.bz2", ".json", ".json.gz", ".parquet")

# Skip reasons, counted in LoadReport.skipped.
SKIP_NO_FINAL_ASSISTANT = "no final Assistant turn"
SKIP_TEXT_BEFORE_FIRST_TURN = "text before the first Human/Assistant marker"
SKIP_EMPTY_PROMPT = "empty prompt"
SKIP_CONTEXT_MISMATCH = "chosen and rejected contexts differ"
SKIP_EMPTY_RESPONSE = "empty response"
SKIP_IDENTICAL = "chosen and rejected identical"
SKIP_BAD_ROW = "bad row (--skip-bad-rows)"


class BadRow(ValueError):
    """A row that is not a preference pair at all (missing or mistyped field)."""


@dataclass(frozen=True)
class Pair:
    instruction: str
    chosen: str
    rejected: str
    where: str  # "file:line", for messages


@dataclass
class SourceInfo:
    """What was read from one file or hub split, for run manifests."""

    name: str
    rows: int = 0
    sha256: str | None = None  # of the file as stored; None for hub splits
    revision: str | None = None  # hub commit, where known


@dataclass
class LoadReport:
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    sources: list[SourceInfo] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)  # first few messages, for display

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "skipped": dict(self.skipped),
            "sources": [vars(s) for s in self.sources],
        }


# --------------------------------------------------------------------------- row parsing


def _text_field(record: dict, name: str) -> str:
    if name not in record:
        raise BadRow(f"missing field {name!r}")
    value = record[name]
    if isinstance(value, dict):  # PKU's {role, text}
        value = value.get("text")
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} must be a string (or {{role, text}}), got {type(value).__name__}")
    return value


def _pku_context(record: dict) -> list[Turn]:
    context = record["context"]
    if not isinstance(context, list):
        raise BadRow(f"field 'context' must be a list of {{role, text}}, got {type(context).__name__}")
    turns = []
    for i, item in enumerate(context):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("role"), str):
            raise BadRow(f"field 'context[{i}]' must be an object with string 'role' and 'text'")
        turns.append(Turn(normalise_role(item["role"]), item["text"].strip()))
    return turns


def parse_record(record: object, where: str, for_training: bool = True) -> Pair | str:
    """Turn one row into a Pair, or return the reason it is skipped.

    Raises BadRow when the row is not a preference pair at all. Training needs a real
    pair: one shared, non-empty context and two non-empty responses. Scoring
    (``for_training=False``) scores the chosen response in the chosen side's context and
    drops only rows that do not end with an Assistant turn or whose responses are identical.
    """
    if not isinstance(record, dict):
        raise BadRow(f"row must be a JSON object, got {type(record).__name__}")

    if "context" in record:
        context = _pku_context(record)
        chosen, rejected = _text_field(record, "chosen").strip(), _text_field(record, "rejected").strip()
    elif "prompt" in record:
        prompt = _text_field(record, "prompt").strip()
        context = [Turn(HUMAN, prompt)] if prompt else []
        chosen, rejected = _text_field(record, "chosen").strip(), _text_field(record, "rejected").strip()
    elif "chosen" in record or "rejected" in record:
        sides = []
        for name in ("chosen", "rejected"):
            lead, turns = split_transcript(_text_field(record, name))
            if lead:
                return SKIP_TEXT_BEFORE_FIRST_TURN
            if not turns or turns[-1].role != ASSISTANT:
                return SKIP_NO_FINAL_ASSISTANT
            sides.append(turns)
        if for_training and sides[0][:-1] != sides[1][:-1]:
            return SKIP_CONTEXT_MISMATCH
        context = sides[0][:-1]
        chosen, rejected = sides[0][-1].text, sides[1][-1].text
    else:
        raise BadRow(
            "missing fields: expected 'chosen' and 'rejected' (hh-rlhf transcripts), "
            "'context' (PKU processed-hh-rlhf) or 'prompt' (plain)"
        )

    if chosen == rejected:
        return SKIP_IDENTICAL
    if for_training:
        if not context or all(not turn.text for turn in context):
            return SKIP_EMPTY_PROMPT
        if not chosen or not rejected:
            return SKIP_EMPTY_RESPONSE
    return Pair(render_instruction(context), chosen, rejected, where)


# --------------------------------------------------------------------------- file reading


def _open_bytes(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def data_files(path: Path) -> list[Path]:
    """The data files a path names: itself, or the supported files in a directory (sorted)."""
    if path.is_dir():
        every = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = [p for p in every if p.name.endswith(SUFFIXES)]
        if not files:
            raise UserError(f"{path}: directory holds no data files (looked for {', '.join(SUFFIXES)}).")
        ignored = [str(p.relative_to(path)) for p in every if p not in files]
        if ignored:  # a .csv or .txt of pairs would otherwise be left out without a word
            import warnings

            shown = ", ".join(ignored[:10]) + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
            warnings.warn(f"{path}: ignoring {len(ignored)} file(s) that are not data files ({', '.join(SUFFIXES)}): {shown}",
                          stacklevel=2)
        return files
    if not path.name.endswith(SUFFIXES):
        raise UserError(f"{path}: unsupported file type. Use one of {', '.join(SUFFIXES)}.")
    return [input_file(path)]


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (``file:line``, record) for every row of one file.

    Undecodable rows are yielded as a BadRow instance instead of a record, so the caller
    decides whether that is fatal (the default) or counted (``--skip-bad-rows``).
    """
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for broken files
            raise UserError(f"{path}: not a readable parquet file ({err}).") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {i}", row
        return

    try:
        with _open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"{path}: cannot read the file ({err}). Is it truncated or not really compressed?") from None

    if path.name.endswith((".json", ".json.gz")) and raw.lstrip()[:1] == b"[":
        try:
            rows = json.loads(decode_utf8(raw, str(path)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}:item {i}", row
        return

    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield where, BadRow(f"not UTF-8 text (byte {err.start} of the line)")
        except json.JSONDecodeError as err:
            yield where, BadRow(f"invalid JSON ({err.msg}, column {err.colno})")


def _iter_hub(spec: str, split: str, info: SourceInfo) -> Iterator[tuple[str, object]]:
    """Rows of a hub dataset. ``spec`` is ``owner/name[:data_dir][@revision]``; the commit read goes into ``info``."""
    from dpo_align.data.hub import load_split, split_revision

    name, revision = split_revision(spec)
    repo, _, data_dir = name.partition(":")
    try:
        dataset, info.revision = load_split(repo, None, split, revision=revision, data_dir=data_dir or None)
    except Exception as err:
        raise UserError(
            f"Could not load {spec!r} (split {split!r}) from the Hugging Face hub: {err}\n"
            "Offline? Download the files once and pass their path instead, e.g. "
            "`--data path/to/train.jsonl.gz` (.jsonl, .jsonl.gz, .json, .parquet or a directory)."
        ) from None
    for i, row in enumerate(dataset, start=1):
        yield f"{spec}[{split}]:row {i}", row


def read_pairs(
    sources: list[str],
    *,
    split: str = "train",
    skip_bad_rows: bool = False,
    for_training: bool = True,
    hash_files: bool = True,
) -> tuple[list[Pair], LoadReport]:
    """Read and parse preference pairs from files, directories or hub ids, in order."""
    if not sources:
        raise UserError("No data given. Pass a file, a directory or a hub id such as Anthropic/hh-rlhf.")
    seen = {}
    for source in sources:  # the same file twice would count every pair twice, with no word
        same = os.path.realpath(Path(source).expanduser()) if Path(source).expanduser().exists() else source
        if same in seen:
            raise UserError(f"{source}: given twice (as {seen[same]!r} and {source!r}); every pair would be read twice. "
                            "Give each data source once.")
        seen[same] = source
    report = LoadReport()
    pairs: list[Pair] = []
    for source in sources:
        path = Path(source).expanduser()
        if os.path.lexists(path) and not path.exists():
            input_file(path)  # a broken link or a link loop, named as such
        # (what is read, its rows): the rows are generated lazily; a hub source records the commit it read in its info
        if path.exists():
            streams = [(SourceInfo(str(p), sha256=sha256_file(p) if hash_files else None), iter_records(p)) for p in data_files(path)]
        elif "/" in source and not source.startswith((".", "/", "~")) and not Path(source.partition("@")[0]).suffix:
            info = SourceInfo(source)
            streams = [(info, _iter_hub(source, split, info))]
        else:
            raise UserError(f"{source}: no such file or directory (and it does not look like a hub id).")

        for info, records in streams:
            kept_before = len(pairs)
            for where, record in records:
                info.rows += 1
                report.rows_read += 1
                try:
                    if isinstance(record, BadRow):
                        raise record
                    result = parse_record(record, where, for_training)
                except BadRow as err:
                    if not skip_bad_rows:
                        raise UserError(f"{where}: {err}. Fix the row, or pass --skip-bad-rows to count and skip such rows.") from None
                    report.skipped[SKIP_BAD_ROW] += 1
                    if len(report.bad_rows) < 5:
                        report.bad_rows.append(f"{where}: {err}")
                    continue
                if isinstance(result, str):
                    report.skipped[result] += 1
                else:
                    pairs.append(result)
            report.sources.append(info)
            if info.rows == 0:
                raise UserError(f"{info.name}: the file is empty (no rows).")
            if len(pairs) == kept_before:
                reasons = ", ".join(f"{k}: {v}" for k, v in report.skipped.most_common()) or "none"
                raise UserError(f"{info.name}: no usable preference pair in {info.rows} rows (skipped: {reasons}).")
    report.rows_kept = len(pairs)
    return pairs, report


def to_dataset(pairs: list[Pair], template: str = DEFAULT_TEMPLATE, tokenizer=None):
    """Render pairs with a template into TRL's ``prompt``/``chosen``/``rejected`` columns.

    ``instruction`` is kept beside them (for decontamination and display).
    """
    import datasets

    return datasets.Dataset.from_dict(
        {
            "prompt": [render_prompt(p.instruction, template, tokenizer) for p in pairs],
            "chosen": [render_response(p.chosen, template) for p in pairs],
            "rejected": [render_response(p.rejected, template) for p in pairs],
            "instruction": [p.instruction for p in pairs],
        }
    )


def load_preference_dataset(
    sources: list[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    tokenizer=None,
    split: str = "train",
    skip_bad_rows: bool = False,
    max_pairs: int | None = None,
):
    """Files or hub ids -> (Dataset with prompt/chosen/rejected/instruction, LoadReport)."""
    pairs, report = read_pairs(sources, split=split, skip_bad_rows=skip_bad_rows)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    return to_dataset(pairs, template, tokenizer), report
