"""`tuneboard dataset …`: upload and list datasets through the panel's API (TUNEBOARD_URL,
TUNEBOARD_TOKEN)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli import cli
from app.cli.client import api_client

dataset_cli = typer.Typer(help="Datasets: upload and list.", no_args_is_help=True)
cli.add_typer(dataset_cli, name="dataset")

# A 2 GiB upload plus validation of its tail takes a while on a slow link.
UPLOAD_TIMEOUT_S = 3600.0


@dataset_cli.command("add")
def add(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help=".json, .jsonl or .txt file")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")] = None,
    description: Annotated[str, typer.Option(help="A line saying what the data is.")] = "",
    kind: Annotated[str, typer.Option(help="auto, sft, ranking, kto or pretrain.")] = "auto",
    formatting: Annotated[str, typer.Option("--format", help="auto, alpaca or sharegpt.")] = "auto",
    columns: Annotated[str | None, typer.Option(help='LLaMA-Factory columns as JSON: {"prompt": "q", …}.')] = None,
) -> None:
    """Upload FILE; it is streamed (never read into memory) and validated by the server."""
    fields = {"name": name or "", "description": description, "kind": kind, "formatting": formatting}
    if columns:
        fields["columns"] = columns
    with api_client(timeout=UPLOAD_TIMEOUT_S) as http, open(file, "rb") as stream:
        # httpx sends the text fields before the file, as the server needs.
        dataset = http.post("/api/v1/datasets", data=fields, files={"file": (file.name, stream)}).json()
    typer.echo(f"added dataset {dataset['name']} (id {dataset['id']}): {dataset['row_count']} rows, "
               f"{dataset['kind']} {dataset['formatting']} {dataset['file_kind']}")


@dataset_cli.command("list")
def list_datasets(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    kind: Annotated[str | None, typer.Option(help="Only this kind: sft, ranking, kto or pretrain.")] = None,
) -> None:
    """The registered datasets."""
    with api_client() as http:
        datasets = http.get("/api/v1/datasets", params={"kind": kind} if kind else None).json()
    if as_json:
        typer.echo(json.dumps(datasets, indent=2))
        return
    if not datasets:
        typer.echo("no datasets yet: tuneboard dataset add FILE")
        return
    for d in datasets:
        typer.echo(f"{d['id']:>5}  {d['name']:<40} {d['kind']:<9} {d['formatting']:<9} {d['file_kind']:<6}"
                   f" {d['row_count']:>10} rows")
