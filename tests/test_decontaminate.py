"""Decontamination: exact prompts and 13-gram overlap, counted per scoring set; a wrong data folder is an error."""

from __future__ import annotations

import pytest

from dpo_align.core.errors import UserError
from dpo_align.data.decontaminate import document_texts, ngram_overlap, suite_docs, suite_instructions

LONG = "the quick brown fox jumps over the lazy dog while the farmer sleeps in the warm afternoon sun"


def test_a_shared_13_gram_flags_the_document_and_12_words_do_not():
    words = LONG.split()
    training = ["Some prompt. " + " ".join(words[:13]).upper() + "!"]  # case and punctuation do not matter
    suite = {"a": [LONG, "nothing in common with anything here at all, not one word of the fox story"],
             "b": ["prefix " + " ".join(words[1:13]) + " suffix words that differ from the training text entirely"]}
    report = ngram_overlap(training, suite)
    assert (report["a"]["contaminated"], report["a"]["documents"]) == (1, 2) and report["a"]["fraction"] == 0.5
    assert report["b"]["contaminated"] == 0  # only 12 consecutive shared words
    assert report["a"]["examples"] == [LONG[:200]]


def test_short_documents_are_compared_whole():
    assert ngram_overlap(["yes it is"], {"s": ["Yes, it is.", "no it is not"]})["s"]["contaminated"] == 1


def test_a_wrong_data_dir_is_an_error_not_a_silent_zero(tmp_path, tiny_data):
    with pytest.raises(UserError, match="TruthfulQA.csv"):
        suite_instructions(str(tmp_path / "nowhere"), None)
    with pytest.raises(UserError, match="TruthfulQA.csv"):
        suite_docs(str(tmp_path / "nowhere"), None)
    found, unchecked = suite_docs(str(tiny_data), str(tiny_data / "pku.jsonl.gz"))
    docs = document_texts(found)
    assert unchecked == {}
    assert {k: len(v) for k, v in docs.items()} == {"truthfulqa": 3, "winogrande": 2, "pku": 2}


def test_sets_scored_from_the_hub_are_checked_or_named_as_unchecked(monkeypatch):
    monkeypatch.delenv("DPO_ALIGN_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs, unchecked = suite_docs(None, None, include_hub=False)
    assert docs == {} and unchecked == {}  # train's check: only the sets given as files
    docs, unchecked = suite_docs(None, None, include_hub=True)  # the sweep's: the hub cannot be reached here
    assert docs == {} and set(unchecked) == {"truthfulqa", "winogrande", "pku"}
    assert all("could not be read" in why for why in unchecked.values())


def test_training_on_hh_rlhf_test_and_scoring_hub_pku_is_called_the_same_source(tmp_path):
    from dpo_align.data.decontaminate import same_source

    said = same_source(["Anthropic/hh-rlhf"], "test", None)
    assert "same source split" in said and "--pku-path" in said
    assert same_source(["Anthropic/hh-rlhf"], "train", None) is None  # hh-rlhf train is not PKU's test split
    assert same_source(["Anthropic/hh-rlhf"], "test", str(tmp_path / "heldout.jsonl")) is None  # PKU scored on a file
    assert "same source split" in same_source(["Anthropic/hh-rlhf@main"], "test", "PKU-Alignment/processed-hh-rlhf")
    pool = tmp_path / "train-pool.jsonl.gz"
    pool.write_bytes(b"")
    assert "cannot be traced" in same_source([str(pool)], "train", None)  # files: said plainly that it cannot tell
