"""The preference-data layer: formats, every skip rule, every bad-input path, and a fuzz test."""

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo_align.core.errors import UserError
from dpo_align.data import pairs as data
from dpo_align.data.templates import render_prompt

from .conftest import SHARED_DATA, needs_shared_data


def hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


GOOD = {"chosen": hh(("Human", "q"), ("Assistant", "good")), "rejected": hh(("Human", "q"), ("Assistant", "bad"))}


def write_jsonl(path: Path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def test_hh_transcript_pair(tmp_path):
    multi = {
        "chosen": hh(("Human", "a"), ("Assistant", "b"), ("Human", "c"), ("Assistant", "yes")),
        "rejected": hh(("Human", "a"), ("Assistant", "b"), ("Human", "c"), ("Assistant", "no")),
    }
    pairs, report = data.read_pairs([str(write_jsonl(tmp_path / "d.jsonl", [GOOD, multi]))])
    assert [(p.instruction, p.chosen, p.rejected) for p in pairs] == [
        ("q", "good", "bad"),
        ("Human: a\nAssistant: b\nHuman: c", "yes", "no"),
    ]
    assert report.rows_read == 2 and report.rows_kept == 2 and not report.skipped


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": hh(("Human", "q"), ("Assistant", "same")), "rejected": hh(("Human", "q"), ("Assistant", "same"))}, data.SKIP_IDENTICAL),
        ({"chosen": hh(("Human", "q"), ("Assistant", "  ")), "rejected": hh(("Human", "q"), ("Assistant", "x"))}, data.SKIP_EMPTY_RESPONSE),
        ({"chosen": hh(("Human", "q")), "rejected": hh(("Human", "q"), ("Assistant", "x"))}, data.SKIP_NO_FINAL_ASSISTANT),
        ({"chosen": "no markers at all", "rejected": "nor here"}, data.SKIP_TEXT_BEFORE_FIRST_TURN),
        ({"chosen": hh(("Human", "q1"), ("Assistant", "a")), "rejected": hh(("Human", "q2"), ("Assistant", "b"))}, data.SKIP_CONTEXT_MISMATCH),
        ({"chosen": hh(("Assistant", "a")), "rejected": hh(("Assistant", "b"))}, data.SKIP_EMPTY_PROMPT),
    ],
)
def test_each_skip_rule_is_counted(tmp_path, row, reason):
    pairs, report = data.read_pairs([str(write_jsonl(tmp_path / "d.jsonl", [GOOD, row]))])
    assert len(pairs) == 1
    assert report.skipped == {reason: 1}
    assert report.rows_read == 2 and report.rows_kept == 1


def test_pku_and_plain_formats(tmp_path):
    pku = {
        "context": [{"role": "human", "text": " hi "}, {"role": "assistant", "text": "hello"}, {"role": "human", "text": "q?"}],
        "chosen": {"role": "assistant", "text": " yes "},
        "rejected": {"role": "assistant", "text": "no"},
    }
    plain = {"prompt": "Say hi", "chosen": "hi", "rejected": "go away"}
    pairs, _ = data.read_pairs([str(write_jsonl(tmp_path / "d.jsonl", [pku, plain]))])
    assert (pairs[0].instruction, pairs[0].chosen, pairs[0].rejected) == ("Human: hi\nAssistant: hello\nHuman: q?", "yes", "no")
    assert (pairs[1].instruction, pairs[1].chosen) == ("Say hi", "hi")


def test_compressed_json_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl.gz", [GOOD], opener=gzip.open)
    (folder / "b.json").write_text(json.dumps([GOOD, GOOD]))
    pq.write_table(pa.Table.from_pylist([GOOD]), folder / "c.parquet")
    (folder / "notes.txt").write_text("ignored")
    pairs, report = data.read_pairs([str(folder)])
    assert len(pairs) == 4
    assert [Path(s.name).name for s in report.sources] == ["a.jsonl.gz", "b.json", "c.parquet"]
    assert all(len(s.sha256) == 64 for s in report.sources)


def test_dataset_columns_are_rendered_with_the_template(tmp_path):
    dataset, report = data.load_preference_dataset([str(write_jsonl(tmp_path / "d.jsonl", [GOOD]))])
    row = dataset[0]
    assert row["prompt"] == render_prompt("q", "alpaca")
    assert row["chosen"] == "\ngood" and row["rejected"] == "\nbad"
    assert row["instruction"] == "q"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"chosen": "x", ', "invalid JSON"),
        ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a"}', "missing field 'rejected'"),
        ('{"chosen": 3, "rejected": "x"}', "field 'chosen' must be a string"),
        ('{"text": "hello"}', "missing fields"),
        ("[1, 2]", "row must be a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(UserError) as err:
        data.read_pairs([str(path)])
    assert f"{path}:2" in str(err.value) and message in str(err.value) and "--skip-bad-rows" in str(err.value)
    # With --skip-bad-rows the same row is counted, not fatal.
    pairs, report = data.read_pairs([str(path)], skip_bad_rows=True)
    assert len(pairs) == 1 and report.skipped == {data.SKIP_BAD_ROW: 1}


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"chosen": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8"):
        data.read_pairs([str(path)])


def test_empty_file_and_no_usable_rows_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        data.read_pairs([str(empty)])
    same = {"chosen": hh(("Human", "q"), ("Assistant", "a")), "rejected": hh(("Human", "q"), ("Assistant", "a"))}
    with pytest.raises(UserError, match="no usable preference pair.*identical: 1"):
        data.read_pairs([str(write_jsonl(tmp_path / "same.jsonl", [same]))])


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.read_pairs([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        data.read_pairs([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="No data"):
        data.read_pairs([])


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    write_jsonl(path, [GOOD] * 50, opener=gzip.open)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="cannot read"):
        data.read_pairs([str(path)])


_turn_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
_transcript = st.one_of(
    st.text(max_size=80),
    st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), _turn_text), max_size=5).map(lambda ts: hh(*ts)),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({"chosen": _transcript, "rejected": _transcript}), min_size=1, max_size=4))
def test_parser_never_crashes_and_accounts_for_every_row(rows):
    kept, skipped = 0, {}
    for i, row in enumerate(rows):
        result = data.parse_record(row, f"mem:{i}")
        if isinstance(result, data.Pair):
            kept += 1
            assert result.chosen and result.rejected and result.chosen != result.rejected
            assert result.chosen == result.chosen.strip()
        else:
            assert isinstance(result, str) and result
            skipped[result] = skipped.get(result, 0) + 1
    assert kept + sum(skipped.values()) == len(rows)


@needs_shared_data
def test_real_train_pool_counts():
    pairs, report = data.read_pairs([str(SHARED_DATA / "splits" / "train-pool.jsonl.gz")])
    assert report.rows_read == 7716
    assert report.rows_kept == len(pairs) == 7657
    assert report.skipped == {
        data.SKIP_IDENTICAL: 32,
        data.SKIP_CONTEXT_MISMATCH: 15,
        data.SKIP_EMPTY_RESPONSE: 10,
        data.SKIP_NO_FINAL_ASSISTANT: 2,
    }
    assert report.sources[0].sha256 == "acf2915bcdfbe87ff3eeed908df8a7c828bd4e4a75eea3c6d509367169c8904a"


@needs_shared_data
def test_real_heldout_and_all_test_splits_load():
    _, held = data.read_pairs([str(SHARED_DATA / "splits" / "heldout.jsonl.gz")])
    _, whole = data.read_pairs([str(SHARED_DATA / "hh-rlhf")])
    assert held.rows_read == 836 and whole.rows_read == 8552
    assert whole.rows_read == whole.rows_kept + sum(whole.skipped.values())


def test_hub_dataset_offline_says_how_to_use_local_files():
    with pytest.raises(UserError, match=r"Anthropic/hh-rlhf:harmless-base.*\n.*--data path/to/train.jsonl.gz"):
        data.read_pairs(["Anthropic/hh-rlhf:harmless-base"])
