"""The package's layout is a rule, not a habit: each stage imports only core and data, and cli.py and
sweep.py (with eval_run.py) compose the stages (see dpo_align/*/__init__.py)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpo_align"
STAGES = ("core", "data", "train", "score", "report")
ALLOWED = {"core": {"core"}, "data": {"core", "data"}, "train": {"core", "data", "train"},
           "score": {"core", "data", "score"}, "report": {"core", "data", "report"}}


def imported_stages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "dpo_align" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_stage_imports_only_core_data_and_itself():
    crossing = []
    for stage in STAGES:
        for path in sorted((PACKAGE / stage).glob("*.py")):
            wrong = (imported_stages(path) & set(STAGES) | (imported_stages(path) - set(STAGES))) - ALLOWED[stage]
            if wrong:
                crossing.append(f"{path.relative_to(PACKAGE)} imports {', '.join(sorted(wrong))}")
    assert crossing == []


def test_the_rule_sees_a_crossing_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dpo_align.report.html import write_report\nimport dpo_align.sweep\n")
    assert imported_stages(bad) == {"report", "sweep"}


def test_lm_eval_finds_dpo_hf_through_its_plugin_entry_point():
    """pyproject's [project.entry-points."lm_eval.models"] names the class lm-eval registers as dpo-hf."""
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="lm_eval.models", name="dpo-hf")
    cls = entry.load()
    from lm_eval.api.registry import get_model

    assert cls.__name__ == "ResponseOnlyHFLM" and get_model("dpo-hf") is cls
