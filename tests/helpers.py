"""Builders shared by the test files (no test file imports another): transcripts, LoRA adapters, training
settings and a run killed before its outputs. Fixtures stay in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_align.train.config import TrainConfig


def hh(q: str, a: str) -> str:
    """One hh-rlhf exchange: a Human turn and the Assistant's answer."""
    return transcript([q, a])


def transcript(turns: list[str]) -> str:
    """An hh-rlhf transcript of alternating turns, Human first."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def lora_adapter(base, directory=None, *, init_lora_weights=False, seed: int | None = 0, b_scale: float | None = None):
    """A LoRA adapter (r 4, every linear layer) on ``base``, saved to ``directory`` when given; returns the PEFT model.

    ``init_lora_weights=False`` draws A and B at random (a model that scores differently from its base) and
    True gives PEFT's zero B; ``b_scale`` then redraws every B as N(0, b_scale^2) from ``seed``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init_lora_weights, task_type="CAUSAL_LM"))
    if b_scale is not None:
        generator = torch.Generator().manual_seed(seed or 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * b_scale
    if directory is not None:
        model.save_pretrained(directory)
    return model


def noisy_adapter(base, directory) -> Path:
    """A LoRA adapter with random A and B, saved: a model that scores differently from its base."""
    lora_adapter(base, directory)
    return directory


def with_chat_template(model, directory: Path) -> Path:
    """A copy of ``model`` whose tokenizer has a small chat template (for --apply_chat_template)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(model, data, out, **overrides) -> TrainConfig:
    settings = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=6, batch_size=4, max_length=96,
                    logging_steps=1, save_steps=2, precision="fp32", learning_rate=5e-3, warmup_ratio=0.0,
                    report_generations=0)  # generation is tested in test_report.py
    settings.update(overrides)
    return TrainConfig(**settings).validate()


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def killed_before_outputs(monkeypatch, config: TrainConfig, message: str = "killed") -> None:
    """Train ``config`` and die after the last step, before the outputs are written (a SIGKILL's state)."""
    from dpo_align.train import run as train_module

    def killed(*args, **kwargs):
        raise SystemExit(message)

    monkeypatch.setattr(train_module, "_write_outputs", killed)
    with pytest.raises(SystemExit):
        train_module.train(config, progress=lambda m: None)
    monkeypatch.undo()
