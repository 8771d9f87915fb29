"""What a search leaves in its output folder, written from the study's database alone (any machine can write it):

* ``results.md`` and ``results.json``: every trial's settings, specific change (its 95% interval), verdict, Q2, Q3,
  state and time; the pick by the scorecard's rule (``report/scorecard.py``), fixed before any study ran;
* ``history.png``, ``importances.png``: Optuna's own plots (matplotlib backend); ``slice.png``: every trial's specific
  change with its interval against each searched setting (``slice_plot.py``: Optuna's slice names no recipe);
* ``best-config.yaml``: the picked trial's settings, which ``dpo-align train --config best-config.yaml`` repeats;
* ``confirm/RANK-trial-N.yaml``: the first ``CONFIRM`` trials in the rule's order, for the confirmation runs (more
  pairs, several seeds, the whole suite: ``dpo-align sweep --config confirm/1-trial-N.yaml --grid seed=42,7 ...``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from dpo_align.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from dpo_align.core.plots import png_bytes
from dpo_align.report import scorecard
from dpo_align.train.config import TrainConfig

CONFIRM = 2  # trials to confirm: a lead is trusted once it survives more pairs and a second seed


def cards(study) -> list[scorecard.Card]:
    """The scorecard of every finished trial, from what it recorded in the study."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        low, high = (attrs.get("specific_interval") or [None, None])[:2]
        out.append(scorecard.Card(f"trial {t.number}", verdict=attrs.get("verdict"), specific=t.value, specific_low=low, specific_high=high,
                                  accuracy=attrs.get("accuracy"), stderr=attrs.get("stderr"), chosen_per_token=attrs.get("chosen_per_token")))
    return out


def ranking(study, count: int = CONFIRM) -> tuple[list, str]:
    """The first ``count`` finished trials in the scorecard rule's order (the first is the pick; all of them go to
    ``confirm/``) and the sentence saying how the pick was made. One read of the study's trials."""
    table = cards(study)
    _, reason = scorecard.recommend(table)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [trials[int(card.model.removeprefix("trial "))] for card in scorecard.ranked(table)[:count]], reason


def _config(base: TrainConfig, trial, output_dir: str) -> TrainConfig:
    """A trial's training settings: the study's shared ones with the trial's own."""
    return dataclasses.replace(base, **json.loads(trial.user_attrs.get("settings") or "{}"), output_dir=output_dir)


def _continued_in(trials) -> dict[int, tuple[int, bool]]:
    """Attempt number -> (the attempt that took its settings on, whether it started afresh): an Optuna retry
    (``retry_history``'s last) or a ``--requeue`` (``requeued_after``'s last) continue from the attempt's checkpoint; an
    attempt that ended with its worker and was not taken on so, but whose very settings a later trial ran (drawn again,
    or queued by hand with ``enqueue_trial``), went on afresh in the first such trial. Each setting then has one row."""
    from optuna.trial import TrialState

    out = {}
    for t in trials:
        earlier = t.system_attrs.get("retry_history") or t.user_attrs.get("requeued_after") or []
        if earlier:
            out[earlier[-1]] = (t.number, False)
    for t in trials:
        ended = t.state == TrialState.FAIL and not {"failed", "error"} & set(t.user_attrs)  # a divergence or a crash is a result
        if ended and t.number not in out and t.params:
            later = next((u.number for u in trials if u.number > t.number and u.params == t.params), None)
            if later is not None:
                out[t.number] = (later, True)
    return out


def rows(study, base: TrainConfig) -> list[dict]:
    """Every trial's row of the tables, its recipe named once (``grid.trial_recipe``) over the study's ``base`` settings."""
    from dpo_align.grid import trial_recipe

    out = []
    trials = study.get_trials(deepcopy=False)
    continued = _continued_in(trials)
    for t in trials:
        a, (into, afresh) = t.user_attrs, continued.get(t.number, (None, False))
        # a trial not started yet shows the settings it is queued with (a retry's, or enqueue_trial's fixed ones)
        queued = t.params or t.system_attrs.get("fixed_params") or {}
        settings = json.loads(a.get("settings") or "{}") or queued
        out.append({"trial": t.number, "state": t.state.name.lower(), "continued_in": into, "afresh": afresh, "settings": settings,
                    "recipe": trial_recipe(settings, base),
                    "specific_change": t.value, "specific_interval": a.get("specific_interval"), "verdict": a.get("verdict"),
                    "ce_change": a.get("ce_change"), "foil_change": a.get("foil_change"), "accuracy": a.get("accuracy"),
                    "stderr": a.get("stderr"), "chosen_per_token": a.get("chosen_per_token"), "q1": a.get("q1"), "q2": a.get("q2"),
                    "q3": a.get("q3"), "seconds": a.get("seconds"), "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                    "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}})
    return out


def _number(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value * scale, spec)


def markdown(study, table: list[dict], first: list, reason: str, base: TrainConfig) -> str:
    """``first``, ``reason``: ``ranking``'s answer."""
    from dpo_align.search.study import state_line

    chosen = first[0] if first else None

    lines = [f"# Search `{study.study_name}`", "", f"{state_line(study)}.", "",
             "The value minimised is the mean's specific change against the base model on the study's fixed documents "
             "(Δlog ce − Δlog ce_foil; below 0: the reference answers got cheaper than their foils). Q2 and Q3 are Optuna "
             "constraints. The pick follows the scorecard's rule: " + scorecard.RULE, "",
             *_trials_table([r for r in table if r.get("continued_in") is None])]
    attempts = [r for r in table if r.get("continued_in") is not None]
    if attempts:
        lines += ["", "### Attempts that ended with their worker", "",
                  "`fail → N`: the attempt ended (its worker died or was stopped) and its settings went on in trial N, from its "
                  "last checkpoint (Optuna's retry, or `--requeue`), or afresh where the same settings were run again (drawn "
                  "again, or queued by hand: `(afresh)`); each setting's last attempt is in the table above. A value here is the attempt's "
                  "last learning-curve point.", "", *_trials_table(attempts)]
    lines += ["", reason, ""]
    if chosen is not None:
        lines += [f"Its settings are in `best-config.yaml`: `dpo-align train --config best-config.yaml -o runs/best` trains it again "
                  f"(on {base.max_pairs or 'all'} pairs, as the trials did). The first {CONFIRM} trials in the rule's order "
                  f"({', '.join(f'trial {t.number}' for t in first)}) are in `confirm/` for the confirmation: "
                  "`dpo-align sweep --config confirm/1-trial-N.yaml --grid seed=42,7` with more pairs, scored on the whole suite.", ""]
    lines += ["Plots: `history.png` (Optuna's optimisation history; grey: a trial that misses Q2 or Q3, which Optuna calls infeasible, "
              "and the line follows the best trial that meets both), `importances.png` (parameter importances, fANOVA), `slice.png` "
              "(every trial's specific change with its 95% interval against each setting, by recipe; pruned trials hollow at their "
              "last checkpoint's value).", ""]
    return "\n".join(lines)


def _trials_table(table: list[dict]) -> list[str]:
    lines = ["| trial | state | recipe | settings | specific change [95%] | ce (foils) | verdict | held-out reward acc | Δ log p chosen/token | Q1 | Q2 | Q3 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["settings"].items())
        interval = r["specific_interval"]
        if r["specific_change"] is not None and r["state"] != "pruned":
            specific = _number(r["specific_change"], "+.4f") + (f" [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "")
        elif r["last_step"] is not None:  # a pruned trial's, or a stopped attempt's, last learning-curve point
            specific = f"at step {r['last_step']}: {r['intermediate'][str(r['last_step'])]:+.4f}"
        else:
            specific = ""
        ce = f"{_number(r['ce_change'], '+.2f', 100)}% ({_number(r['foil_change'], '+.2f', 100)}%)" if r["ce_change"] is not None else ""
        acc = f"{100 * r['accuracy']:.1f}% ± {100 * r['stderr']:.1f}" if r["accuracy"] is not None and r["stderr"] is not None else ""
        state = r["state"] + (f" → {r['continued_in']}" + (" (afresh)" if r.get("afresh") else "") if r.get("continued_in") is not None else "")
        answers = [scorecard.answer(r[q]) if r["state"] == "complete" else "" for q in ("q1", "q2", "q3")]
        lines.append(f"| {r['trial']} | {state} | {r['recipe']} | {settings} | {specific} | {ce} | {r['verdict'] or ''} | {acc} | "
                     f"{_number(r['chosen_per_token'], '+.4f')} | {' | '.join(answers)} | {_number(r['seconds'], '.0f')} |")
    return lines


def _slice(study, table: list[dict]) -> bytes | None:
    """``slice_plot.figure`` over the study's searched settings, as its trials' distributions give them."""
    from dpo_align.search import slice_plot

    searched = {}
    for trial in study.get_trials(deepcopy=False):
        searched.update(trial.distributions)
    figure = slice_plot.figure(table, searched)
    return None if figure is None else png_bytes(figure)


def _plot(kind: str, study) -> bytes | None:
    """One of Optuna's matplotlib plots as PNG bytes, or None where the study cannot give it yet (too few trials)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    draw = {"history": plots.plot_optimization_history, "importances": plots.plot_param_importances}[kind]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            axes = draw(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
    if kind == "history":  # Optuna's legend names neither what its grey points are nor which trials its line follows
        figure.text(0.01, 0.01, "grey: a trial that misses Q2 or Q3 (infeasible to Optuna); the line: the lowest value among "
                    "the trials that meet both", fontsize=8, color="dimgrey")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a colour bar's axes: laid out as well as it can be
        figure.tight_layout()
    return png_bytes(figure)  # closes it


def write(study, space, base: TrainConfig, output: Path, progress=print) -> None:
    output.mkdir(parents=True, exist_ok=True)
    table = rows(study, base)
    first, reason = ranking(study)
    chosen = first[0] if first else None
    atomic_write_json(output / "results.json", {"study": study.study_name, "trials": table,
                                                "pick": chosen.number if chosen else None,
                                                "reason": reason, "space": json.loads(space.as_json()) if space else None,
                                                "base": {k: v for k, v in dataclasses.asdict(base).items() if k != "output_dir"}})
    atomic_write_text(output / "results.md", markdown(study, table, first, reason, base))
    for kind in ("history", "importances", "slice"):
        if kind == "slice":
            data = _slice(study, table)
        else:
            data = _plot(kind, study) if any(r["state"] == "complete" for r in table) else None
        if data is not None:
            atomic_write_bytes(output / f"{kind}.png", data)
    if chosen is not None:
        atomic_write_text(output / "best-config.yaml", _config(base, chosen, "runs/best").to_yaml())
    for stale in (output / "confirm").glob("*-trial-*.yaml"):  # another ranking's files: the order may have changed
        stale.unlink()
    for rank, trial in enumerate(first, 1):
        atomic_write_text(output / "confirm" / f"{rank}-trial-{trial.number}.yaml", _config(base, trial, f"runs/confirm-trial-{trial.number}").to_yaml())
    headline = reason.split(":")[0].replace("**", "")
    progress(f"Search report: {output}/results.md (pick: {f'trial {chosen.number}' if chosen else 'none'}; {headline})")
