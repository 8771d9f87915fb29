"""The scoring suite, described once: its datasets, the lm-eval task family that scores them, the
family's metrics, and the names tables show.

Read by the tasks (``lm_eval_tasks/``), scoring (``score.evaluate``, ``score.learning_curve``), the
tables, ``compare``, the report and the sweep. A new task family is one ``Family`` entry here and
its YAML files in ``lm_eval_tasks/``. The default template is ``data.templates.DEFAULT_TEMPLATE``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    key: str  # the name used in options, metadata and results (``--dataset winogrande``)
    name: str  # as tables show it
    hub: tuple[str, str | None, str]  # (dataset id, config, split) read when no local file is given


DATASETS: dict[str, Dataset] = {d.key: d for d in (
    Dataset("truthfulqa", "TruthfulQA", ("truthfulqa/truthful_qa", "generation", "validation")),
    Dataset("winogrande", "WinoGrande", ("allenai/winogrande", "winogrande_xl", "validation")),
    Dataset("pku", "PKU (hh-rlhf held-out)", ("PKU-Alignment/processed-hh-rlhf", None, "test")),
)}
MEAN = "mean"  # the row of the suite's mean in every table
MEAN_NAME = "mean of the three"


@dataclass(frozen=True)
class Family:
    """A family of lm-eval tasks: one task per dataset (``{prefix}_{key}``) and a group (``{prefix}_suite``)."""

    prefix: str
    metrics: tuple[str, ...]  # per task, in table order; the group has those that average (no ppl)

    @property
    def group(self) -> str:
        return f"{self.prefix}_suite"

    @property
    def tasks(self) -> dict[str, str]:
        """{dataset key: task name}, in the reference table's order."""
        return {key: f"{self.prefix}_{key}" for key in DATASETS}


# the templated response-only cross-entropy (lm_eval_tasks/dpo_ppl*.yaml)
PPL = Family("dpo_ppl", ("ce", "ppl", "bpb"))
# the same reference beside its foils (lm_eval_tasks/dpo_contrast*.yaml): the control of ce
CONTRAST = Family("dpo_contrast", ("ce", "ce_foil", "acc", "acc_norm"))
FAMILIES = (PPL, CONTRAST)


def display_name(key: str) -> str:
    """How a table names a dataset key, a task of any family, or the mean row."""
    if key == MEAN:
        return MEAN_NAME
    for family in FAMILIES:
        for dataset, task in family.tasks.items():
            if key == task:
                key = dataset
    return DATASETS[key].name if key in DATASETS else key


def document_row(task: str, sample: dict) -> dict:
    """One document of lm-eval's samples as dpo-align keeps it: the reference's NLL, tokens and bytes (and, for a
    contrast task, its foils' sums, whether the reference won, and every response's [nll, tokens, bytes])."""
    row = {"doc_id": sample["doc_id"], "id": sample["doc"]["id"], "nll": sample["ce"][0], "tokens": sample["ce"][1]}
    if task in CONTRAST.tasks.values():
        responses = sample["foils"]
        row |= {"bytes": responses[0][2], "foil_nll": sample["ce_foil"][0], "foil_tokens": sample["ce_foil"][1],
                "foil_bytes": sum(r[2] for r in responses[1:]), "correct": bool(sample["acc"]), "correct_norm": bool(sample["acc_norm"]),
                "responses": responses}
    else:
        row["bytes"] = sample["bpb"][1]
    # lm-eval's hashes of the document, the rendered prompt and the response: compare checks them
    return row | {"doc_hash": sample.get("doc_hash"), "prompt_hash": sample.get("prompt_hash"), "target_hash": sample.get("target_hash")}


def truncation_notes(runs: list[dict]) -> list[str]:
    """One line per model and dataset whose prompts lm-eval cut from the left to fit the model's window (the template's
    header goes first, so those documents are scored in another format): their ce is not the suite's measure."""
    notes = []
    for run in runs:
        for key, row in run["table"].items():
            shares = {what: row.get(field, [0])[0] for what, field in (("references", "truncated"), ("controls", "truncated_controls"))}
            if any(shares.values()):
                n = row.get("n") or 0
                counts = ", ".join(f"{what}: {round(share * n)} of {n}" for what, share in shares.items() if share)
                notes.append(f"{run['label']}, {display_name(key)}: prompts cut from the left to fit the model's context window "
                             f"({counts} documents); their ce is of a prompt without its start (lm_eval_tasks/README.md, truncated).")
    return notes
