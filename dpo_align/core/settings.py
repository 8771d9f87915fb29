"""A setting is a dataclass field that carries its command-line help (``TrainConfig``,
``ScoreOptions``): ``dpo_align/options.py`` turns such fields into the options of the commands, so a
setting's name, default and help are written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


def setting(default, help: str, *flags: str, factory=None, parse=None):
    """A settings field with its command-line help: the one place a setting is described.

    ``flags`` are the option names where they are not ``--field-name``; ``parse`` turns the
    command-line text into the value when Typer has no type for it (``int | float``); a
    ``factory`` (for lists) replaces ``default``."""
    metadata = {"help": help, "flags": flags, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The command-line names of a setting: its own flags, else ``--field-name``."""
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
