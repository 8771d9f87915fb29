"""A run's output folder: what makes one, its checkpoints, and the rules for resuming it.

A run folder holds ``config.yaml`` (written once the settings are valid and the trainer is
built), ``metrics.jsonl``, ``checkpoint-N/`` folders (each complete once it holds
``COMPLETE_MARKER``, with the settings it was trained under in ``SETTINGS_FILE``) and, last,
``manifest.json``: a folder without a manifest is an unfinished run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.train.config import TrainConfig, settings_diff

RUN_FILES = ("config.yaml", "manifest.json", "metrics.jsonl")
COMPLETE_MARKER = "dpo-align-checkpoint-complete"
SETTINGS_FILE = "dpo-align-settings.json"
DATA_KEY = "data_sha256"  # in SETTINGS_FILE: the sha256 of each data file read, in order (None for a hub split)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint folder, complete or not, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that was completely written, or None."""
    complete = [path for _, path in checkpoints(output_dir) if (path / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def is_run(output: Path) -> bool:
    return any((output / name).exists() for name in RUN_FILES) or bool(checkpoints(output))


def check_output_dir(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a folder the run may not write into; changes nothing on disk. (A file there, or a place that cannot be
    written, is refused before this by ``core.folder_lock.locked``, the rule every command's output folder follows.)

    An empty folder is free: a run that failed during set-up leaves its folder uncreated or
    empty (nothing is written before the trainer is built), so it is reused without --overwrite."""
    if resume:
        if (output / "manifest.json").is_file():
            raise UserError(f"--resume: the run in {output} already finished. Use --overwrite to train it again, or another --output-dir.")
        if not (output / "config.yaml").is_file():
            raise UserError(f"--resume: {output} holds no run to resume (no config.yaml). Start it without --resume.")
        return
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError(
                f"--output-dir {output} is not empty. Pass --overwrite to replace the run there, --resume to continue it, "
                "or choose another directory."
            )
        if not is_run(output):
            raise UserError(f"--overwrite: {output} does not look like a dpo-align run folder, so it is left alone. Choose another directory.")


def make_output_dir(output: Path, *, overwrite: bool) -> None:
    """Clear a replaced run (only now that the new one has been set up) and create the folder."""
    if output.is_dir() and overwrite and any(output.iterdir()):
        shutil.rmtree(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--output-dir {output}: cannot write there ({err.strerror}). Choose a writable directory with free space.") from None


def check_checkpoint_settings(checkpoint: Path, config: TrainConfig, output: Path) -> None:
    """config.yaml can be edited; the checkpoint's own copy says what it was trained with."""
    if not (checkpoint / SETTINGS_FILE).is_file():
        return
    stored = json.loads((checkpoint / SETTINGS_FILE).read_text())
    changed = settings_diff(stored, config)
    if changed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} in {checkpoint.name}, {getattr(config, k)!r} now" for k in changed)
        raise UserError(f"--resume: the settings differ from those {checkpoint} was trained with ({detail}). A resumed run "
                        f"continues exactly as it started: restore them in {output / 'config.yaml'}, or start a new run "
                        "(--overwrite, or another --output-dir).")


def check_checkpoint_data(checkpoint: Path, data_sha256: list, config: TrainConfig) -> None:
    """The same settings on other data are another run: a resume reads the files the checkpoint was trained on,
    byte for byte, or refuses (the manifest would otherwise record the new file's sha256 for an adapter trained
    mostly on the old one)."""
    if not (checkpoint / SETTINGS_FILE).is_file():
        return
    stored = json.loads((checkpoint / SETTINGS_FILE).read_text()).get(DATA_KEY)
    if stored is not None and stored != data_sha256:
        raise UserError(f"--resume: the data changed since {checkpoint} was saved ({', '.join(config.data)}: sha256 "
                        f"{', '.join(str(s)[:12] for s in stored)} then, {', '.join(str(s)[:12] for s in data_sha256)} now). "
                        "A resumed run continues on the pairs it started on: restore the file, or start a new run (--overwrite, "
                        "or another --output-dir).")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint, so the file holds one history."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if row.get("step", 0) <= last_step:
            rows.append(line)
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def rewind_to(output: Path, checkpoint: Path | None) -> None:
    """Before resuming: drop incomplete checkpoints newer than the resume point, and the
    metrics logged after it."""
    step = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0
    for newer_step, path in checkpoints(output):
        if newer_step > step:
            shutil.rmtree(path, ignore_errors=True)
    truncate_metrics(output / "metrics.jsonl", step)


def is_final(checkpoint: Path) -> bool:
    """The checkpoint of the last step (a run killed after it but before its outputs)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] > 0


def prune_checkpoints(output: Path, *, keep_adapters: bool) -> None:
    """Once the run has finished: optimizer state only serves --resume, so it goes. With
    ``keep_adapters`` each checkpoint keeps its adapter and trainer_state.json (a learning
    curve scores them); otherwise the checkpoints go entirely."""
    for _, path in checkpoints(output):
        if not keep_adapters:
            shutil.rmtree(path, ignore_errors=True)
            continue
        for item in path.iterdir():
            if not (item.name.startswith("adapter_") or item.name in ("trainer_state.json", "README.md")):
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
