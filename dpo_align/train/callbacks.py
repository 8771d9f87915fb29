"""Trainer callbacks: metrics to a file, a pairs/s progress bar, Ctrl-C, and checkpoint markers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from dpo_align.train.run_folder import COMPLETE_MARKER, SETTINGS_FILE


class MetricsFile(TrainerCallback):
    """Append every logged dict (train and eval) to ``metrics.jsonl`` with its step."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class PairsProgress(TrainerCallback):
    """A progress bar counted in preference pairs (rate in pairs/s, ETA), with the last loss."""

    def __init__(self, pairs_per_step: int, desc: str = "DPO"):
        self.pairs_per_step, self.desc = pairs_per_step, desc  # desc: the objective, so an SFT run does not read "DPO"
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            total = state.max_steps * self.pairs_per_step
            self.bar = tqdm(total=total, initial=state.global_step * self.pairs_per_step, unit="pair",
                            desc=self.desc, dynamic_ncols=True, smoothing=0.1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.pairs_per_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: logs[k] for k in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies") if k in logs}
            if shown:
                self.bar.set_postfix({k.replace("rewards/", ""): f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the current step, save a checkpoint, stop.
    A second Ctrl-C interrupts at once (the last complete checkpoint stays usable)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nInterrupted: saving a checkpoint after this step (press Ctrl-C again to stop at once).")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class CheckpointMarker(TrainerCallback):
    """Mark a checkpoint complete after the Trainer has written all of it.

    A crash (even SIGKILL) while a checkpoint is being written leaves it without the
    marker; `latest_checkpoint` then skips it and resuming uses the previous one.
    """

    def __init__(self, settings: dict | None = None):
        self.settings = settings  # the run's settings, stored with each checkpoint (a resume must match them)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            if self.settings is not None:
                (checkpoint / SETTINGS_FILE).write_text(json.dumps(self.settings, sort_keys=True, default=str))
            marker = checkpoint / COMPLETE_MARKER
            with open(marker, "w") as f:
                f.write(str(state.global_step))
                f.flush()
                os.fsync(f.fileno())
