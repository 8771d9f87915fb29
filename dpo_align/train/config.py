"""`TrainConfig`: every setting of ``dpo-align train``, with the reference experiment's defaults.

One dataclass, as TRL has one config per trainer. The CLI fills it from ``--config FILE``
(YAML) and then from the options given on the command line (which win); the fully
resolved config is written to ``OUTPUT/config.yaml`` so ``--config OUTPUT/config.yaml``
repeats the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpo_align.core.errors import UserError
from dpo_align.core.models import DEFAULT_MODEL
from dpo_align.core.settings import option_flags, setting
from dpo_align.data.pairs import DEFAULT_DATASET
from dpo_align.data.templates import DEFAULT_TEMPLATE, TEMPLATES, check_template

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# TRL 1.16's DPOTrainer loss types (its own error message lists them; pyproject pins that TRL minor)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
PAIR_SAMPLES = ("first", "random")
REPORT_TO = ("none", "tensorboard", "wandb")


def whole_or_fraction(text: str) -> int | float:
    """``100`` -> 100 steps, ``0.1`` -> a tenth of the run (transformers' convention)."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


@dataclass
class TrainConfig:
    # what to train
    model: str = setting(DEFAULT_MODEL, f"Hub id, local checkpoint directory, or the built-in {DEFAULT_MODEL!r}.", "--model", "-m")
    data: list[str] = setting(None, "Training pairs: files, directories or hub ids (repeatable). Default: Anthropic/hh-rlhf.",
                              "--data", "-d", factory=lambda: [DEFAULT_DATASET])
    split: str = setting("train", "Split to read for hub datasets.")
    max_pairs: int | None = setting(None, "Train on N usable pairs only (see --pair-sample).")
    # hh-rlhf files are concatenated subsets (harmless first), so the first N are one subset only.
    pair_sample: str = setting("first", "Which --max-pairs: the 'first' N in file order, or a 'random' sample drawn with --seed. "
                               "hh-rlhf lists its subsets one after another (harmless first), so the first N come from one subset.")
    skip_bad_rows: bool = setting(False, "Count and skip broken rows instead of stopping at the first.")
    template: str = setting(DEFAULT_TEMPLATE, f"Prompt template: {', '.join(TEMPLATES)}. alpaca is what the reference SFT model "
                            "was trained with.")
    output_dir: str = setting("runs/dpo", "Where the adapter, checkpoints, curves and manifest go.", "--output-dir", "-o")
    # held-out evaluation during training
    eval_data: list[str] = setting(None, "Held-out pairs for DPO loss, reward accuracy and margins during training (repeatable).",
                                   factory=list)
    eval_max_pairs: int | None = setting(None, "Use only the first N held-out pairs (each evaluation runs over all of them).")
    eval_steps: int = setting(50, "Evaluate on --eval-data every N optimizer steps (and at the end).")
    # DPO (Rafailov et al. 2023: sigmoid loss, beta 0.1)
    beta: float = setting(0.1, "DPO beta: strength of the KL penalty to the reference (the base model).")
    loss_type: str = setting("sigmoid", "TRL DPO loss: sigmoid (the paper's), ipo, hinge, ... (TRL's list); several, comma-separated, "
                             "are summed with --loss-weights (sigmoid,sft is DPO plus NLL on the chosen responses: RPO).")
    loss_weights: str | None = setting(None, "Weights of the --loss-type components, comma-separated, one per loss type (default: 1 each).")
    sft_first_pairs: int | None = setting(None, "Two stages, the DPO paper's recipe on hh-rlhf: first SFT on the chosen responses of N "
                                          "pairs (drawn as --max-pairs draws them), folded into the weights; then --loss-type from that "
                                          "model, with it as the reference. One folder, one adapter for the original base.")
    label_smoothing: float = setting(0.0, "Label smoothing (TRL's label_smoothing): the assumed share of flipped preference labels, "
                                     "in [0, 0.5). The robust and exo_pair losses need it above 0 (robust at 0 is exactly sigmoid).")
    # optimisation (the reference experiment: 1 epoch, lr 1e-5, cosine with warmup)
    learning_rate: float = setting(1e-5, "Peak learning rate (cosine schedule with warmup).", "--lr")
    lr_scheduler: str = setting("cosine", "Learning-rate schedule (a transformers scheduler name).")
    warmup_ratio: float = setting(0.1, "Fraction of steps for linear warmup.")
    epochs: float = setting(1.0, "Passes over the training pairs.")
    max_steps: int = setting(-1, "Stop after N optimizer steps (overrides --epochs when > 0).")
    batch_size: int = setting(4, "Pairs per device per forward pass.")
    grad_accum: int = setting(1, "Forward passes per optimizer step.")
    max_length: int = setting(512, "Max tokens of prompt + response; prompts are cut from the left first.")
    seed: int = setting(42, "Seed for data order, --pair-sample random, dropout and LoRA init.")
    precision: str = setting("auto", "auto (bf16 where the hardware has it), bf16, fp16 or fp32.")
    # LoRA
    lora_r: int = setting(16, "LoRA rank.")
    lora_alpha: int = setting(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = setting(0.05, "Dropout on the LoRA path.")
    lora_targets: str = setting("all-linear", "Modules to adapt: all-linear, or names such as q_proj,v_proj.")
    # bookkeeping
    logging_steps: int = setting(5, "Log train statistics every N steps.")
    save_steps: int | float = setting(100, "Checkpoint every N steps, or a fraction of the run's steps in (0, 1).",
                                      parse=whole_or_fraction)
    save_total_limit: int | None = setting(2, "Checkpoints kept while training (the newest); none given keeps all.")
    # optimizer state is always dropped once the run has finished, since it only serves --resume
    keep_checkpoints: bool = setting(False, "After training, keep every checkpoint's adapter (for a learning curve).")
    report_to: str = setting("none", "none, tensorboard or wandb.")
    report_generations: int = setting(3, "Default prompts answered by the base model and the adapter in report.html (0: none).")
    trust_remote_code: bool = setting(False, "Allow code shipped with a checkpoint to run.")
    allow_pickle: bool = setting(False, "Load pickle (.bin/.pt) weights through torch's weights_only loader; safetensors only otherwise.")
    # decontamination against the scoring suite
    eval_suite_data_dir: str | None = setting(None, "Scoring-suite data (like ../shared/data), to count training prompts that also "
                                              "occur there (and, in a sweep, to score).", "--data-dir")
    eval_suite_pku_path: str | None = setting(None, "Scoring-suite PKU file(s), e.g. ../shared/data/splits/heldout.jsonl.gz, for the "
                                              "same overlap check (and, in a sweep, to score).", "--pku-path")
    drop_eval_overlap: bool = setting(False, "Remove training pairs whose prompt occurs in the scoring suite.")

    def check_types(self) -> None:
        """Each setting has its field's type (a YAML value such as `learning_rate: fast` names its key)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            allowed = []
            if "None" in kind:
                allowed.append(type(None))
            if "list[str]" in kind:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                if not ok and value is not None:
                    raise UserError(f"Invalid training setting {f.name}: expected a list of strings, got {value!r}.")
                continue
            if kind.startswith("int") or kind.startswith("float"):
                allowed += [int, float] if ("float" in kind) else [int]
            elif kind.startswith("bool"):
                allowed.append(bool)
            elif kind.startswith("str"):
                allowed.append(str)
            if type(value) is bool and bool not in allowed:
                raise UserError(f"Invalid training setting {f.name}: expected {kind}, got the boolean {value!r}.")
            if allowed and not isinstance(value, tuple(allowed)):
                raise UserError(f"Invalid training setting {f.name}: expected {kind}, got {value!r} ({type(value).__name__}).")

    def validate(self) -> TrainConfig:
        self.check_types()
        finite = [k for k in ("learning_rate", "beta", "warmup_ratio", "epochs", "lora_dropout") if not math.isfinite(getattr(self, k))]
        if finite:
            raise UserError(f"Invalid training option: {', '.join(option_name(k) for k in finite)} must be a finite number "
                            f"(got {', '.join(repr(getattr(self, k)) for k in finite)}).")
        self.check_losses()
        checks = [
            (self.logging_steps >= 1, "--logging-steps must be at least 1"),
            (self.eval_steps >= 1, "--eval-steps must be at least 1"),
            (self.lora_alpha >= 1, "--lora-alpha must be at least 1"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be at least 1, or null to keep all"),
            (self.eval_max_pairs is None or self.eval_max_pairs >= 1, "--eval-max-pairs must be at least 1"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.report_to in REPORT_TO, f"--report-to must be one of {', '.join(REPORT_TO)}"),
            (self.learning_rate > 0, "--lr must be positive"),
            (self.beta > 0, "--beta must be positive"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
            (self.max_length >= 16, "--max-length must be at least 16 tokens"),
            (self.epochs > 0 or self.max_steps > 0, "give --epochs > 0 or --max-steps > 0"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_pairs is None or self.max_pairs >= 1, "--max-pairs must be at least 1"),
            (self.save_steps >= 1 if isinstance(self.save_steps, int) else 0 < self.save_steps < 1,
             "--save-steps must be a whole number of steps >= 1, or a fraction of the run in (0, 1)"),
            (self.report_generations >= 0, "--report-generations must be 0 (none) or more"),
            (self.pair_sample in PAIR_SAMPLES, f"--pair-sample must be one of {', '.join(PAIR_SAMPLES)}"),
            (bool(self.data), "give at least one --data source"),
        ]
        check_template(self.template)
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid training option: {message}.")
        if self.report_to != "none":
            import importlib.util

            module = {"tensorboard": "tensorboard", "wandb": "wandb"}[self.report_to]
            if importlib.util.find_spec(module) is None:
                raise UserError(f"--report-to {self.report_to} needs the {module} package: pip install {module} (or use --report-to none).")
        return self

    def loss_types(self) -> list[str]:
        """The loss components (``sigmoid,sft`` -> ["sigmoid", "sft"])."""
        return [part.strip() for part in self.loss_type.split(",")]

    def loss_weight_values(self) -> list[float] | None:
        """The components' weights, or None (TRL weighs each 1)."""
        return None if self.loss_weights is None else [float(part) for part in self.loss_weights.split(",")]

    def check_losses(self) -> None:
        types = self.loss_types()
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown or not all(types):
            which = "" if len(types) == 1 else f": {', '.join(repr(t) for t in unknown) or 'an empty name'}"
            raise UserError(f"Invalid training option: --loss-type {self.loss_type!r}{which} is not one of TRL's: {', '.join(LOSS_TYPES)}.")
        if len(set(types)) != len(types):
            raise UserError(f"Invalid training option: --loss-type {self.loss_type!r} names a loss twice.")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise UserError(f"Invalid training option: --label-smoothing {self.label_smoothing!r} must be in [0, 0.5).")
        if self.sft_first_pairs is not None:
            if self.sft_first_pairs < 1:
                raise UserError(f"Invalid training option: --sft-first-pairs {self.sft_first_pairs}: the first stage needs at least 1 pair "
                                "(leave the option out for one stage).")
            if types == ["sft"]:
                raise UserError("Invalid training option: --sft-first-pairs with --loss-type sft would train SFT twice: give the "
                                "second stage's preference objective (such as --loss-type sigmoid).")
        needs = [t for t in types if t in ("robust", "exo_pair")]
        if needs and self.label_smoothing == 0:
            raise UserError(f"Invalid training option: --loss-type {needs[0]} needs --label-smoothing above 0 (the share of flipped labels it "
                            "assumes; the EXO paper uses 1e-3, the robust DPO paper 0.1 to 0.4): at 0, robust trains exactly sigmoid "
                            "and exo_pair is refused by TRL.")
        if self.loss_weights is None:
            return
        try:
            weights = self.loss_weight_values()
        except ValueError:
            raise UserError(f"Invalid training option: --loss-weights {self.loss_weights!r}: expected comma-separated numbers such as 1,0.5.") from None
        if len(weights) != len(types):
            raise UserError(f"Invalid training option: --loss-weights {self.loss_weights!r} gives {len(weights)} weight(s) for "
                            f"{len(types)} loss type(s) ({self.loss_type}); give one per loss type.")
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
            raise UserError(f"Invalid training option: --loss-weights {self.loss_weights!r}: weights are finite, >= 0, and not all 0.")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str | Path) -> dict:
    """Settings from a YAML file; unknown keys are an error naming the file and the key."""
    from dpo_align.core.files import read_text

    path = Path(path)
    text = read_text(path, "--config")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({err}).") from None
    if loaded is None:
        raise UserError(f"--config {path}: the file holds no settings (it is empty or only comments). Write settings such as "
                        "`learning_rate: 1.0e-05`, or drop --config.")
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values.")
    unknown = sorted(set(loaded) - FIELDS)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(FIELDS))}.")
    for key in ("data", "eval_data"):
        if isinstance(loaded.get(key), str):
            loaded[key] = [loaded[key]]
    for f in dataclasses.fields(TrainConfig):  # YAML 1.1 reads 1e-5 (no dot) as a string; it is the number the user meant
        value = loaded.get(f.name)
        if "float" in str(f.type) and isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            loaded[f.name] = float(value)
    for key in ("loss_type", "loss_weights"):  # a YAML list of components: the comma string the option takes
        if isinstance(loaded.get(key), list):
            loaded[key] = ",".join(str(v) for v in loaded[key])
        elif key == "loss_weights" and isinstance(loaded.get(key), int | float) and not isinstance(loaded.get(key), bool):
            loaded[key] = str(loaded[key])
    return loaded


def build_config(file_settings: dict, cli_settings: dict) -> TrainConfig:
    """Defaults, then the config file, then options given on the command line."""
    try:
        return TrainConfig(**{**file_settings, **cli_settings}).validate()
    except TypeError as err:
        raise UserError(f"Invalid training settings: {err}.") from None


def resolve_settings(config_file: str | Path | None, given: dict, *, resume: bool = False) -> TrainConfig:
    """The settings of a run: defaults < ``--config`` file < options given on the command line.

    ``resume`` takes the run's own config.yaml, and an option given now that changes what the run
    computes is refused, naming it (a resumed run continues exactly as it started). The rule is
    ``settings_diff``'s, the one the sweep and the checkpoint check use too."""
    file_settings = load_config_file(config_file) if config_file else {}
    if resume:
        output_dir = given.get("output_dir", file_settings.get("output_dir", TrainConfig.output_dir))
        saved_path = Path(output_dir) / "config.yaml"
        if saved_path.is_file():
            saved = load_config_file(saved_path)
            wanted = build_config(saved, {**file_settings, **given})
            changed = settings_diff(saved, wanted)
            if changed:
                raise UserError(
                    f"--resume continues the run exactly as configured in {saved_path}; these options differ from it: "
                    f"{', '.join(option_name(c) for c in changed)}. Drop them, or start a new run with --overwrite."
                )
            return wanted
    return build_config(file_settings, given)


def option_name(key: str) -> str:
    """The command-line option of a setting (``learning_rate`` -> ``--lr``)."""
    return option_flags(next(f for f in dataclasses.fields(TrainConfig) if f.name == key))[0]


# Settings that do not change what a run computes, so a resume may differ in them.
NOT_COMPARED = ("output_dir", "report_to", "report_generations")


def settings_diff(saved: dict, wanted: TrainConfig) -> list[str]:
    """Keys whose saved value (a run's config.yaml) differs from ``wanted``.

    A key missing from the saved file (a setting added in a later version) counts as its
    default, so an older run is not refused for a setting it could not have had.
    """
    defaults = dataclasses.asdict(TrainConfig())
    current = dataclasses.asdict(wanted)
    return sorted(k for k in current if k not in NOT_COMPARED and _located(k, saved.get(k, defaults[k])) != _located(k, current[k]))


# Settings naming local files or folders: ../data/x and /home/me/data/x are the same setting when they are the same file.
PATH_SETTINGS = ("model", "data", "eval_data", "eval_suite_data_dir", "eval_suite_pku_path")


def _located(key: str, value):
    """A path setting with each existing local path made absolute (hub ids and missing paths as written)."""
    from dpo_align.core.files import located

    return located(value) if key in PATH_SETTINGS else value


def check_resumable(run_dir: Path, wanted: TrainConfig, *, how_to_fix: str) -> None:
    """Refuse to continue the run in ``run_dir`` under settings other than those it started with."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return
    changed = settings_diff(load_config_file(saved_path), wanted)
    if changed:
        saved = load_config_file(saved_path)
        current = dataclasses.asdict(wanted)
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current[k]!r} now" for k in changed)
        raise UserError(f"{run_dir} holds a run made with other settings ({detail}). It is not reused or continued under "
                        f"new settings: {how_to_fix}")
