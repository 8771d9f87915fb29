"""``dpo-align compare``: is the difference between two scored models real?

Reads per-document results of the suite, from either kind of folder:

* a folder written by ``dpo-align eval`` or ``sweep`` (``results.json`` + ``samples/``), which may
  hold several models;
* a plain ``lm_eval --log_samples --output_path DIR`` folder of the suite (``results_*.json`` +
  ``samples_<task>_*.jsonl``, found anywhere below DIR; one model per results file).

The first model found is the baseline; every other model is compared with it, per dataset
and for the mean, by ``paired.compare_documents`` (paired bootstrap interval, paired
permutation p-value with Holm's adjustment, verdict), for ce and bpb. Where both models were
scored with their controls (the ``dpo_contrast_*`` tasks), ``controls.compare_controlled`` reads
ce beside its foils and gives the verdict (better, format shift, worse, no detectable change);
without them the ce verdict stands alone, and the output says that no control was scored.

Only like with like is compared: the same documents (by document id and, where the files
carry them, lm-eval's hashes of each document, prompt and target), the same template and the
same suite version. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dpo_align.core.errors import UserError
from dpo_align.core.files import read_maybe_gzipped, slug
from dpo_align.core.plots import png_bytes
from dpo_align.data.suite import CONTRAST, PPL, display_name, document_row
from dpo_align.data.templates import DEFAULT_TEMPLATE  # the tasks' default when metadata names none
from dpo_align.report import controls, paired, scorecard

TASKS = PPL.tasks
FEW_DOCUMENTS = 10  # below this many documents per dataset the bootstrap interval is not worth printing without a warning


@dataclass
class Scored:
    label: str
    source: str
    documents: dict[str, list[dict]]  # {task: [{doc_id, nll, tokens, bytes, (hashes)}]}
    template: str | None = None
    versions: dict = field(default_factory=dict)  # {task: suite version}
    key: str | None = None  # the label its results are filed under, where another is shown (a sweep run's "DPO <run name>")
    revision: dict | None = None  # the sha256 of its weight files, as results.json records them (None from lm-eval's folders)


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, convert=None) -> list[dict]:
    """The rows of a samples file (``convert``ed from lm-eval's form where given), each checked by ``check_document``."""
    rows = []
    try:
        text = read_maybe_gzipped(path)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not readable as {'gzipped ' if path.suffix == '.gz' else ''}UTF-8 text ({err}); is the file complete?") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
                row = convert(row) if convert else row
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(f"{path}:{number}: not a scored document of the suite (invalid JSON or missing fields); "
                                "is the file complete?") from None
            check_document(row, f"{path}:{number}")
            rows.append(row)
    return rows


def _samples(folder: Path) -> dict[str, list[dict]]:
    """{task: its documents} from a model's samples folder: ``TASK.jsonl`` as ``eval`` writes it, or ``TASK.jsonl.gz`` as
    results/ keeps the bulky ones."""
    files = {}
    for path in sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")]):
        task = path.name.removesuffix(".gz").removesuffix(".jsonl")
        if task in files:
            raise UserError(f"{folder}: {task} is there twice ({files[task].name} and {path.name}); keep one of them.")
        files[task] = path
    return {task: _read_jsonl(path) for task, path in files.items()}


COUNTS = ("tokens", "bytes", "foil_tokens", "foil_bytes")


def check_document(row: dict, where: str) -> None:
    """A document's numbers are possible ones: every NLL finite and >= 0, every token and byte count a whole number >= 1.

    Nothing read back is trusted because it parses: a damaged or edited samples file would otherwise give a
    verdict on numbers no model produced."""
    import math

    if not isinstance(row, dict) or "doc_id" not in row or "nll" not in row or "tokens" not in row:
        raise UserError(f"{where}: a document needs doc_id, nll and tokens; this row has {sorted(row) if isinstance(row, dict) else row!r}.")
    for key in ("nll", "foil_nll"):
        value = row.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: {key} is {value!r}; a negative log-likelihood is a finite number >= 0. The file was damaged "
                            "or edited: score the model again.")
    for key in COUNTS:
        value = row.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
            raise UserError(f"{where}: {key} is {value!r}; token and byte counts are whole numbers >= 1. The file was damaged or "
                            "edited: score the model again.")


def _from_dpo_align(folder: Path, relabel=None) -> list[Scored]:
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        models = results["models"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'results.json'}: not a results file written by dpo-align eval or sweep.") from None
    settings = results.get("settings", {})
    shown = relabel(folder, settings) if relabel else {}  # {label: label to show}
    out = []
    for model in models:
        samples = folder / "samples" / slug(model["label"])
        documents = _samples(samples)
        if not documents:
            raise UserError(f"{samples}: no per-document results for {model['label']!r}; they are needed for a paired comparison.")
        out.append(Scored(shown.get(model["label"], model["label"]), str(folder), documents, settings.get("template"), model.get("versions", {}),
                          key=model["label"], revision=model.get("revision")))
    return out


def _from_lm_eval(results_file: Path) -> Scored:
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        configs, versions = results["configs"], results.get("versions", {})
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{results_file}: not an lm-eval results file.") from None
    stamp = results_file.stem.removeprefix("results_")
    documents, templates = {}, set()
    for task in [*TASKS.values(), *CONTRAST.tasks.values()]:
        if task not in configs:
            continue
        path = results_file.with_name(f"samples_{task}_{stamp}.jsonl")
        if not path.is_file():
            raise UserError(f"{results_file}: scored {task} but {path.name} is missing; run lm_eval with --log_samples.")
        documents[task] = _read_jsonl(path, lambda sample, task=task: document_row(task, sample))
        templates.add(configs[task].get("metadata", {}).get("template", DEFAULT_TEMPLATE))
    if not any(task in documents for task in TASKS.values()):
        raise UserError(f"{results_file}: holds none of the suite's tasks ({', '.join(TASKS.values())}).")
    args = results.get("config", {}).get("model_args", {})
    if isinstance(args, str):  # older lm-eval keeps the raw string
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    label = str(args.get("pretrained", results.get("model_name", results_file.parent.name)))
    if args.get("peft"):
        label += f" + {args['peft']}"
    template = templates.pop() if len(templates) == 1 else None
    return Scored(label, str(results_file), documents, template, {t: versions.get(t) for t in documents})


def load(paths: list[str], relabel=None) -> list[Scored]:
    """Every model in the given folders, in order. ``relabel(folder, settings)``: {label: the label to show} for a
    dpo-align folder (the CLI passes ``grid.sweep_recipe_labels``: a sweep made before recipe labels reads SFT, RPO...)."""
    models, seen, folders = [], {}, []  # folders: the folder each model came from, as given
    for name in paths:
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"{name}: no such folder.")
        if path.resolve() in seen:  # a model compared with itself would say nothing, at p = 1
            raise UserError(f"{name} is given twice (also as {seen[path.resolve()]}); compare different scored folders.")
        seen[path.resolve()] = name
        if (path / "results.json").is_file():
            found = _from_dpo_align(path, relabel)
        else:
            results_files = sorted(path.rglob("results_*.json")) if path.is_dir() else [path]
            if not results_files:
                raise UserError(f"{name}: neither a dpo-align results folder (results.json) nor an lm_eval --output_path folder (results_*.json).")
            found = [_from_lm_eval(f) for f in results_files]
        models += found
        folders += [name] * len(found)
    models, folders = _once(models, folders)
    _label_apart(models, folders)
    return models


def _once(models: list[Scored], folders: list[str]) -> tuple[list[Scored], list[str]]:
    """Each model once: one that several folders hold with the same label, the same weights (results.json's sha256) and
    the same numbers for every document (two sweeps' base model) is read from the first folder only, instead of being
    compared with itself."""
    kept: list[tuple[Scored, str]] = []
    for model, folder in zip(models, folders, strict=True):
        if model.revision is None or not any((other.label, other.revision, other.documents) == (model.label, model.revision, model.documents)
                                             for other, _ in kept):
            kept.append((model, folder))
    return [m for m, _ in kept], [f for _, f in kept]


def _label_apart(models: list[Scored], folders: list[str]) -> None:
    """A label that several folders hold (two sweeps' ``seed-42``, two folders' base model) is shown with its folder's
    name; where that still repeats (one folder holding a label twice, folders of one name), every model is numbered."""
    labels = [m.label for m in models]
    repeated = {label for label in labels if labels.count(label) > 1}
    if not repeated:
        return
    shown = [f"{m.label} ({Path(folder).expanduser().resolve().name})" if m.label in repeated else m.label for m, folder in zip(models, folders, strict=True)]
    if len(set(shown)) != len(shown):
        shown = [f"{m.label} [{i + 1}]" for i, m in enumerate(models)]
    for model, label in zip(models, shown, strict=True):
        model.label = label


def with_baseline(models: list[Scored], name: str | None) -> list[Scored]:
    """``models`` with the one ``name`` picks first: its exact label or run name (a sweep's folder: the label's last
    word, or the last word of the label its results are filed under), else the one label that has it as a whole word (words split at spaces and ``-``: ``sigmoid`` names
    ``DPO loss_type-sigmoid``, not ``loss_type-sigmoid+sft``), else the one label containing it; any case."""
    if name is None:
        return models
    wanted = name.casefold()

    def names(m):  # the label shown, and the one its results are filed under (a sweep's run name: "sigmoid" is DPO's)
        key = getattr(m, "key", None)
        return [m.label] + ([key] if key and key != m.label else [])

    found = ([m for m in models if any(name in (text, (text.split() or [None])[-1]) for text in names(m))]
             or [m for m in models if any(wanted in re.split(r"[\s-]+", text.casefold()) for text in names(m))]
             or [m for m in models if any(wanted in text.casefold() for text in names(m))])
    if len(found) != 1:
        labels = ", ".join(repr(m.label) for m in models)
        raise UserError(f"--baseline {name!r} names {'no model' if not found else f'{len(found)} models'} among {labels}; "
                        f"give one label, or enough of it to pick one.")
    return [found[0], *(m for m in models if m is not found[0])]


# --------------------------------------------------------------------------- checks and comparison


def check_comparable(base: Scored, other: Scored) -> None:
    if base.template and other.template and base.template != other.template:
        raise UserError(f"{other.label} ({other.source}) was scored with template {other.template!r}, the baseline "
                        f"{base.label} with {base.template!r}: ce under different templates is not comparable.")
    for task in set(base.versions) & set(other.versions):
        a, b = base.versions[task], other.versions[task]
        if a is not None and b is not None and str(a) != str(b):
            raise UserError(f"{task}: suite version {b} in {other.source} against {a} for the baseline; score both with the same suite.")
    mine, theirs = set(base.documents) & set(TASKS.values()), set(other.documents) & set(TASKS.values())
    if mine != theirs:
        raise UserError(f"{other.label} was scored on {sorted(theirs)}, the baseline on {sorted(mine)}: "
                        "compare models scored on the same datasets.")
    for task, docs in base.documents.items():
        if task not in other.documents:
            continue  # a control only one side has: compared only where both have it
        theirs = {d["doc_id"]: d for d in other.documents[task]}
        for d in docs:
            mine = theirs.get(d["doc_id"])
            if mine is None:
                break  # paired.align names the mismatch
            for key in ("doc_hash", "prompt_hash", "target_hash"):
                if d.get(key) and mine.get(key) and d[key] != mine[key]:
                    what = {"doc_hash": "document", "prompt_hash": "prompt (template)", "target_hash": "response"}[key]
                    raise UserError(f"{task} document {d['doc_id']}: its {what} differs between the baseline ({base.source}) and "
                                    f"{other.label} ({other.source}): they were scored on different data or templates.")


def compare(models: list[Scored], *, replicates: int = 10_000, permutations: int = 10_000, seed: int = 0) -> dict:
    """{metric: {label: [Change per dataset and mean]}} of every model against the first."""
    if len(models) < 2:
        raise UserError("compare needs at least two models (the first is the baseline).")
    base = models[0]
    for other in models[1:]:
        check_comparable(base, other)

    def ordered(docs):  # the reference table's order
        return {task: docs[task] for task in TASKS.values() if task in docs}

    out = {metric: {m.label: paired.compare_documents(ordered(base.documents), ordered(m.documents), metric=metric,
                                                      replicates=replicates, permutations=permutations, seed=seed)
                    for m in models[1:]} for metric in ("ce", "bpb")}
    if all(has_controls(base, m) for m in models[1:]):
        out["controls"] = {m.label: controls.compare_controlled(contrast_documents(base), contrast_documents(m), replicates=replicates,
                                                                permutations=permutations, seed=seed) for m in models[1:]}
    return out


def contrast_documents(model: Scored) -> dict[str, list[dict]]:
    """The contrast tasks' rows of a model, in the reference table's order, for the datasets its ppl tasks cover."""
    return {CONTRAST.tasks[key]: model.documents[CONTRAST.tasks[key]] for key, task in TASKS.items()
            if task in model.documents and CONTRAST.tasks[key] in model.documents}


def has_controls(base: Scored, other: Scored) -> bool:
    """Both models were scored with the foils of every dataset they were scored on."""
    datasets = [key for key, task in TASKS.items() if task in base.documents]
    return all(CONTRAST.tasks[key] in m.documents for key in datasets for m in (base, other))


# --------------------------------------------------------------------------- outputs


CONTROL_RULE = ("The verdict reads ce together with its control, the foils (wrong answers scored like the reference), the same way up "
                "and down: **better** when ce falls significantly and the specific change Δlog ce − Δlog ce_foil is significantly below "
                "0 (the reference got cheaper than its foils did); **format shift** when ce falls significantly but the specific change "
                "is not below 0 (the foils got as cheap, or cheaper); **worse** when ce rises significantly and the specific change is "
                "significantly above 0; **format shift (dearer)** when ce rises significantly but the specific change is not above 0; "
                "**relatively better** / **relatively worse** when ce does not move significantly but the specific change is "
                "significantly below / above 0; **no detectable change** otherwise. Δacc "
                "(the reference has the lowest NLL of its document's responses) has its own exact McNemar test and verdict.")
NO_CONTROL = ("No control was scored (these folders hold no dpo_contrast tasks: scored with --no-controls, by an older dpo-align, or "
              "by lm_eval without them), so nothing here can tell a better model from a change of format: the verdicts below read "
              "ce alone.")


def as_json(changes: dict) -> dict:
    """compare.json's and the sweep's comparison.json's changes: ce and bpb alone, and the controlled verdicts where scored."""
    return {metric: (controls.as_json(c) if metric == "controls" else paired.as_json(c)) for metric, c in changes.items()}


def control_section(changes: dict) -> list[str]:
    """The controlled comparison, or the plain statement that there was none."""
    if "controls" not in changes:
        return [f"**{NO_CONTROL}**", ""]
    return ["## Did it get better, or only cheaper? ce beside its control", "", CONTROL_RULE, "",
            controls.markdown(changes["controls"], names=display_name)]


def preference_rows(models: list[Scored]) -> dict[str, dict]:
    """Each model's row of its folder's preference.json (a sweep's held-out preference table), read once per folder:
    {label: {"length_normalised", "reward", "displacement"}}; models whose folder has none are left out."""
    rows, read = {}, {}
    for model in models:
        folder = Path(model.source)
        if folder not in read:
            read[folder] = read_preference_table(folder / "preference.json")
        row = read[folder].get(model.label, read[folder].get(model.key))  # a sweep written before recipe labels: its run's
        if isinstance(row, dict):
            rows[model.label] = row
    return rows


def displacement_rows(models: list[Scored], preference: dict[str, dict] | None = None) -> list[dict]:
    """Likelihood displacement of each compared adapter, where its folder holds held-out preference log-probs (a sweep's
    preference.json): the mean change per token of the chosen and the rejected log-prob against the base, and the
    share of pairs where both fell. A ce that fell while the chosen responses also got less likely is worth knowing.
    ``preference``: ``preference_rows(models)``, where the caller has read it already."""
    preference = preference_rows(models) if preference is None else preference
    rows = []
    for model in models:  # the base model has no displacement; an adapter given as --baseline keeps its own
        moved = (preference.get(model.label) or {}).get("displacement")
        if isinstance(moved, dict) and DISPLACEMENT_KEYS <= moved.keys():
            rows.append({"model": model.label, **moved})
        elif moved is not None:
            warnings.warn(f"{Path(model.source) / 'preference.json'}: the displacement of {model.label!r} lacks "
                          f"{', '.join(sorted(DISPLACEMENT_KEYS - set(moved or {})))}; its row is left out of compare's output. "
                          f"Re-run the sweep (its preference cache is checked) to rewrite the file.", stacklevel=2)
    return rows


DISPLACEMENT_KEYS = {"chosen_per_token", "rejected_per_token", "both_fell", "pairs"}


def read_preference_table(path: Path) -> dict:
    """The per-model table of a sweep's preference.json; {} where the folder has none. A file that is there but cannot
    be read is said, naming it, rather than taken for an absent one: its rows would vanish from compare's output."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8")).get("table", {})
        if not isinstance(table, dict):
            raise ValueError("its 'table' is not an object")
        return table
    except (OSError, ValueError, AttributeError) as err:
        warnings.warn(f"{path}: not a readable preference.json ({err}); the likelihood displacement is left out of compare's "
                      f"output. Re-run the sweep to rewrite it, or delete the file.", stacklevel=3)
        return {}


def displacement_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Likelihood displacement on the held-out pairs (from preference.json)", "",
             "| model | Δ log p per token, chosen | Δ log p per token, rejected | both fell | pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['chosen_per_token']:+.4f} | {r['rejected_per_token']:+.4f} | {100 * r['both_fell']:.1f}% | {r['pairs']} |"
              for r in rows]
    return [*lines, "", "Against the base model; \"both fell\": pairs whose chosen and rejected responses both became less likely.", ""]


def markdown(models: list[Scored], changes: dict, *, replicates: int, permutations: int, displacement: list[dict] = (),
             card: tuple[list[scorecard.Card], bool] | None = None) -> str:
    """compare.md; ``displacement``: ``displacement_rows(models)`` and ``card``: ``scorecard_of(...)``, made once by the
    caller, which also writes them to JSON. With a scorecard (a preference table), it comes first."""
    lines = [f"# {' vs '.join(m.label for m in models[1:])} against {models[0].label}", "",
             f"Paired over documents: bootstrap 95% intervals ({replicates:,} replicates) and permutation p-values "
             f"({permutations:,} permutations, Holm-adjusted across the datasets). Negative change = lower loss.", ""]
    few = sorted({(c.dataset, c.documents) for rows in changes["ce"].values() for c in rows if c.documents < FEW_DOCUMENTS})
    if few:  # a bootstrap over one document has zero width: an interval that says nothing must say so
        lines += [f"**Too few documents for an interval**: {', '.join(f'{display_name(d)} ({n})' for d, n in few)}. A paired "
                  f"bootstrap over fewer than {FEW_DOCUMENTS} documents gives intervals that are too narrow (zero-width with one "
                  "document) and verdicts that cannot be trusted; score more documents (`--limit`).", ""]
    lines += scorecard_section(models, card)
    lines += control_section(changes)
    for metric, title in (("ce", "Cross-entropy (nats per response token), alone"), ("bpb", "Bits per byte, alone")):
        lines += [f"## {title}", "", paired.markdown(changes[metric], metric=metric, names=display_name, verdict="verdict (ce alone)")]
    lines += displacement_section(list(displacement))
    return "\n".join(lines)


def scorecard_section(models: list[Scored], card: tuple[list[scorecard.Card], bool] | None) -> list[str]:
    """The three questions per adapter (scorecard.py), where a sweep's preference table answers two of them."""
    if card is None:
        return []
    table, is_reference = card
    return scorecard.markdown(table, baseline=models[0].label, baseline_is_reference=is_reference)


def scorecard_of(models: list[Scored], changes: dict, preference: dict[str, dict]) -> tuple[list[scorecard.Card], bool] | None:
    """Each adapter's Card and whether the baseline is the base model (only then does the rule pick); None without a
    preference table (``preference_rows(models)``), which answers Q2 and Q3."""
    if not preference:
        return None
    base = models[0].label
    # the pick reads Q1 against the model the adapters started from: the preference table's reference, which has no reward row
    return scorecard.cards(changes, preference, [m.label for m in models[1:]]), base in preference and "reward" not in preference[base]


VERDICT_COLOURS = {"better": "tab:green", "relatively better": "yellowgreen", "format shift": "tab:orange",
                   "format shift (dearer)": "goldenrod", "relatively worse": "lightcoral", "worse": "tab:red"}


def plot(changes: dict, metric: str = "ce") -> bytes:
    """PNG: each model's relative change per dataset, with its 95% interval; 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = changes[metric]
    verdicts = {label: [c.verdict for c in row] for label, row in changes.get("controls", {}).items()}  # the controlled verdict where scored
    datasets = [c.dataset for c in next(iter(rows.values()))]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(datasets) * len(rows)))
    y, ticks, labels = 0, [], []
    for label, row in rows.items():
        for j, c in enumerate(row):
            verdict = verdicts[label][j] if label in verdicts else c.verdict
            color = VERDICT_COLOURS.get(verdict, "tab:gray")
            ax.errorbar(100 * c.relative, y, xerr=[[max(0.0, 100 * (c.relative - c.low))], [max(0.0, 100 * (c.high - c.relative))]], fmt="o",
                        color=color, capsize=3)
            ticks.append(y)
            labels.append(f"{label}: {display_name(c.dataset)}" if len(rows) > 1 else display_name(c.dataset))
            y -= 1
        y -= 0.5
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel(f"{metric} change against the baseline (%)\n95% paired bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    # a legend for the verdicts shown (colour = the controlled verdict where controls were scored, else ce's own)
    shown = {verdicts[label][j] if label in verdicts else c.verdict for label, row in rows.items() for j, c in enumerate(row)}
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=VERDICT_COLOURS.get(v, "tab:gray"), label=v) for v in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(handles) - 1) // 3), 1, 1))  # room for the legend under the axis label
    fig.set_figheight(fig.get_figheight() + 0.4)
    return png_bytes(fig)
