"""Hugging Face hub datasets, pinned: ``owner/name@REVISION``, and the commit actually read.

Two of the scoring sets (WinoGrande, PKU) have been rewritten in place on the hub, so a
number is only repeatable with the commit it was computed on. Every hub load goes through
``load_split``: it passes the revision asked for (a branch, tag or commit; default the
main branch) and returns the commit that was read, which runs record in their manifest
and results.
"""

from __future__ import annotations

import re

# datasets names the files it read as hf://datasets/OWNER/NAME@COMMIT/..., the commit resolved
_COMMIT_IN_URL = re.compile(r"@([0-9a-f]{40})/")

# commit read per (repo, config, split) in this process: results and manifests record it
COMMITS: dict[str, str | None] = {}


def split_revision(spec: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); no ``@`` -> (spec, None)."""
    name, at, revision = spec.partition("@")
    if at and not revision:
        from dpo_align.core.errors import UserError

        raise UserError(f"{spec!r}: nothing after '@'. Write owner/name@REVISION (a branch, tag or commit), or leave '@' out.")
    return name, (revision or None)


def load_split(repo: str, config: str | None, split: str, *, revision: str | None = None, data_dir: str | None = None):
    """``datasets.load_dataset`` at ``revision``; records and returns (dataset, commit or None)."""
    import datasets

    kwargs = {"data_dir": data_dir} if data_dir else {}
    if revision:
        kwargs["revision"] = revision
    dataset = datasets.load_dataset(repo, config, split=split, **kwargs)
    commit = resolved_commit(dataset, repo, revision)
    COMMITS[key(repo, config, split)] = commit
    return dataset, commit


def key(repo: str, config: str | None, split: str) -> str:
    return f"{repo}" + (f"/{config}" if config else "") + f"[{split}]"


def resolved_commit(dataset, repo: str, revision: str | None) -> str | None:
    """The commit the rows came from: from the files datasets read, else asked of the hub."""
    checksums = getattr(getattr(dataset, "info", None), "download_checksums", None) or {}
    for url in checksums:
        found = _COMMIT_IN_URL.search(str(url))
        if found:
            return found.group(1)
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception:  # offline, or a local stand-in: the commit is unknown, and recorded as such
        return None
