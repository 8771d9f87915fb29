"""The search space: a YAML file of ``TrainConfig`` settings, each a range or a list of choices.

    learning_rate: {low: 1.0e-5, high: 5.0e-4, log: true}   # a float range (log-uniform)
    beta: {low: 0.01, high: 1.0, log: true}
    lora_r: {low: 8, high: 32, step: 8}                      # an int range (the setting is an int)
    loss_type: [sigmoid, sft, sigmoid+sft, apo_zero, ipo]    # choices; "+" joins a list value, as in --grid
    recipe:                                                  # choices that set several settings at once
      - {loss_type: sigmoid}
      - {loss_type: sigmoid+sft, loss_weights: 1+0.5}

A key that is not a setting is the name of a choice of several settings (``recipe`` above): each of its
choices is a mapping of settings. Every value is checked before the first trial: each choice, and each
range's two ends, must make a ``TrainConfig`` that validates (TRL's loss types, the weights' count...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import read_text
from dpo_align.grid import NOT_GRIDDED, _value
from dpo_align.train.config import TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_GRIDDED}
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a range (``low``/``high``) or choices (``labels``, each a dict of settings)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    labels: tuple[str, ...] = ()
    choices: tuple[dict, ...] = ()  # the settings each label stands for

    def settings(self, value) -> dict:
        """The TrainConfig settings a sampled value stands for."""
        if self.labels:
            return dict(self.choices[self.labels.index(value)])
        return {self.name: int(value) if self.integer else float(value)}

    def suggest(self, trial):
        """The value Optuna samples for this dimension."""
        if self.labels:
            return trial.suggest_categorical(self.name, list(self.labels))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid_values(self, points: int) -> list:
        """The values ``--sampler grid`` walks: every choice, or ``points`` values spread over the range (log-spaced for a
        log range), rounded to the step."""
        if self.labels:
            return list(self.labels)
        if points == 1:
            values = [self.low]
        elif self.log:
            values = [math.exp(math.log(self.low) + i * (math.log(self.high) - math.log(self.low)) / (points - 1)) for i in range(points)]
        else:
            values = [self.low + i * (self.high - self.low) / (points - 1) for i in range(points)]
        if self.integer:
            return sorted({int(round(v)) for v in values})
        return [float(f"{v:.3g}") for v in values]


def _setting_value(name: str, value, where: str):
    """A YAML value of setting ``name`` as TrainConfig holds it ("+" lists joined as --grid joins them)."""
    if name not in FIELDS:
        raise UserError(f"{where}: {name!r} is not a training setting. Known: {', '.join(FIELDS)}.")
    if isinstance(value, str):
        field = FIELDS[name]
        return _value(name, value, typing.get_type_hints(TrainConfig)[name], field.metadata.get("parse"))
    if name in ("loss_type", "loss_weights") and isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _choice_label(settings: dict) -> str:
    return ";".join(f"{k}={str(v).replace(',', '+')}" for k, v in settings.items())


def _parse_one(name: str, spec, where: str) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: {name} lists no choices.")
        labels, choices = [], []
        for i, item in enumerate(spec, start=1):
            if isinstance(item, dict):
                settings = {key: _setting_value(key, value, f"{where}: {name} choice {i}") for key, value in item.items()}
                if not settings:
                    raise UserError(f"{where}: {name} choice {i} is empty.")
                label = _choice_label(settings)
            else:
                if name not in FIELDS:
                    raise UserError(f"{where}: {name!r} is not a training setting (known: {', '.join(FIELDS)}); a choice of several "
                                    "settings lists mappings, such as - {loss_type: sigmoid+sft, loss_weights: 1+1}.")
                if not isinstance(item, str | int | float | bool) or item is None:
                    raise UserError(f"{where}: {name} choice {i} is {item!r}; give a value such as those of --grid.")
                settings = {name: _setting_value(name, item if isinstance(item, str) else item, f"{where}: {name} choice {i}")}
                label = str(item)
            if label in labels:
                raise UserError(f"{where}: {name} lists {label!r} twice.")
            labels.append(label)
            choices.append(settings)
        return Param(name, labels=tuple(labels), choices=tuple(choices))
    if isinstance(spec, dict):
        if name not in FIELDS:
            raise UserError(f"{where}: {name!r} is not a training setting. Known: {', '.join(FIELDS)}.")
        unknown = set(spec) - RANGE_KEYS
        if unknown or not {"low", "high"} <= set(spec):
            raise UserError(f"{where}: {name} is a range, written {{low: A, high: B, log: true|false, step: S}}"
                            + (f"; {', '.join(sorted(map(str, unknown)))} is not one of its keys." if unknown else "; low and high are needed."))
        kind = str(FIELDS[name].type)
        integer = kind.startswith("int") and "float" not in kind
        if not (kind.startswith("int") or kind.startswith("float")):
            raise UserError(f"{where}: {name} is a {kind} setting; a range needs a number setting. List its choices instead.")
        low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is None and key == "step":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{where}: {name}.{key} is {value!r}; it must be a finite number (YAML reads 1e-5 as text: write 1.0e-5).")
            if integer and value != int(value):
                raise UserError(f"{where}: {name} is a whole-number setting; {name}.{key} {value!r} is not whole.")
        if not isinstance(log, bool):
            raise UserError(f"{where}: {name}.log is {log!r}; write true or false.")
        if low >= high:
            raise UserError(f"{where}: {name} has low {low} >= high {high}; the range must have low < high.")
        if log and low <= 0:
            raise UserError(f"{where}: {name} is a log range from {low}; a log range needs low > 0.")
        if log and step is not None:
            raise UserError(f"{where}: {name} is a log range with a step; Optuna takes one or the other.")
        if step is not None and step <= 0:
            raise UserError(f"{where}: {name}.step {step} must be > 0.")
        return Param(name, low=float(low), high=float(high), log=log, step=None if step is None else float(step), integer=integer)
    raise UserError(f"{where}: {name} is {spec!r}; write a range {{low: A, high: B, log: true}} or a list of choices [A, B].")


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    source: str

    def suggest(self, trial) -> dict:
        """The settings of one trial, sampled by Optuna (each dimension under its own name)."""
        settings = {}
        for param in self.params:
            settings.update(param.settings(param.suggest(trial)))
        return settings

    def settings_of(self, params: dict) -> dict:
        """The settings a finished trial's params stand for."""
        settings = {}
        for param in self.params:
            if param.name in params:
                settings.update(param.settings(params[param.name]))
        return settings

    def as_json(self) -> str:
        """Canonical text of the space, stored in the study: a study joined with another space is refused."""
        return json.dumps([dataclasses.asdict(p) for p in self.params], sort_keys=True)

    def grid(self, points: int) -> dict[str, list]:
        return {p.name: p.grid_values(points) for p in self.params}

    def check(self, base: TrainConfig) -> None:
        """Every choice, and each range's ends, validated as a TrainConfig before any training."""
        from dpo_align.grid import check_scorable

        check_scorable({key for param in self.params for choice in (param.choices or ({param.name: None},)) for key in choice},
                       f"{self.source}:")
        corners = []
        for param in self.params:
            if param.labels:
                corners += [(f"{param.name}={label}", settings) for label, settings in zip(param.labels, param.choices, strict=True)]
            else:
                corners += [(f"{param.name}={value}", param.settings(value)) for value in (param.low, param.high)]
        seen = {}
        for where, settings in corners:
            for key in settings:
                if key in seen and seen[key] != where.split("=")[0]:
                    raise UserError(f"{self.source}: {key} is set by both {seen[key]} and {where.split('=')[0]}; set each setting in one place.")
                seen.setdefault(key, where.split("=")[0])
            try:
                dataclasses.replace(base, **settings).validate()
            except UserError as err:
                raise UserError(f"{self.source}: {where}: {err}") from None


def load_space(path: Path) -> Space:
    import yaml

    text = read_text(path, "a search space")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err}).") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: a search space is a YAML mapping of settings, such as\n"
                        "    learning_rate: {low: 1.0e-5, high: 5.0e-4, log: true}\n    loss_type: [sigmoid, sft]")
    return Space(tuple(_parse_one(str(name), spec, str(path)) for name, spec in raw.items()), str(path))
