"""Settings dataclasses as Typer options: a setting is defined once, as a field with its help text.

``TrainConfig``'s fields (dpo_align/train/config.py) are the options of `train` and `sweep`;
``ScoreOptions``' (dpo_align/score/evaluate.py) those of `eval`, `generate`, `merge`, `data inspect`
and the sweep's scoring. This module turns each field into a command-line option of the same name,
so the commands, the YAML config file and the dataclasses cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Annotated

import typer

from dpo_align.core.settings import option_flags
from dpo_align.train.config import TrainConfig


def _option(f: dataclasses.Field, kind, flags: tuple[str, ...]) -> tuple[object, object]:
    """(annotation, default) of the Typer option for one field."""
    extra = {"parser": f.metadata["parse"]} if f.metadata.get("parse") else {}
    info = typer.Option(*flags, help=f.metadata.get("help", ""), **extra)
    if f.default_factory is not dataclasses.MISSING:  # lists: None means "not given"
        return Annotated[list[str] | None, info], None
    if extra:
        return Annotated[float, info], f.default
    return Annotated[kind, info], f.default


def _fields(cls, include, exclude):
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in exclude and (include is None or f.name in include)]


def with_settings(cls=TrainConfig, *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (), prefix: str = ""):
    """Add the fields of ``cls`` (those in ``include``, not in ``exclude``) to a command as options.

    ``prefix`` names them apart from another dataclass's fields of the same name (the sweep's
    ``--eval-batch-size`` beside the training ``--batch-size``). The command reads them with
    :func:`given_settings` or :func:`settings_of`, so it never lists them itself."""
    hints = typing.get_type_hints(cls)
    generated = []
    for f in _fields(cls, include, exclude):
        flags = ("--" + (prefix + f.name).replace("_", "-"),) if prefix else option_flags(f)
        annotation, default = _option(f, hints[f.name], flags)
        generated.append(inspect.Parameter(prefix + f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

    def decorate(fn):
        own = inspect.signature(fn, eval_str=True)
        own_names = set(own.parameters)
        clash = own_names & {p.name for p in generated}
        if clash:
            raise TypeError(f"{fn.__name__} defines {clash} itself; exclude them from with_settings")

        @functools.wraps(fn)
        def wrapper(**kwargs):
            return fn(**{k: v for k, v in kwargs.items() if k in own_names})

        # the command's own parameters first (ctx, arguments), then the settings, then its keyword-only options
        keyword = inspect.Parameter.KEYWORD_ONLY
        head = [p.replace(kind=keyword) for p in own.parameters.values() if p.kind is not keyword]
        tail = [p for p in own.parameters.values() if p.kind is keyword]
        params = head + generated + tail
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the generated signature, not fn's
        return wrapper

    return decorate


def given_settings(ctx: typer.Context, cls=TrainConfig, prefix: str = "") -> dict:
    """The settings of ``cls`` typed on the command line (they override --config, and must agree
    with the run's own config on --resume); defaults are left out."""
    given = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if name not in ctx.params:
            continue
        value = ctx.params[name]
        source = ctx.get_parameter_source(name)
        # compared by name: Typer ships its own copy of click's ParameterSource enum
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP") and value not in ([], None):
            given[f.name] = list(value) if isinstance(value, tuple) else value
    return given


def settings_of(ctx: typer.Context, cls, prefix: str = "") -> dict:
    """Every generated setting of ``cls`` as the command received it, defaults included."""
    return {f.name: ctx.params[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in ctx.params}
