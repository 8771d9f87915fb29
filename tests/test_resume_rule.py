"""One resume rule: `train --resume`, the checkpoint check and the sweep refuse and allow the same settings."""

import dataclasses

import pytest

from dpo_align.core.errors import UserError
from dpo_align.train.config import TrainConfig, check_resumable, resolve_settings


def saved_run(tmp_path) -> TrainConfig:
    config = TrainConfig(data=["pairs.jsonl"], output_dir=str(tmp_path / "run")).validate()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config.to_yaml())
    return config


def test_a_setting_that_computes_nothing_may_differ_on_resume_in_every_path(tmp_path):
    saved = saved_run(tmp_path)
    assert saved.report_generations != 0
    resumed = resolve_settings(None, {"output_dir": saved.output_dir, "report_generations": 0}, resume=True)
    assert resumed.report_generations == 0 and resumed.learning_rate == saved.learning_rate
    check_resumable(tmp_path / "run", resumed, how_to_fix="")  # the sweep's check agrees


def test_a_setting_that_changes_the_run_is_refused_by_every_path(tmp_path):
    saved = saved_run(tmp_path)
    with pytest.raises(UserError, match="--lr"):
        resolve_settings(None, {"output_dir": saved.output_dir, "learning_rate": 1e-3}, resume=True)
    with pytest.raises(UserError, match="learning_rate"):
        check_resumable(tmp_path / "run", dataclasses.replace(saved, learning_rate=1e-3), how_to_fix="")
