"""One trial of a search: train the settings Optuna drew, score them on the study's fixed subset, and return the value.

The value minimised is the mean's **specific change** against the base model, ``Δlog ce − Δlog ce_foil`` over the
study's fixed documents (the same for every trial and the baseline, each with its foils: the dpo_contrast tasks, which
carry the reference's and the foils' NLL, so the subset is scored once per model). Below 0: the reference answers got
cheaper than their wrong answers did. The training loss and the reward accuracy are not the objective: our studies
show both can move while nothing real improves.

Q2 and Q3 of the scorecard (held-out implicit-reward accuracy above 50% by 2 stderr; the chosen log-prob per token
held) are Optuna constraints (<= 0 is met), on ``--search-pairs`` fixed held-out pairs. TPE prefers trials that meet
them; the study's pick is the scorecard's rule over the finished trials (``report.py``).

Pruning: with ``prune_every`` (a fraction of the run's steps) each checkpoint is scored on the same subset and its
specific change reported to Optuna at its step; a trial the pruner stops has its run folder removed, its values kept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from dpo_align.core.errors import TrainingDiverged, UserError
from dpo_align.core.files import atomic_write_json
from dpo_align.core.folder_lock import waiting_for
from dpo_align.data.suite import CONTRAST, DATASETS
from dpo_align.report import controls, scorecard
from dpo_align.result_cache import cached, inputs_of, key_of
from dpo_align.score.evaluate import ModelSpec, ScoreOptions, score_spec
from dpo_align.train.config import TrainConfig

BASELINE = "baseline"
REPLICATES = 2_000  # bootstrap and permutation draws per comparison: enough for a 95% interval on a few hundred documents


@dataclass
class Subset:
    """The study's fixed scoring subset, and the base model's numbers on it (scored once, shared by every worker)."""

    documents: dict[str, list[int]]  # {contrast task: doc indices}
    options: ScoreOptions
    baseline: dict  # the base model's score_spec result on the subset
    pairs: object | None = None  # (tokenized held-out pairs, pad id) or None
    baseline_logps: dict | None = None


def draw_documents(per_dataset: int, data_dir: str | None, pku_path: str | None, seed: int) -> dict[str, list[int]]:
    """``per_dataset`` document indices of each contrast task, drawn once with the study's seed (all when fewer)."""
    from dpo_align.data.suite_docs import load_docs
    from dpo_align.score.learning_curve import subset

    counts = {CONTRAST.tasks[name]: len(load_docs(name, data_dir=data_dir, pku_path=pku_path, foils=True)) for name in DATASETS}
    return subset(counts, per_dataset, seed)


def prepare(base: TrainConfig, model_path: str, *, output: Path, per_dataset: int, search_pairs: int, preference_data: list[str] | None,
            score_options: ScoreOptions, progress) -> Subset:
    """Draw the subset and score the base model on it (and its held-out log-probs), cached in ``output/baseline``."""
    data_dir, pku_path = base.eval_suite_data_dir, base.eval_suite_pku_path
    documents = draw_documents(per_dataset, data_dir, pku_path, base.seed)
    options = dataclasses.replace(score_options, tasks=tuple(CONTRAST.tasks.values()), samples=documents, limit=None, controls=True,
                                  data_dir=data_dir, pku_path=pku_path, template=base.template)
    spec = ModelSpec(BASELINE, model_path)
    with waiting_for(output / "baseline" / ".lock"):  # the first worker scores the base model, the others read it
        baseline = cached(output / "baseline" / "scores.json.gz", key_of(spec, options), progress,
                          f"[baseline] the base model on {sum(map(len, documents.values()))} documents", "already scored, kept",
                          lambda: score_spec(spec, options), inputs=inputs_of(options))
        pairs = logps = None
        if preference_data and search_pairs:
            pairs = held_out(base, model_path, preference_data, search_pairs)
            logps = cached(output / "baseline" / "logps.json", _pairs_key(spec, base, preference_data, search_pairs), progress,
                           f"[baseline] the base model on {search_pairs} held-out pairs", "already computed, kept",
                           lambda: pair_logps(spec, base, pairs), inputs=inputs_of({"sources": preference_data}))
    return Subset(documents, options, baseline, pairs, logps)


def held_out(base: TrainConfig, model_path: str, sources: list[str], count: int):
    """The first ``count`` held-out pairs of a fixed shuffle (the study's seed), tokenized as training tokenizes them."""
    import random

    from dpo_align.score.preference import load_for

    dataset, pad, report = load_for(model_path, sources, template=base.template, max_length=base.max_length,
                                    trust_remote_code=base.trust_remote_code)
    if len(dataset) < count:
        raise UserError(f"--search-pairs {count}: {', '.join(sources)} holds {len(dataset)} usable pairs; ask for at most that many.")
    chosen = sorted(random.Random(base.seed).sample(range(len(dataset)), count))
    return dataset.select(chosen), pad


def _pairs_key(spec: ModelSpec, base: TrainConfig, sources: list[str], count: int) -> str:
    return key_of(spec, {"sources": sources, "template": base.template, "max_length": base.max_length, "pairs": count, "seed": base.seed})


def pair_logps(spec: ModelSpec, base: TrainConfig, pairs) -> dict:
    from dpo_align.score.preference import model_logps

    dataset, pad = pairs
    values = model_logps(spec.pretrained, spec.peft, dataset, pad_token_id=pad, max_length=base.max_length, label=spec.label,
                         trust_remote_code=base.trust_remote_code, allow_pickle=base.allow_pickle)
    return {"label": spec.label, "logps": {k: v.tolist() for k, v in values.items()}}


def contrast_rows(result: dict) -> dict[str, list[dict]]:
    return {task: result["documents"][task] for task in CONTRAST.tasks.values() if task in result["documents"]}


def controlled_change(subset: Subset, result: dict, *, seed: int) -> controls.Controlled:
    """The mean row of the controlled comparison of one scored model against the baseline, on the subset."""
    rows = controls.compare_controlled(contrast_rows(subset.baseline), contrast_rows(result), replicates=REPLICATES,
                                       permutations=REPLICATES, seed=seed)
    return next(c for c in rows if c.dataset == "mean")


def card(label: str, change: controls.Controlled, subset: Subset, logps: dict | None, beta: float) -> scorecard.Card:
    """The scorecard's three answers for one trial."""
    import numpy as np

    from dpo_align.score.preference import preference_table

    preference = {}
    if logps is not None and subset.baseline_logps is not None:
        arrays = {name: {k: np.array(v) for k, v in values["logps"].items()} for name, values in ((BASELINE, subset.baseline_logps), (label, logps))}
        preference = preference_table(arrays, baseline=BASELINE, beta=beta)
    return scorecard.cards({"controls": {label: [change]}}, preference, [label])[0]


# The names of Q2 and Q3 as Optuna constraints (``FrozenTrial.constraints``; TPE prefers trials that meet both).
CONSTRAINTS = ("heldout_preference", "chosen_likelihood")
UNMET = (1.0, 1.0)  # a trial pruned before it was scored meets neither


def constraints(answers: scorecard.Card) -> tuple[float, float]:
    """Q2 and Q3 as Optuna constraints (<= 0 is met): 2 stderr − (accuracy − 0.5), and −Δ log p per chosen token.
    Unanswered (no held-out pairs) counts as not met, as the scorecard counts n/a as no."""
    q2 = 1.0 if answers.accuracy is None or answers.stderr is None else 2 * answers.stderr - (answers.accuracy - 0.5)
    q3 = 1.0 if answers.chosen_per_token is None else -answers.chosen_per_token
    return (float(q2), float(q3))


def set_constraints(trial, values: tuple[float, float]) -> None:
    """Record Q2 and Q3 for the sampler (Optuna takes a constraint once per trial) and for the tables."""
    for name, value in zip(CONSTRAINTS, values, strict=True):
        trial.set_constraint(name, value)
    trial.set_user_attr("constraints", values)


class PruneOnCheckpoints(TrainerCallback):
    """A TrainerCallback: each saved checkpoint before the last step is scored on the subset and its specific change
    reported to Optuna; when the pruner says so, the training stops with ``optuna.TrialPruned``."""

    def __init__(self, trial, subset: Subset, run_dir: Path, seed: int, progress):
        self.trial, self.subset, self.run_dir, self.seed, self.progress = trial, subset, run_dir, seed, progress

    def on_save(self, args, state, control, **kwargs):
        import optuna

        from dpo_align.core.models import adapter_base

        step, total = state.global_step, state.max_steps
        if step >= total:
            return control
        if control.should_training_stop and not (state.save_steps and step % state.save_steps == 0):
            return control  # a Ctrl-C's or SIGTERM's checkpoint, off the schedule: saved to resume from, not a curve point
        checkpoint = Path(args.output_dir) / f"checkpoint-{step}"  # a two-stage run's second stage saves in its own folder
        base = adapter_base(checkpoint) or self.subset.baseline["pretrained"]  # and its adapter is on the SFT model
        spec = ModelSpec(f"trial {self.trial.number} step {step}", base, str(checkpoint))
        result = score_spec(spec, self.subset.options)
        change = controlled_change(self.subset, result, seed=self.seed)
        self.trial.report(change.specific, step)
        self.progress(f"[trial {self.trial.number}] step {step}/{total}: specific change {change.specific:+.4f} "
                      f"({change.verdict}; ce {100 * change.ce.relative:+.2f}%)")
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"step {step}/{total}: specific change {change.specific:+.4f}, behind the median of earlier trials")
        return control


def run_trial(trial, space, base: TrainConfig, subset: Subset, *, runs_dir: Path, output: Path, prune_every: float, progress) -> float:
    """Train, score and record one trial; returns its specific change (the value minimised)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from dpo_align.search.study import worker_name
    from dpo_align.train.run import Interrupted, train_unless_finished

    settings = space.suggest(trial)
    # a retried trial (its worker died) continues in the first attempt's folder, from its latest checkpoint
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks it experimental
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    name = f"trial-{first if first is not None else trial.number}"
    run_dir = runs_dir / trial.study.study_name / name  # studies may share --runs-dir
    overrides = {"save_steps": prune_every, "save_total_limit": None} if prune_every else {}
    config = dataclasses.replace(base, **settings, **overrides, output_dir=str(run_dir), report_generations=0).validate()
    trial.set_user_attr("settings", json.dumps({k: v for k, v in settings.items()}))
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", worker_name())
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
    progress(f"[trial {trial.number}] {shown} -> {run_dir}")
    started = time.time()
    pruner = PruneOnCheckpoints(trial, subset, run_dir, base.seed, progress) if prune_every else None
    try:
        train_unless_finished(config, where=f"[trial {trial.number}]", progress=progress, callbacks=(pruner,) if pruner else ())
    except BaseException as err:
        import optuna

        if isinstance(err, optuna.TrialPruned):
            shutil.rmtree(run_dir, ignore_errors=True)  # a pruned trial's adapter and checkpoints go; its values stay in the study
            set_constraints(trial, UNMET)
            trial.set_user_attr("seconds", round(time.time() - started, 1))
        elif isinstance(err, TrainingDiverged):
            trial.set_user_attr("failed", str(err))
        elif isinstance(err, Exception) and not isinstance(err, Interrupted):  # a crash, not a stop: `--requeue` leaves it
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
        raise
    spec = ModelSpec(f"trial {trial.number}", subset.baseline["pretrained"], str(run_dir))
    result = score_spec(spec, subset.options)
    logps = pair_logps(spec, base, subset.pairs) if subset.pairs is not None else None
    change = controlled_change(subset, result, seed=base.seed)
    answers = card(spec.label, change, subset, logps, config.beta)
    record = {"trial": trial.number, "settings": settings, "run_dir": str(run_dir), "documents": result["documents"], "table": result["table"],
              "logps": logps["logps"] if logps else None}
    atomic_write_json(output / "trials" / f"{name}.json", record)  # per-document numbers, out of git (trials/ is ignored there)
    trial.set_user_attr("verdict", change.verdict)
    trial.set_user_attr("ce_change", change.ce.relative)
    trial.set_user_attr("foil_change", change.foil.relative)
    trial.set_user_attr("specific_interval", [change.specific_low, change.specific_high])
    trial.set_user_attr("accuracy", answers.accuracy)
    trial.set_user_attr("stderr", answers.stderr)
    trial.set_user_attr("chosen_per_token", answers.chosen_per_token)
    trial.set_user_attr("q1", answers.q1)
    trial.set_user_attr("q2", answers.q2)
    trial.set_user_attr("q3", answers.q3)
    set_constraints(trial, constraints(answers))
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    return change.specific
