"""``dpo-align report``: one self-contained HTML page, and the same content as Markdown, for a run or a sweep.

A *run* folder (``dpo-align train``) gives: the configuration and manifest summary, the
training curves and a few generations of the base model beside the adapter. A *sweep*
folder (``dpo-align sweep -o``) gives: the result table with standard errors, the paired
comparison with the baseline (intervals, p-values, verdicts), the held-out preference
accuracies, the learning curve, the training curves of every run, and generations of the
base model beside each adapter.

The page is built from a list of blocks (heading, paragraph, table, image, code), rendered
once to Markdown (images as PNG files beside it) and once to HTML (images inlined as data
URIs, no scripts, no external resources), so the two always hold the same content.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dpo_align.core.files import atomic_write_bytes, atomic_write_text
from dpo_align.data.suite import DATASETS, MEAN, display_name
from dpo_align.data.templates import DEFAULT_TEMPLATE
from dpo_align.report import scorecard


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name in the Markdown version
    png: bytes
    caption: str


@dataclass
class Code:
    text: str


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _throughput(t: dict | None) -> str:
    if not t or not t.get("tokens_per_s"):
        return "n/a (not recorded by the version that trained it)"
    return f"{t['tokens_per_s']:,.0f} tokens/s, MFU {100 * t['mfu']:.2f}% (6N FLOPs per token; peak: {t['peak_source']})"


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _bold(text: str) -> str:
    """Markdown's **strong** as <b> (the paragraphs are written once, for both renderings)."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _cell(pair) -> str:
    value, stderr = pair
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f} ± n/a"


def _images(folder: Path, prefix: str, caption: str) -> list[Image]:
    return [Image(f"{prefix}-{p.name}", p.read_bytes(), f"{caption}: {p.stem.replace('_', ' ')}") for p in sorted(folder.glob("*.png"))]




def generation_blocks(rows: list[dict], settings: str) -> list:
    blocks = [Heading("Generations, side by side"), Para(settings)]
    for i, row in enumerate(rows, start=1):
        labels = list(row["responses"])
        blocks.append(Table(["prompt", *labels],
                            [[f"{i}. {row['prompt']}"] + [row["responses"][label] or "(empty)" for label in labels]]))
    return blocks


# --------------------------------------------------------------------------- a training run


def run_blocks(folder: Path, generations: int = 3, generate=None, progress=print) -> list:
    manifest = _read_json(folder / "manifest.json") or {}
    config_text = (folder / "config.yaml").read_text(encoding="utf-8") if (folder / "config.yaml").is_file() else ""
    import yaml

    config = yaml.safe_load(config_text) or {}
    blocks = [Heading(f"dpo-align run: {folder.name}", 1)]
    status = manifest.get("status", "unfinished (no manifest.json yet)")
    data = manifest.get("data", {})
    summary = [
        ["status", status], ["model", _fmt(config.get("model"))], ["data", ", ".join(config.get("data", []))],
        ["pairs trained on", _fmt(manifest.get("pairs_trained_on"))], ["optimizer steps", _fmt(manifest.get("global_steps"))],
        # the learning rate as written (1e-05), never a fixed-point 0.0000
        ["learning rate", str(config.get("learning_rate"))], ["beta / loss", f"{config.get('beta')} / {config.get('loss_type')}"],
        ["epochs / batch", f"{config.get('epochs')} / {config.get('batch_size')}"], ["template", _fmt(config.get("template"))],
        ["precision / device", f"{manifest.get('precision')} / {manifest.get('device')}"],
        ["wall time", f"{manifest.get('wall_time_s')} s"], ["rows read / kept", f"{data.get('rows_read')} / {data.get('rows_kept')}"],
        ["throughput (run mean)", _throughput(manifest.get("throughput"))],
        ["resumed", f"from {manifest['resumed_from']}: the losses logged after it start new running means" if manifest.get("resumed_from")
         else "no"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())],
        ["git commit", _fmt(manifest.get("git_commit"))],
    ]
    blocks += [Heading("Summary"), Table(["", ""], summary)]
    finals = [(name, row) for name, row in (("train (last logged step)", manifest.get("final_train")),
                                            ("held-out (last evaluation)", manifest.get("final_eval"))) if row]
    if finals:
        keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]
        rows = [[name] + [_fmt(row.get(k, row.get("eval_" + k))) for k in keys] for name, row in finals]
        blocks += [Heading("Final DPO statistics"), Table(["", *keys], rows)]
    blocks += [Heading("Training curves")] + (_images(folder / "plots", "curve", "Training curve") or [Para("No curves yet.")])
    if generate and generations and manifest and (folder / "adapter_model.safetensors").is_file():
        from dpo_align.core.models import resolve_model

        base = resolve_model(config.get("model"), progress=progress)
        rows = generate(folder, base, [str(folder)], config.get("template", DEFAULT_TEMPLATE), generations, progress)
        blocks += generation_blocks(rows, f"Greedy, at most 64 new tokens, template `{config.get('template', DEFAULT_TEMPLATE)}`; "
                                          "default prompts are hh-rlhf held-out first turns.")
    blocks += [Heading("Configuration"), Code(config_text or "(no config.yaml)")]
    return blocks


# --------------------------------------------------------------------------- a sweep


def control_blocks(comparison: dict) -> list:
    """The controlled verdicts (ce beside its foils), or the plain statement that no control was scored."""
    from dpo_align.report.compare import CONTROL_RULE, NO_CONTROL

    if "controls" not in comparison:
        return [Heading("Did it get better, or only cheaper?"), Para(NO_CONTROL)]

    def pct(change):
        return f"{100 * change['relative']:+.2f}% [{100 * change['low']:+.2f}, {100 * change['high']:+.2f}]"

    rows = [[label, display_name(c["dataset"]), pct(c["ce"]), pct(c["foil"]),
             f"{c['specific']:+.4f} [{c['specific_low']:+.4f}, {c['specific_high']:+.4f}]", _fmt(c.get("specific_p_holm")), c["verdict"],
             f"{100 * c['acc_base']:.1f}% → {100 * c['acc_other']:.1f}%", _fmt(c.get("acc_p_holm")), c["acc_verdict"]]
            for label, changes in comparison["controls"].items() for c in changes]
    return [Heading("Did it get better, or only cheaper? ce beside its control"), Para(CONTROL_RULE),
            Table(["model", "dataset", "Δce [95%]", "Δce_foil [95%]", "specific Δlog ce − Δlog ce_foil [95%]", "p (Holm)", "verdict",
                   "acc", "p (McNemar, Holm)", "acc verdict"], rows)]


def scorecard_blocks(card: dict, png: bytes | None = None) -> list:
    """The sweep's scorecard.json: three answers per adapter, the rule, and its pick (report/scorecard.py); ``png``: the
    folder's scorecard.png, drawn from the JSON where the folder has none."""
    from dpo_align.report import seeds

    table = [scorecard.from_json(c) for c in card.get("cards", [])]
    png = png or (scorecard.plot(table) if table else None)
    over_seeds = seeds.recipes(table) if card.get("reason") else []  # only where the rule picks: against the base model
    return [Heading("Scorecard: did each adapter do the job?"), Table(scorecard.HEADER, [scorecard.cells(c) for c in table]),
            *([Image("scorecard.png", png, "the three questions, each number against its line")] if png else []),
            Para("The rule: " + card.get("rule", "")), *([Para(card["reason"])] if card.get("reason") else []),
            *([Heading(seeds.TITLE), Table(seeds.HEADER, [seeds.cells(r) for r in over_seeds]), Para(seeds.verdict(over_seeds)[2])]
              if over_seeds else [])]


def sweep_blocks(folder: Path, generations: int = 3, generate=None, progress=print) -> list:
    results = _read_json(folder / "results.json") or {}
    settings, models = results.get("settings", {}), results.get("models", [])
    train = settings.get("train", {})
    blocks = [Heading(f"dpo-align sweep: {folder.name}", 1),
              Para(f"Model `{train.get('model')}`, "
                   + ("; ".join(f"{name} {', '.join(map(str, values))}" for name, values in settings["grid"].items()) + ", "
                      if settings.get("grid") else
                      f"learning rates {', '.join(f'{lr:g}' for lr in settings.get('learning_rates', []))}, ")
                   + f"data {', '.join(train.get('data', []))}"
                   + (f" ({train.get('max_pairs')} pairs, {train.get('pair_sample', 'first')})" if train.get("max_pairs") else "")
                   + f", template `{settings.get('template')}`, scored in {settings.get('dtype')}"
                   + (f" with lm-eval model `{settings['lm_eval_model']}`." if settings.get("lm_eval_model") else "."))]
    if models:
        keys = [k for k in (*DATASETS, MEAN) if k in models[0]["table"]]
        for metric, title in (("ce", "Cross-entropy (nats per response token; lower is better; ± standard error)"),
                              ("bpb", "Bits per byte (lower is better)")):
            rows = [[display_name(k)] + [_cell(m["table"][k][metric]) if k in m["table"] else "" for m in models] for k in keys]
            blocks += [Heading(title), Table(["dataset"] + [m["label"] for m in models], rows)]
    comparison = _read_json(folder / "comparison.json")
    if comparison is None and len(models) > 1:  # a folder written before sweeps wrote comparison.json
        from dpo_align.report import compare

        changes = compare.compare(compare.load([str(folder)]))
        comparison = compare.as_json(changes)
        comparison_png = compare.plot(changes)
    else:
        comparison_png = (folder / "comparison.png").read_bytes() if (folder / "comparison.png").is_file() else None
    card = _read_json(folder / "scorecard.json")
    if card:
        blocks += scorecard_blocks(card, (folder / "scorecard.png").read_bytes() if (folder / "scorecard.png").is_file() else None)
    if comparison:
        blocks += control_blocks(comparison)
        rows = [[label, display_name(c["dataset"]), f"{100 * c['relative']:+.2f}%",
                 f"[{100 * c['low']:+.2f}%, {100 * c['high']:+.2f}%]", _fmt(c.get("p_holm")), c["verdict"]]
                for label, changes in comparison["ce"].items() for c in changes]
        blocks += [Heading("Against the baseline (ce alone, paired over documents)"),
                   Table(["model", "dataset", "change", "95% interval (bootstrap)", "p (permutation, Holm)", "verdict (ce alone)"], rows)]
        if comparison_png:
            blocks.append(Image("comparison.png", comparison_png, "ce change against the baseline, 95% intervals"))
    preference = _read_json(folder / "preference.json")
    if preference:
        rows = []
        for label, row in preference["table"].items():
            reward, norm, moved = row.get("reward"), row["length_normalised"], row.get("displacement")
            rows.append([label, f"{100 * reward['accuracy']:.1f}% ± {100 * reward['stderr']:.1f}" if reward else "(reference)",
                         f"{100 * norm['accuracy']:.1f}% ± {100 * norm['stderr']:.1f}",
                         f"{moved['chosen_per_token']:+.4f} / {moved['rejected_per_token']:+.4f}" if moved else "",
                         f"{100 * moved['both_fell']:.1f}%" if moved else ""])
        blocks += [Heading(f"Held-out preference accuracy and likelihood displacement ({preference['pairs']} pairs)"),
                   Table(["model", "implicit-reward accuracy", "length-normalised likelihood accuracy",
                          "Δ log p per token against the base: chosen / rejected", "both fell"], rows)]
    if (folder / "learning-curve.png").is_file():
        curve = _read_json(folder / "learning-curve.json") or {}
        blocks += [Heading(f"Learning curve of {curve.get('run', 'the best run')}"),
                   Image("learning-curve.png", (folder / "learning-curve.png").read_bytes(), "ce change against the base model over training")]
    blocks += [Heading("Training curves")] + (_images(folder / "curves", "curve", "Training curve") or [Para("No curves.")])
    adapters = [m["peft"] for m in models if m.get("peft") and Path(m["peft"]).is_dir()]
    missing = [m["peft"] for m in models if m.get("peft") and not Path(m["peft"]).is_dir()]
    if missing:  # the tables come from results.json; what needs the run folders is said to be missing, not left out quietly
        note = (f"Run folder(s) not found (moved or deleted): {', '.join(missing)}. Their scores above come from results.json; "
                "their generations are left out.")
        progress(f"Warning: {note}")
        blocks.append(Para(note))
    if generate and generations and models and adapters:
        rows = generate(folder, models[0]["pretrained"], adapters, settings.get("template", DEFAULT_TEMPLATE), generations, progress)
        blocks += generation_blocks(rows, "Greedy, at most 64 new tokens; default prompts are hh-rlhf held-out first turns.")
    manifests = sorted((folder / "manifests").glob("*.json"))
    if manifests:
        rows = []
        for path in manifests:
            m = _read_json(path) or {}
            rows.append([path.stem, _fmt(m.get("global_steps")), _fmt(m.get("pairs_trained_on")), _fmt(m.get("wall_time_s")),
                         _fmt((m.get("final_train") or {}).get("loss"))])
        blocks += [Heading("Runs"), Table(["run", "steps", "pairs", "wall time (s)", "final train loss"], rows)]
    return blocks


# --------------------------------------------------------------------------- rendering


def to_markdown(blocks: list) -> tuple[str, dict[str, bytes]]:
    lines, files = [], {}
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Table):
            def esc(text):
                return str(text).replace("|", "\\|").replace("\n", "<br>")

            lines += ["| " + " | ".join(map(esc, b.header)) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(esc, row)) + " |" for row in b.rows] + [""]
        elif isinstance(b, Image):
            files[b.name] = b.png
            lines += [f"![{b.caption}](report-images/{b.name})", ""]
        elif isinstance(b, Code):
            lines += ["```", b.text.rstrip(), "```", ""]
    return "\n".join(lines), files


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; white-space: pre-wrap; }
th { background: #f3f3f3; } img { max-width: 100%; } figure { margin: 0.5em 0 1.5em; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def to_html(blocks: list, title: str) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_bold(html.escape(b.text))}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(b.caption)}\">"
                         f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(folder: Path, output: Path | None = None, *, generations: int = 3, generate=None, progress=print) -> Path:
    """Write OUTPUT (default FOLDER/report.html) and the Markdown beside it (report.md + report-images/).

    ``generate(folder, model_path, adapters, template, count, progress)`` answers ``count`` default prompts
    with the base model and each adapter (``score.generate.report_generations``); without it, or with
    ``generations=0``, the page has no generations."""
    from dpo_align.core.errors import UserError

    folder = Path(folder)
    command = ((_read_json(folder / "results.json") or {}).get("settings") or {}).get("command")
    if command and command != "dpo-align sweep" and not (folder / "manifests").is_dir():
        raise UserError(f"{folder}: results written by `{command}`, not a run or a sweep. `dpo-align report` reads those two; "
                        f"an eval folder's table is {folder / 'table.md'}, and `dpo-align compare` compares eval folders.")
    if (folder / "manifests").is_dir() or ((folder / "results.json").is_file() and not (folder / "config.yaml").is_file()):
        blocks = sweep_blocks(folder, generations, generate, progress)
    elif (folder / "config.yaml").is_file():
        blocks = run_blocks(folder, generations, generate, progress)
    else:
        raise UserError(f"{folder}: neither a training run (config.yaml) nor a sweep output (results.json, manifests/).")
    output = Path(output) if output else folder / "report.html"
    markdown, images = to_markdown(blocks)
    for name, png in images.items():
        atomic_write_bytes(output.parent / "report-images" / name, png)
    atomic_write_text(output.with_suffix(".md"), markdown)
    atomic_write_text(output, to_html(blocks, blocks[0].text))
    return output


def write_report_safely(folder: Path, progress, generations: int = 3, generate=None) -> None:
    """report.html / report.md at the end of a run or sweep; a failure here never fails the run."""
    try:
        progress(f"Report: {write_report(folder, generations=generations, generate=generate, progress=progress)}")
    except Exception as err:  # the results are written; the report can be rebuilt with `dpo-align report`
        progress(f"Warning: the report could not be written ({type(err).__name__}: {err}). Rebuild it with: dpo-align report {folder}")
