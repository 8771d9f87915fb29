"""``TrainConfig``'s fields as Typer options: `train` and `sweep` take their settings from here.

A setting is defined once, as a field with its help text (dpo_align/train/config.py); this
module turns each field into a command-line option of the same name, so the two commands,
the YAML config file and the dataclass cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Annotated

import typer

from dpo_align.train.config import TrainConfig, option_flags


def _option(f: dataclasses.Field, kind) -> tuple[object, object]:
    """(annotation, default) of the Typer option for one field."""
    extra = {"parser": f.metadata["parse"]} if f.metadata.get("parse") else {}
    info = typer.Option(*option_flags(f), help=f.metadata.get("help", ""), **extra)
    if f.default_factory is not dataclasses.MISSING:  # lists: None means "not given"
        return Annotated[list[str] | None, info], None
    if extra:
        return Annotated[float, info], f.default
    return Annotated[kind, info], f.default


def with_settings(*, exclude: tuple[str, ...] = ()):
    """Add every TrainConfig field not in ``exclude`` to a command as an option.

    The command reads them with :func:`given_settings` (only those typed on the command
    line), so it never lists them itself."""
    hints = typing.get_type_hints(TrainConfig)
    generated = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        annotation, default = _option(f, hints[f.name])
        generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

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


def given_settings(ctx: typer.Context) -> dict:
    """The TrainConfig settings typed on the command line (they override --config, and
    must agree with the run's own config on --resume); defaults are left out."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {}
    for name, value in ctx.params.items():
        if name not in fields:
            continue
        source = ctx.get_parameter_source(name)
        # compared by name: Typer ships its own copy of click's ParameterSource enum
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP") and value not in ([], None):
            given[name] = list(value) if isinstance(value, tuple) else value
    return given
