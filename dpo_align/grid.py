"""The sweep's grid: which settings each run takes, and the name of its folder.

``--grid NAME=V1,V2,...`` (repeatable) spans any ``TrainConfig`` setting; the runs are every
combination, in the order given. Commas separate grid points; ``+`` joins the items of one
value that is itself a list: ``--grid loss_type=sigmoid,ipo,sigmoid+sft --grid
loss_weights=1+1``. ``--lr 5e-6,1e-5`` is the shortcut for ``--grid learning_rate=5e-6,1e-5``.

A run is named by the settings that differ between runs (``lr-1e-05``, ``loss_type-sigmoid+sft``,
``beta-0.5_lr-0.0001``), so a sweep over learning rates keeps the folder names it always had; every
cached result stays keyed on a hash of its weights and settings, not on the name.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing

from dpo_align.core.errors import UserError
from dpo_align.train.config import TrainConfig

SHORT = {"learning_rate": "lr"}  # names runs have always had
NOT_GRIDDED = ("output_dir",)  # where a run goes is the grid's to decide


def _value(name: str, text: str, kind, parse=None) -> object:
    """One grid value of setting ``name``, typed as its field is (``parse``: the field's own command-line parser)."""
    kind_text = str(kind)
    try:
        if name in ("loss_type", "loss_weights"):  # lists written with "+", stored as TrainConfig's comma string
            return ",".join(part.strip() for part in text.split("+"))
        if "list[str]" in kind_text:
            return [part for part in text.split("+") if part]
        if "None" in kind_text and text.lower() == "none":
            return None
        if parse is not None:
            return parse(text)
        base = kind_text.split("|")[0].strip()
        if base == "bool" or kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if base == "int" or kind is int:
            return int(text)
        if base == "float" or kind is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        return text
    except ValueError:
        raise UserError(f"--grid {name}={text}: {text!r} is not a value of {name} ({kind_text}).") from None


def parse_grid(items: list[str], *, lr: str | None = None) -> dict[str, list]:
    """{setting: [values]} from ``--grid NAME=V1,V2`` items (and ``--lr``), checked before anything trains."""
    hints = typing.get_type_hints(TrainConfig)
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_GRIDDED]
    aliases = {short: name for name, short in SHORT.items()}
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = aliases.get(name.strip(), name.strip().replace("-", "_"))
        if not sep or not values.strip():
            raise UserError(f"--grid {item!r}: write NAME=V1,V2,... (for example --grid beta=0.1,0.5).")
        if name not in fields:
            raise UserError(f"--grid {item!r}: {name!r} is not a training setting. Known: {', '.join(fields)}.")
        if name in grid:
            raise UserError(f"--grid {name} is given twice; list all its values in one --grid {name}=V1,V2,...")
        parse = next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata.get("parse")
        parsed = [_value(name, text.strip(), hints[name], parse) for text in values.split(",") if text.strip()]
        if len({repr(v) for v in parsed}) != len(parsed):
            raise UserError(f"--grid {item!r}: a value is listed twice (a duplicate grid point).")
        grid[name] = parsed
    if lr is not None:
        if "learning_rate" in grid:
            raise UserError("--lr and --grid learning_rate=... both give learning rates; give one of them.")
        grid = {"learning_rate": parse_lrs(lr), **grid}
    if not grid:
        raise UserError("The sweep has nothing to vary: give --lr RATES or --grid NAME=V1,V2,...")
    check_scorable(grid, "--grid")
    return grid


# Settings the scoring follows for every model alike (one base model to compare against, one template and length for
# the requests): a grid over them would score a run otherwise than it was trained.
SCORED_ALIKE = {"model": "every run is compared with one base model, the one the others start from",
                "template": "every model is scored with one template, so that all see the same requests",
                "max_length": "the held-out pairs are cut to one length for every model"}


def check_scorable(names, option: str) -> None:
    """Refuse, before any training, a setting that would make a run scored otherwise than it was trained."""
    for name in names:
        if name in SCORED_ALIKE:
            raise UserError(f"{option} {name}: {SCORED_ALIKE[name]}, so runs that differ in {name} cannot share a table. "
                            f"Run one sweep (or search) per {name}, each with its own --output, and compare them with `dpo-align compare`.")


def parse_lrs(text: str) -> list[float]:
    """``--lr 5e-6,1e-5``: positive, finite, distinct learning rates."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--lr {text!r}: expected comma-separated numbers such as 5e-6,1e-5,1e-4.") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise UserError(f"--lr {text!r}: give positive, finite learning rates (such as 5e-6,1e-5,1e-4).")
    if len(set(values)) != len(values):
        raise UserError(f"--lr {text!r}: a learning rate is listed twice.")
    return values


def points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the first setting varying slowest."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(value)
    return str(value).replace(",", "+")


def run_names(grid: dict[str, list]) -> list[str]:
    """A folder name per point: the settings that differ between runs (all of them for a single run)."""
    varied = [name for name, values in grid.items() if len(values) > 1] or list(grid)
    return [folder_name("_".join(f"{SHORT.get(name, name)}-{_shown(point[name])}" for name in sorted(varied, key=_order)))
            for point in points(grid)]


def folder_name(text: str) -> str:
    """A run name as a folder name: letters, digits and ``._+-`` kept (``lr-1e+30``, ``loss_type-sigmoid+sft``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "run"


def _order(name: str) -> tuple:
    """Names list their settings alphabetically, learning rate last (lr-... stays a suffix it always was)."""
    return (name == "learning_rate", name)


# --------------------------------------------------------------------------- what a run is called in tables

# the objectives by the names their papers use (TRL's loss_type on the left)
OBJECTIVES = {"sigmoid": "DPO", "sft": "SFT", "ipo": "IPO", "hinge": "SLiC (hinge)", "apo_zero": "APO-zero", "apo_down": "APO-down",
              "sigmoid_norm": "DPO (length-normalised)", "robust": "robust DPO", "exo_pair": "EXO", "nca_pair": "NCA",
              "bco_pair": "BCO", "sppo_hard": "SPPO (hard)", "aot": "AOT", "aot_unpaired": "AOT (unpaired)", "discopop": "DiscoPOP"}
OBJECTIVE_SETTINGS = ("loss_type", "loss_weights", "sft_first_pairs")


def cache_label(run: str) -> str:
    """The label a sweep run's cached results are filed and keyed under (every sweep's label before recipe labels)."""
    return f"DPO {run}"


def objective_name(config: TrainConfig) -> str:
    """``SFT``, ``RPO``, ``IPO``, ``SFT → DPO``...: the recipe's objective as a reader knows it."""
    types, weights = config.loss_types(), config.loss_weight_values()
    if types == ["sigmoid", "sft"]:
        name = "RPO" if weights in (None, [1.0, 1.0]) else f"RPO ({'+'.join(f'{w:g}' for w in weights)})"
    else:
        name = " + ".join(OBJECTIVES.get(t, t) for t in types)
        if weights is not None and len(types) > 1:
            name += f" ({'+'.join(f'{w:g}' for w in weights)})"
    return f"SFT → {name}" if config.sft_first_pairs else name


def trial_recipe(settings: dict, base: TrainConfig) -> str:
    """A trial's recipe as a reader knows it (``DPO``, ``SFT → DPO``, ``RPO``), from its settings over the study's."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unexpanded = [str(v) for k, v in settings.items() if k not in known]
    if unexpanded:  # a trial still waiting holds its raw choice ("loss_type=sft"), expanded only when a worker takes it
        return "; ".join(unexpanded)
    return objective_name(dataclasses.replace(base, **settings))


def recipe_labels(configs: dict[str, TrainConfig], grid: dict[str, list]) -> dict[str, str]:
    """{run name: the label tables, plots and the report show}: the objective's name, then the other settings the grid
    varies (``DPO lr 5e-06``, ``SFT``, ``RPO``, ``SFT → DPO``). Caches stay keyed on the run name (``cache_label``), so
    results made before these labels are reused. Where two runs would read alike, the run name is shown instead."""
    varied = [name for name, values in grid.items() if len(values) > 1 and name not in OBJECTIVE_SETTINGS]
    labels = {}
    for run, config in configs.items():
        parts = [objective_name(config)] + [f"{SHORT.get(name, name)} {_shown(getattr(config, name))}" for name in sorted(varied, key=_order)]
        labels[run] = " ".join(parts)
    if len(set(labels.values())) < len(labels):
        return {run: cache_label(run) for run in configs}
    return labels


def sweep_recipe_labels(folder, settings: dict) -> dict[str, str]:
    """{label: recipe label} for a sweep written before runs were labelled by recipe ("DPO loss_type-sft" -> "SFT"), from
    its records (``manifests/NAME.yaml``) and its grid; {} for anything else, or where a record cannot be read."""
    from pathlib import Path

    from dpo_align.train.config import load_config_file

    grid = settings.get("grid")
    if settings.get("command") != "dpo-align sweep" or not isinstance(grid, dict):
        return {}
    configs = {}
    for path in sorted((Path(folder) / "manifests").glob("*.yaml")):
        try:
            configs[path.stem] = TrainConfig(**load_config_file(path))
        except (UserError, TypeError, ValueError):
            return {}
    return {cache_label(name): label for name, label in recipe_labels(configs, grid).items()} if configs else {}
