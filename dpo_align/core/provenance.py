"""Where a number came from: the exact bytes of a model, and the software that ran it."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import time
from pathlib import Path

from dpo_align.core.files import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PACKAGES = ("dpo-align", "torch", "transformers", "peft", "trl", "datasets", "lm-eval", "accelerate", "tokenizers")


def model_revision(name: str) -> dict:
    """sha256 of each weight file for a local directory; the commit hash for a cached hub model."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return {"path": str(path.resolve()), "sha256": {p.name: sha256_file(p) for p in files}}
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": {path.name: sha256_file(path)}}
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(name, local_files_only=True))
        return {"hub_id": name, "commit": snapshot.name}
    except Exception:
        return {"hub_id": name, "commit": None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files) when this process first asked. The
    CLI asks as a command starts (``at_start``), so a run that takes hours records the code it loaded, not the commit
    the checkout has moved to by the time it writes its results."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=5).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def started() -> str:
    """When this process's command started (the first call; the CLI makes it at the start), as results files say it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def at_start() -> None:
    """Take the commit and the start time now, before a long command loads and runs its code."""
    git_commit()
    started()


def machine() -> dict:
    import os

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def same_model(a: str, b: str) -> bool:
    """Whether two model names are one model: the same folder (however spelt) or the same hub id."""
    import os

    def where(name: str) -> str:
        path = Path(name).expanduser()
        return os.path.realpath(path) if path.exists() else name

    return where(a) == where(b)


def trained_template(adapter: str | Path) -> str | None:
    """The template an adapter was trained with, from the run's config.yaml (beside it, or one folder up for a
    checkpoint); None when the adapter was not written by `dpo-align train`."""
    import yaml

    folder = Path(adapter).expanduser()
    for config in (folder / "config.yaml", folder.parent / "config.yaml"):
        if config.is_file():
            try:
                template = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("template")
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
                return None
            return template if isinstance(template, str) else None
    return None


def template_warning(adapter: str | Path, template: str) -> str | None:
    """A warning when an adapter is used with another template than it was trained with. Not refused: reading an
    adapter under another template is a legitimate question (how much of its effect is the template's), but a
    number read that way is not the adapter's own."""
    trained = trained_template(adapter)
    if trained and trained != template:
        return (f"Warning: {adapter} was trained with template {trained!r} and is used here with {template!r}: its numbers "
                f"are not those of the layout it learned. Pass --template {trained} for those.")
    return None
