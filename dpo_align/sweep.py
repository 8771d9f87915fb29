"""``dpo-align sweep``: the whole reference experiment in one command.

For each point of the grid (each learning rate of ``--lr``, or each combination of ``--grid``
settings: ``dpo_align/grid.py``): train one adapter (``RUNS/lr-<lr>``, or named by the settings
that differ), then score the base model and every adapter with the suite and its controls, and
write to ``OUTPUT``:

* ``table.md``: the reference-style table (ce ± stderr), each adapter's relative change
  against the baseline with a paired bootstrap 95% interval over documents and a verdict
  (``paired.py``), and the same for bpb; ``table.csv``, ``results.json``, ``comparison.json``;
* per-document samples, one PNG per DPO statistic with the curves of all runs overlaid
  (``curves/``), and each run's manifest (``manifests/``);
* with ``--preference-data``: held-out preference accuracy of every model (``preference.md``);
* with ``--curve-docs N``: the learning curve of the best run (the scorecard's pick with
  ``--preference-data``, else the lowest mean ce), every checkpoint scored on N
  fixed documents per dataset (``learning-curve.png``, ``.md``).

Each run is scored as soon as it is trained. Interrupted sweeps resume: a finished run (its
``manifest.json`` exists) is not trained again, a started one continues from its latest
checkpoint, and a model already scored (``OUTPUT/scores/<label>.json.gz``, ``OUTPUT/preference/``,
``OUTPUT/learning-curve/``) is not scored again. Each finished run leaves its record in
``OUTPUT/manifests/`` (manifest with the adapter's sha256, settings, training log): on a machine
without the run folder, a run whose record matches its settings and whose every cached result
is sound under the recorded sha256 is kept without its adapter (``kept_record``), so the output
folder, committed without the weights, rebuilds its tables with the same command.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dpo_align.core.errors import TrainingDiverged, UserError
from dpo_align.core.files import atomic_copy, atomic_write_bytes, atomic_write_json, atomic_write_text, read_text, slug, staged_files
from dpo_align.core.memory import release_memory
from dpo_align.core.models import resolve_model
from dpo_align.core.plots import plot_runs, read_metrics
from dpo_align.data import decontaminate
from dpo_align.data.suite import PPL
from dpo_align.grid import cache_label, points, recipe_labels, run_names
from dpo_align.report import compare, scorecard
from dpo_align.report.compare import Scored
from dpo_align.report.html import write_report_safely
from dpo_align.report.tables import sweep_table, write_outputs
from dpo_align.result_cache import cached, inputs_of, key_of, reusable
from dpo_align.score import learning_curve
from dpo_align.score.evaluate import ModelSpec, ScoreOptions, quiet_lm_eval, score_spec
from dpo_align.score.generate import report_generations
from dpo_align.score.preference import markdown as preference_markdown
from dpo_align.train import ref_logps
from dpo_align.train.config import TrainConfig, check_resumable, load_config_file, settings_diff
from dpo_align.train.run import InterruptedAfterFinishing, train_unless_finished


def sweep(
    base: TrainConfig,
    grid: dict[str, list],
    *,
    runs_dir: Path,
    output: Path,
    eval_limit: int | None,
    data_dir: str | None,
    pku_path: str | None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    controls: bool = True,
    preference_data: list[str] | None = None,
    curve_docs: int = 0,
    replicates: int = 10_000,
    progress=print,
) -> list[dict]:
    quiet_lm_eval()
    if curve_docs < 0 or replicates < 100:
        raise UserError("--curve-docs must be 0 (no learning curve) or more, and --bootstrap at least 100 replicates.")
    if curve_docs:
        # the curve scores a checkpoint every 10% of each run, so each run keeps one there
        base = dataclasses.replace(base, save_steps=0.1, save_total_limit=None, keep_checkpoints=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)

    # every run's settings and folder checked before the first one trains (one per point of the grid)
    names, settings_per_run = run_names(grid), points(grid)
    if len(set(names)) != len(names):
        raise UserError("Two runs of the grid would share a folder name: " + ", ".join(sorted(n for n in names if names.count(n) > 1)))
    configs = {name: dataclasses.replace(base, **point, output_dir=str(runs_dir / name)).validate()
               for name, point in zip(names, settings_per_run, strict=True)}
    for config in configs.values():
        check_resumable(Path(config.output_dir), config, how_to_fix="give the sweep another --runs-dir, or delete that folder to train it again.")
        check_finished(Path(config.output_dir), config)

    # the scoring sets given as files (with their foils) are read now: a broken one fails in seconds, not after the training
    decontaminate.suite_docs(data_dir, pku_path, foils=controls)
    options = ScoreOptions(limit=eval_limit, data_dir=data_dir, pku_path=pku_path, template=base.template, batch_size=batch_size,
                           device=device, dtype=dtype, trust_remote_code=base.trust_remote_code, allow_pickle=base.allow_pickle,
                           controls=controls)
    models = Models(base, options, output, preference_data, progress, total=len(configs) + 1)
    labels = recipe_labels(configs, grid)  # what tables show: SFT, RPO, DPO lr 1e-05... (caches stay under the run names)
    ref_logps.restore(output / "manifests" / REFERENCE)  # a fresh machine starts from the reference pass a record kept
    adapters, failed = {}, {}
    # one run after another, each scored as soon as it is trained: an interrupted sweep keeps every finished run's numbers
    for i, (name, config) in enumerate(configs.items(), start=1):
        where = f"[train {i}/{len(configs)}] {name}"
        spec = ModelSpec(labels[name], models.baseline.pretrained, config.output_dir, key=cache_label(name))
        recorded = kept_record(name, config, output / "manifests", models, spec, progress)
        if recorded is not None:
            progress(f"{where}: trained earlier (its record is {output / 'manifests' / name}.json) and every result of it is cached; "
                     f"its adapter is not in {runs_dir}, and is not needed.")
        else:
            try:
                stop = train_one(where, config, progress)
            except TrainingDiverged as err:
                progress(f"{where} FAILED: {err}")
                failed[name] = str(err)
                continue
            record(Path(config.output_dir), output / "manifests", name)
            if stop is not None:  # Ctrl-C as the run finished: kept and recorded; the scoring waits for the next call
                raise stop
        adapters[name] = Path(config.output_dir)
        models.score(spec, recorded)
    if not adapters:
        raise UserError("Every run of the sweep failed: " + " ".join(f"{k}: {v}" for k, v in failed.items()))
    if data_dir or pku_path:  # the training pairs (as trained on) against every scoring set
        _decontamination(base, data_dir, pku_path, output, progress)
    runs = models.runs

    # what each adapter changed: paired bootstrap and permutation over documents (as `dpo-align compare`)
    scored = [Scored(r["label"], str(output), r["documents"], base.template, r.get("versions", {})) for r in runs]
    changes = compare.compare(scored, replicates=replicates, permutations=replicates, seed=base.seed) if len(runs) > 1 else {}
    preference = models.preference() if preference_data else None
    # the three questions per adapter and the pick (scorecard.py), where there is held-out preference data
    cards = scorecard.cards(changes, preference["table"], [r["label"] for r in runs[1:]]) if changes and preference else None
    curve = None
    if curve_docs and len(runs) > 1:  # the best run, on a fixed subset of each dataset
        curve = _learning_curve(runs, adapters, models.baseline, options, curve_docs, output / "learning-curve", base.seed, progress,
                                run_name={label: name for name, label in labels.items()}[_best_run(runs, cards)], label_of=labels)

    settings = {"command": "dpo-align sweep", "grid": grid, "learning_rates": grid.get("learning_rate", [base.learning_rate]),
                "failed_runs": failed, "train": dataclasses.asdict(base), **options.settings(),
                "bootstrap_replicates": replicates, "preference_data": preference_data, "curve_docs": curve_docs,
                "inputs": {**inputs_of(options), **inputs_of({"sources": preference_data or []})}}
    write_sweep(output, runs, settings, list(adapters), changes=changes, failed=failed, preference=preference, cards=cards, curve=curve,
                beta=base.beta, betas={name: configs[name].beta for name in adapters})
    write_report_safely(output, progress, generations=base.report_generations, generate=report_generations)
    if failed:
        raise UserError(f"{len(failed)} of {len(configs)} runs failed ({', '.join(failed)}); the others are scored in {output}/. "
                        + " ".join(failed.values()))
    return runs


def changed_since(manifest: dict, config: TrainConfig, run_dir: Path | None) -> str | None:
    """Why a finished run (its manifest or record) no longer stands for what is on disk, or None: training files whose
    content is not what it trained on (the config's files now, against the sha256 it recorded), or, with its folder,
    an adapter file that is not the one it wrote."""
    from dpo_align.core.provenance import model_revision
    from dpo_align.data.pairs import data_files
    from dpo_align.result_cache import file_digest

    recorded = sorted(s["sha256"] for s in (manifest.get("data") or {}).get("sources") or [] if s.get("sha256"))
    local = [Path(d) for d in config.data if Path(d).exists()]
    if recorded and local:
        try:
            now = sorted(file_digest(p) or "" for d in local for p in data_files(d))
        except UserError:
            now = []
        if now != recorded:
            return (f"its training data ({', '.join(config.data)}) is not what it trained on (sha256 {', '.join(r[:12] for r in recorded)} "
                    f"then, {', '.join(n[:12] for n in now) or 'no data file'} now)")
    if run_dir is not None:
        wrote = ((manifest.get("adapter") or {}).get("sha256")) or {}
        there = model_revision(str(run_dir)).get("sha256") or {}
        wrong = sorted(name for name in set(wrote) | set(there) if wrote.get(name) != there.get(name))
        if wrong:
            return f"its {', '.join(wrong)} is not the file the run wrote (the sha256 in its manifest.json differs)"
    return None


def check_finished(run_dir: Path, config: TrainConfig) -> None:
    """A finished run is kept only for the content it was made from: checked for every run before the first trains."""
    if not (run_dir / "manifest.json").is_file():
        return
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # an unreadable manifest is handled where the run is used
    why = changed_since(manifest, config, run_dir)
    if why:
        raise UserError(f"{run_dir}: finished earlier, but {why}; its results would be the old ones under the new name. Restore the "
                        "file, or delete that run folder (or give another --runs-dir) to train it again.")


def train_one(where: str, config: TrainConfig, progress) -> InterruptedAfterFinishing | None:
    """Train one grid point: a finished run is kept, a started one resumed (TrainingDiverged: it failed).
    Returns the Ctrl-C that came as the run was finishing, for the caller to stop on once the run is recorded."""
    stop = None
    try:
        try:
            if train_unless_finished(config, where=where, progress=progress) is None:
                return None
        except InterruptedAfterFinishing as asked:  # the run is complete: its report is written, then the sweep stops
            stop = asked
        write_report_safely(Path(config.output_dir), progress, generations=config.report_generations, generate=report_generations)
        return stop
    finally:
        release_memory()  # the next run (or the scoring) starts from the memory of none, not the last run's high-water mark


# A finished run's record in the sweep's output (manifests/NAME.json, .yaml, .metrics.jsonl): what it was trained with, the
# sha256 of its adapter, and its training curves. Committed with the results, it lets the same command, on a machine without
# the adapters (they stay out of git), rebuild every table from the cached results instead of training the run again.
RECORD = {"manifest.json": ".json", "config.yaml": ".yaml", "metrics.jsonl": ".metrics.jsonl"}


REFERENCE = "reference-logps"  # the reference log-probs the runs trained against (the base model's, per pair): kept beside the records


def record(run_dir: Path, folder: Path, name: str) -> None:
    for source, suffix in RECORD.items():
        atomic_copy(run_dir / source, folder / f"{name}{suffix}")
    reference = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("reference_logps") or {}
    ref_logps.keep([part["key"] for part in reference.values() if isinstance(part, dict) and part.get("key")], folder / REFERENCE)


def kept_record(name: str, config: TrainConfig, folder: Path, models: Models, spec: ModelSpec, progress) -> dict | None:
    """The adapter digest a run recorded, when the run is not on this machine (no folder in --runs-dir), its record was
    made with these settings and is complete, and every result the sweep needs of it is cached under that digest; else
    None, and the run is trained."""
    run_dir = Path(config.output_dir)
    paths = {suffix: folder / f"{name}{suffix}" for suffix in RECORD.values()}
    if run_dir.exists() or not all(p.is_file() for p in paths.values()):
        return None
    try:
        manifest = json.loads(read_text(paths[".json"], "a run record"))
        digest = manifest["adapter"]
        changed = settings_diff(load_config_file(paths[".yaml"]), config)
    except (UserError, ValueError, KeyError, TypeError) as err:
        progress(f"{paths['.json']}: not a readable run record ({str(err).splitlines()[0]}); training {name}.")
        return None
    why = ("its record says it did not complete" if manifest.get("status") != "complete" else
           f"it was made with other settings ({', '.join(changed)})" if changed else
           changed_since(manifest, config, None) or
           ("its adapter's digest is not in the record" if not isinstance(digest, dict) or not digest.get("sha256") else
            models.missing(spec, digest)))
    if why:
        progress(f"{name}: its record in {folder} is not used ({why}); training it.")
        return None
    return digest


class Models:
    """The base model and each adapter, scored once each through the suite (cached in OUTPUT/scores) and, with held-out
    preference data, their per-pair log-probs (OUTPUT/preference)."""

    def __init__(self, base: TrainConfig, options: ScoreOptions, output: Path, preference_data: list[str] | None, progress, total: int):
        self.base, self.options, self.progress, self.total = base, options, progress, total
        self.scores, self.preferences = output / "scores", output / "preference"
        self.baseline = ModelSpec(f"baseline ({base.model})", resolve_model(base.model, progress=progress))
        self.runs, self.logps, self.count = [], {}, 0
        self.pairs = None
        if preference_data:  # read now: a broken held-out file fails before anything trains
            from dpo_align.score.preference import load_for

            self.sources = preference_data
            self.pairs = load_for(self.baseline.pretrained, preference_data, template=base.template, max_length=base.max_length,
                                  trust_remote_code=base.trust_remote_code)

    def _caches(self, spec: ModelSpec, adapter: dict | None):
        """(path, key, check, inputs) of every cached result of one model."""
        yield self.scores / f"{slug(spec.cache_name)}.json.gz", key_of(spec, self.options, adapter=adapter), None, inputs_of(self.options)
        if self.pairs is not None:
            n = len(self.pairs[0])

            def covers(result):  # what the file covers: one value per held-out pair
                return None if all(len(v) == n for v in result["logps"].values()) else f"it covers another number of pairs than {n}"

            settings = {"sources": self.sources, "template": self.base.template, "max_length": self.base.max_length}
            yield self.preferences / f"{slug(spec.cache_name)}.json", key_of(spec, settings, adapter=adapter), covers, inputs_of(settings)

    def missing(self, spec: ModelSpec, adapter: dict) -> str | None:
        """Why a run kept by its record would need its adapter (a result not cached under its digest), or None."""
        for path, key, check, inputs in self._caches(spec, adapter):
            if reusable(path, key, lambda message: None, check, inputs) is None:
                return f"{path} is missing, stale or damaged"
        return None

    def score(self, adapter_spec: ModelSpec, recorded: dict | None = None) -> None:
        """Score one adapter (and, before the first, the base model): suite, then held-out log-probs. ``recorded``: the
        adapter's digest from its run's record, for a run whose folder is not on this machine."""
        todo = [(self.baseline, None)] if not self.runs else []
        for spec, adapter in [*todo, (adapter_spec, recorded)]:
            self.count += 1
            (score, score_key, _, inputs), *preference = self._caches(spec, adapter)
            result = cached(score, score_key, self.progress, f"[score {self.count}/{self.total}] {spec.label}",
                            "already scored, kept", lambda spec=spec: score_spec(spec, self.options), inputs=inputs)
            self.runs.append({**result, "label": spec.label})  # a result cached under an older label is shown under today's
            for path, key, covers, inputs in preference:
                where = f"[preference {self.count}/{self.total}] {spec.label} ({len(self.pairs[0])} held-out pairs)"
                done = cached(path, key, self.progress, where, "already computed, kept", lambda spec=spec: self._logps(spec), check=covers,
                              inputs=inputs)
                self.logps[spec.label] = done["logps"]

    def _logps(self, spec: ModelSpec) -> dict:
        from dpo_align.score.preference import model_logps

        dataset, pad, _ = self.pairs
        values = model_logps(spec.pretrained, spec.peft, dataset, pad_token_id=pad, max_length=self.base.max_length, label=spec.label,
                             trust_remote_code=self.base.trust_remote_code, allow_pickle=self.base.allow_pickle)
        return {"label": spec.label, "peft": spec.peft, "logps": {k: v.tolist() for k, v in values.items()}}

    def preference(self) -> dict:
        """Held-out preference accuracy and likelihood displacement of every model scored."""
        import numpy as np

        from dpo_align.score.preference import preference_table

        dataset, _, report = self.pairs
        logps = {label: {k: np.array(v) for k, v in values.items()} for label, values in self.logps.items()}
        return {"sources": self.sources, "pairs": len(dataset), "rows_read": report.rows_read, "skipped": dict(report.skipped),
                "beta": self.base.beta, "table": preference_table(logps, baseline=self.baseline.label, beta=self.base.beta)}


def write_sweep(output: Path, runs: list[dict], settings: dict, names: list[str], *, changes: dict, failed: dict[str, str],
                preference: dict | None, curve: dict | None, beta: float, betas: dict[str, float] | None = None,
                cards: list | None = None) -> None:
    """Tables, comparison, preference, learning curve and training curves (of the runs ``names``), all written aside and
    moved into place together, results.json last: a full disk leaves no half set. Each run's manifest is in place already
    (its record, ``record``)."""
    with staged_files(output, last="results.json") as stage:
        write_outputs(stage, [dict(r) for r in runs], settings)
        table = sweep_table(runs, changes, failed, settings["bootstrap_replicates"])
        if cards is not None:  # the three questions per adapter, and the pick
            table += "\n" + "\n".join(scorecard.markdown(cards, baseline=runs[0]["label"], baseline_is_reference=True))
            atomic_write_json(stage / "scorecard.json", scorecard.as_json(cards, baseline_is_reference=True))
            atomic_write_bytes(stage / "scorecard.png", scorecard.plot(cards))
        atomic_write_text(stage / "table.md", table)
        if changes:
            atomic_write_json(stage / "comparison.json", compare.as_json(changes))
            atomic_write_bytes(stage / "comparison.png", compare.plot(changes))
        if preference is not None:
            atomic_write_json(stage / "preference.json", preference)
            atomic_write_text(stage / "preference.md", preference_markdown(preference["table"], beta=beta))
        if curve is not None:
            atomic_write_json(stage / "learning-curve.json", curve)
            atomic_write_text(stage / "learning-curve.md", learning_curve.markdown(curve["points"], curve["total_steps"]))
            atomic_write_bytes(stage / "learning-curve.png",
                               learning_curve.plot(curve["points"], curve["total_steps"],
                                                   f"{curve.get('label', curve['run'])}: ce on {settings['curve_docs']} fixed documents per dataset"))
        # every run's curves from its record (manifests/), which a run kept without its folder has too
        plot_runs({name: read_metrics(output / "manifests" / f"{name}.metrics.jsonl") for name in names}, stage / "curves",
                  betas=betas)


def _best_run(runs: list[dict], cards: list | None) -> str:
    """The label of the run the learning curve follows: the scorecard's pick where there is one (with held-out
    preference data; a lowest ce can be the largest format shift), else the lowest mean ce."""
    if cards is not None:
        pick, _ = scorecard.recommend(cards)
        if pick is not None:
            return pick.model
    return min(runs[1:], key=lambda r: r["table"]["mean"]["ce"][0])["label"]


def _learning_curve(runs: list[dict], adapters: dict[str, Path], baseline: ModelSpec, options: ScoreOptions, per_dataset: int,
                    folder: Path, seed: int, progress, *, run_name: str, label_of: dict[str, str]) -> dict:
    """Score the base model and every checkpoint of the run ``run_name`` on a fixed subset."""
    run_dir = adapters[run_name]
    if not (run_dir / "manifest.json").is_file():  # kept by its record: its checkpoints are not on this machine
        progress(f"Learning curve: left out, {run_name}'s checkpoints are not on this machine (the run was kept by its record). "
                 f"Delete {run_dir.parent.name}'s record of it to train it again, with its checkpoints.")
        return None
    # the curve follows ce alone (the controls are read at the end of the run, in the table)
    counts = {task: len(docs) for task, docs in runs[0]["documents"].items() if task in PPL.tasks.values()}
    chosen = learning_curve.subset(counts, per_dataset, seed)
    options = dataclasses.replace(options, limit=None, samples=chosen, controls=False)
    total = json.loads((run_dir / "manifest.json").read_text())["global_steps"]
    steps = [(0, baseline)] + [(step, ModelSpec(f"{run_name} step {step}", baseline.pretrained, str(path)))
                               for step, path in learning_curve.checkpoint_steps(run_dir)]
    points = []
    for i, (step, spec) in enumerate(steps, start=1):
        def compute(step=step, spec=spec):
            result = score_spec(spec, options)
            return {"step": step, "label": spec.label, "peft": spec.peft, "seconds": result["seconds"], "table": result["table"]}

        where = f"[curve {i}/{len(steps)}] {run_name} step {step}/{total} ({per_dataset} documents per dataset)"
        points.append(cached(folder / f"step-{step}.json", key_of(spec, options), progress, where, "already scored, kept", compute,
                             inputs=inputs_of(options)))
    return {"run": run_name, "label": label_of[run_name], "total_steps": total, "documents": chosen, "points": points}


def _decontamination(base: TrainConfig, data_dir: str | None, pku_path: str | None, output: Path, progress) -> None:
    from dpo_align.train.run import prepare_pairs

    pairs = prepare_pairs(base, progress=lambda message: None).pairs  # as trained on: overlap dropped if asked, --max-pairs taken
    texts = [t for p in pairs for t in (p.instruction, p.chosen, p.rejected)]
    # the sets the sweep scores, wherever they come from: files, or the hub when reachable
    docs, unchecked = decontaminate.suite_docs(data_dir, pku_path, include_hub=True)
    exact = {name: len(idx) for name, idx in decontaminate.overlap([p.instruction for p in pairs], decontaminate.instruction_sets(docs)).items()}
    report = decontaminate.ngram_overlap(texts, decontaminate.document_texts(docs))
    warning = decontaminate.same_source(base.data, base.split, pku_path)
    training = f"{len(pairs)} pairs from {', '.join(base.data)}" + (f" ({base.pair_sample} {base.max_pairs})" if base.max_pairs else "")
    atomic_write_json(output / "decontamination.json", {"training": training, "exact_prompts": exact, "ngram": report, "n": decontaminate.N,
                                                        "not_checked": unchecked, "same_source_warning": warning})
    atomic_write_text(output / "decontamination.md", decontaminate.markdown(report, exact, training, unchecked, warning))
    progress("Decontamination: " + ", ".join(f"{k} {v['contaminated']}/{v['documents']} share a 13-gram" for k, v in report.items())
             + "".join(f"; {k} not checked ({why})" for k, why in unchecked.items()))
    if warning:
        progress(f"Warning: {warning}")
