"""``dpo-align data inspect``: what a set of preference files holds, as the trainer will see it."""

from __future__ import annotations

import numpy as np
import typer

from dpo_align.core.errors import UserError
from dpo_align.core.models import load_tokenizer, resolve_model
from dpo_align.data.pairs import read_pairs, to_dataset

PERCENTILES = (50, 90, 95, 99, 100)


def token_length_table(tokenizer, columns: dict[str, list[str]]) -> str:
    header = "column     " + "".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + "    mean"
    lines = [header]
    for name, texts in columns.items():
        lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
        cells = "".join(f"{int(np.percentile(lengths, p)):>8}" for p in PERCENTILES)
        lines.append(f"{name:<11}{cells}{lengths.mean():>8.1f}")
    return "\n".join(lines)


def inspect_data(paths: list[str], *, model: str, template: str, split: str, skip_bad_rows: bool, example: int) -> None:
    pairs, report = read_pairs(paths, split=split, skip_bad_rows=skip_bad_rows)
    tokenizer = load_tokenizer(resolve_model(model, progress=lambda m: typer.echo(m, err=True)))
    dataset = to_dataset(pairs, template, tokenizer)

    for source in report.sources:
        digest = f"  sha256 {source.sha256}" if source.sha256 else ""
        typer.echo(f"source     {source.name}  ({source.rows} rows){digest}")
    typer.echo(f"rows read  {report.rows_read}")
    typer.echo(f"rows kept  {report.rows_kept}")
    typer.echo("skipped    " + (", ".join(f"{reason}: {n}" for reason, n in report.skipped.most_common()) or "none"))
    for message in report.bad_rows:
        typer.echo(f"  bad row  {message}")

    typer.echo(f"\ntoken lengths ({model}, template {template}; prompt includes the template)")
    typer.echo(token_length_table(tokenizer, {c: list(dataset[c]) for c in ("prompt", "chosen", "rejected")}))

    if not 0 <= example < len(dataset):
        raise UserError(f"--example {example} is out of range: {len(dataset)} pairs were kept.")
    row = dataset[example]
    typer.echo(f"\nexample {example} ({pairs[example].where}), byte-exact between the markers")
    for column in ("prompt", "chosen", "rejected"):
        typer.echo(f"----- {column} (repr: {row[column][:60]!r}{'...' if len(row[column]) > 60 else ''})")
        typer.echo(row[column])
    typer.echo("----- end")
