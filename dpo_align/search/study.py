"""``dpo-align search``: an Optuna study over training settings, any number of workers sharing one database.

A study is its database (Optuna's way): every worker runs the same command with the same ``--storage`` URL and
``--study`` name, asks Optuna for the next settings, trains them and reports the value. Nothing else coordinates
the workers. SQLite (the default, a file in the output folder) serves the workers of one machine; PostgreSQL or
MySQL serve several machines.

A worker that dies stops sending heartbeats; after ``GRACE`` seconds another worker's next trial marks its trial
failed and ``RetryHeartbeatStaleTrialCallback`` puts the same settings back in the queue, so the study still holds every
trial's result. The retry continues in the first attempt's run folder (from its latest checkpoint) where it can
see that folder.

What a worker writes where: its trials' adapters in ``--runs-dir/trial-N`` (a folder shared by the workers, or one
per machine), their per-document numbers in ``OUTPUT/trials/``, and the study's values, settings, verdicts and
answers in the database. The report (``results.md``, plots, the best trial's ``config.yaml``) is written from the
database alone, by the worker that finishes, or by ``dpo-align search --report`` on any machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.train.config import TrainConfig

HEARTBEAT = 60  # seconds between a running trial's heartbeats
GRACE = 600  # a trial whose worker has been silent this long is failed and retried (a scoring pass can hold the GIL a while)
# both may be shortened through the environment (DPO_ALIGN_SEARCH_HEARTBEAT, DPO_ALIGN_SEARCH_GRACE): the fault tests do
RETRIES = 2  # attempts after the first, per trial
SAMPLERS = ("tpe", "grid")


def default_storage(output: Path) -> str:
    return f"sqlite:///{(Path(output).absolute() / 'study.db')}"


def open_storage(url: str, *, heartbeat: bool = True):
    """Optuna's RDB storage for ``url``, with heartbeats and retries of dead workers' trials; an unreachable database is
    a clear error naming the URL within ``connect_timeout`` seconds, not a hang."""
    import optuna
    import sqlalchemy.exc

    engine = {}
    if url.startswith(("postgresql", "mysql")):
        engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise UserError(f"--storage {url}: the folder {path.parent} does not exist.")
        engine = {"connect_args": {"timeout": 60}}  # workers wait on each other's writes instead of failing
    import os

    heartbeat_s = int(os.environ.get("DPO_ALIGN_SEARCH_HEARTBEAT", HEARTBEAT))
    grace_s = int(os.environ.get("DPO_ALIGN_SEARCH_GRACE", GRACE))
    # the retry keeps its attempt's learning curve (inherit_intermediate_values), for the pruner
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES, inherit_intermediate_values=True)
    kwargs = {"heartbeat_interval": heartbeat_s, "grace_period": grace_s, "heartbeat_stale_trial_callback": retry} if heartbeat else {}
    import time
    import warnings

    try:
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental since 2.8
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # two workers creating the tables of a new database at once: the second finds them half made; again
                if attempt == 3:
                    raise
                time.sleep(1 + attempt)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise UserError(f"--storage {hidden_url(url)}: cannot open the study database ({reason}). Check the URL, that the server "
                        "is running and reachable, and that its driver is installed (PostgreSQL: pip install psycopg).") from None


def hidden_url(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def base_digest(base: TrainConfig) -> dict:
    """The settings every trial shares (what a joining worker must agree on), without the folder each run goes to."""
    settings = dataclasses.asdict(base)
    for name in ("output_dir", "report_generations", "report_to"):
        settings.pop(name, None)
    return settings


def shared_settings(study, config_file: Path | None, given: dict) -> TrainConfig:
    """The settings the study's trials shared (stored in it when it was created), under ``--config`` and the options
    given: so ``--report`` and ``--status`` on any machine write the study's own settings into ``best-config.yaml``,
    not this command's defaults."""
    from dpo_align.train.config import build_config, load_config_file

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    stored = {k: v for k, v in json.loads(study.user_attrs.get("base") or "{}").items() if k in known}
    return build_config({**stored, **(load_config_file(config_file) if config_file else {})}, given)


def open_study(storage, name: str, space, base: TrainConfig, study_settings: dict, *, sampler: str, grid_points: int, resume: bool):
    """Create the study, or join it: a study of this name with another space, other shared settings or another subset
    is refused (its trials would not be comparable), unless ``--resume`` says to continue it with this command's."""
    import optuna

    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r} is not one of: {', '.join(SAMPLERS)}.")
    seed = _worker_seed(base.seed)
    if sampler == "grid":
        chosen = optuna.samplers.GridSampler(space.grid(grid_points), seed=seed)
    else:
        chosen = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)  # Q2 and Q3: search.trial.set_constraints
    wanted = {"space": space.as_json(), "base": json.dumps(base_digest(base), sort_keys=True, default=str),
              "scoring": json.dumps(study_settings, sort_keys=True, default=str), "sampler": sampler}
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=chosen, load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0))
    if name not in existing:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return study
    differs = [key for key, value in wanted.items() if study.user_attrs.get(key) is not None and not _same(key, study.user_attrs[key], value)]
    if differs and not resume:
        raise UserError(f"--study {name}: the study exists in this database with another {' and '.join(differs)} "
                        f"({_what_differs(study.user_attrs, wanted, differs)}); its trials would not be comparable with these. "
                        "Give another --study name, or --resume to continue it with this command's settings.")
    return study


def worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _worker_seed(seed: int) -> int:
    """The sampler's seed for this worker: --seed mixed with the worker's host and process id. Workers seeded alike would
    draw the same settings (TPE's first trials are random draws), and workers started together on several machines are
    the normal case. Each trial records its worker and the seed it drew with."""
    import zlib

    return (seed + zlib.crc32(worker_name().encode())) % 2**32


def _same(key: str, saved: str, wanted: str) -> bool:
    """A stored study attribute against this command's; shared settings the study's version did not have count as their
    default (as a run's config.yaml is read), so a setting added later does not lock workers out of a running study."""
    if key != "base" or saved == wanted:
        return saved == wanted
    defaults = json.loads(json.dumps(base_digest(TrainConfig()), default=str))
    a, b = json.loads(saved), json.loads(wanted)
    return all(a.get(k, defaults.get(k)) == b.get(k, defaults.get(k)) for k in set(a) | set(b))


def _what_differs(saved: dict, wanted: dict, keys: list[str]) -> str:
    out = []
    for key in keys:
        try:
            a, b = json.loads(saved[key]), json.loads(wanted[key])
        except (ValueError, TypeError):
            out.append(f"{key}: {saved[key]!r} against {wanted[key]!r}")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}: {a.get(k)!r} against {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)][:3]
        else:
            out.append(f"{key} differs")
    return "; ".join(out)


def state_line(study) -> str:
    """Trials done, pruned, failed, running, and the best so far."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value) if done else None
    return (f"{count[TrialState.COMPLETE]} finished, {count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, "
            f"{count[TrialState.RUNNING]} running, {count[TrialState.WAITING]} waiting"
            + (f"; lowest specific change so far: trial {best.number} ({best.value:+.4f}, {best.user_attrs.get('verdict', '?')})" if best else ""))


def run_worker(*, space, base: TrainConfig, storage_url: str, study_name: str, output: Path, runs_dir: Path, trials: int,
               max_trials: int | None, search_docs: int, search_pairs: int, preference_data: list[str] | None, prune_every: float,
               sampler: str, grid_points: int, resume: bool, score_options, progress) -> object:
    """One worker: join the study and run up to ``trials`` trials (fewer when the study reaches ``max_trials``
    finished or pruned trials), then write the report from the database."""
    import optuna

    from dpo_align.core.models import resolve_model
    from dpo_align.search import report
    from dpo_align.search.trial import prepare, run_trial

    space.check(base)  # every choice and each range's ends are valid settings, before any work
    if search_docs < 1:
        raise UserError(f"--search-docs {search_docs}: score at least 1 document per dataset for each trial.")
    if search_pairs < 0:
        raise UserError(f"--search-pairs {search_pairs}: give 0 or more held-out pairs (without --preference-data, Q2 and Q3 are n/a).")
    if not 0 <= prune_every < 1:
        raise UserError(f"--prune-every {prune_every}: give a fraction of each trial's steps in (0, 1), or 0 for no pruning.")
    if trials < 1 or (max_trials is not None and max_trials < 1):
        raise UserError("--trials and --max-trials must be at least 1.")
    storage = open_storage(storage_url)
    study_settings = {"search_docs": search_docs, "search_pairs": search_pairs, "preference_data": preference_data,
                      "prune_every": prune_every, "dtype": score_options.dtype}
    study = open_study(storage, study_name, space, base, study_settings, sampler=sampler, grid_points=grid_points, resume=resume)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model_path = resolve_model(base.model, progress=progress)
    subset = prepare(base, model_path, output=output, per_dataset=search_docs, search_pairs=search_pairs, preference_data=preference_data,
                     score_options=score_options, progress=progress)

    def after(study, trial):
        state = trial.state.name.lower()
        value = f"{trial.value:+.4f} ({trial.user_attrs.get('verdict')}, Q2 {trial.user_attrs.get('q2')}, Q3 {trial.user_attrs.get('q3')})" \
            if trial.value is not None else ""
        progress(f"[trial {trial.number}] {state} {value}. Study: {state_line(study)}")

    callbacks = [after]
    if max_trials:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    if max_trials and _counted(study) >= max_trials:
        progress(f"The study already has {max_trials} finished or pruned trials; nothing to run.")
    else:
        study.optimize(lambda trial: run_trial(trial, space, base, subset, runs_dir=runs_dir, output=output, prune_every=prune_every,
                                               progress=progress),
                       n_trials=trials, callbacks=callbacks, catch=(), gc_after_trial=True)
    report.write(study, space, base, output, progress=progress)
    return study


def _counted(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def requeue(study) -> list[tuple[int, list[int]]]:
    """Put back in the queue the settings of every trial whose attempts all failed because their workers died (each
    session's end, a SIGKILL, an out-of-memory kill), once Optuna's ``RETRIES`` are spent: the new trial continues in
    the first attempt's run folder, from its latest checkpoint, as an automatic retry does. A trial that failed on its
    own (its training diverged: the ``failed`` note; an exception: ``error``) is not requeued: it would fail again; nor
    are settings that another trial already holds (finished, pruned, running or waiting). Returns (first attempt,
    attempts) per requeued trial."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed, and retried while retries remain
    trials = study.get_trials(deepcopy=False)
    held = [t.params for t in trials if t.state != TrialState.FAIL]
    groups: dict[int, list] = {}
    for t in trials:
        if t.state == TrialState.FAIL:
            groups.setdefault(t.system_attrs.get("failed_trial", t.number), []).append(t)
    requeued = []
    for first, attempts in sorted(groups.items()):
        if any("failed" in t.user_attrs or "error" in t.user_attrs for t in attempts) or attempts[0].params in held:
            continue
        numbers = sorted(t.number for t in attempts)
        curve = {step: value for t in sorted(attempts, key=lambda t: t.number) for step, value in t.intermediate_values.items()}
        # a fresh retry history: the requeued trial gets Optuna's automatic retries again; the attempts are kept beside
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=attempts[0].params, distributions=attempts[0].distributions,
                                            system_attrs={"failed_trial": first, "retry_history": []},
                                            user_attrs={"requeued_after": numbers}, intermediate_values=curve))
        held.append(attempts[0].params)
        requeued.append((first, numbers))
    return requeued
