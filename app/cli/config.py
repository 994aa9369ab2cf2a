"""`tuneboard config …`: list, export, import and validate training configs through the panel's API
(TUNEBOARD_URL, TUNEBOARD_TOKEN)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli import cli
from app.cli.client import api_client

config_cli = typer.Typer(help="Training configs: list, export and import LLaMA-Factory YAML.", no_args_is_help=True)
cli.add_typer(config_cli, name="config")
# LLaMA-Factory's own checks import it in the training env (~5 s, more on a cold disk or a busy
# machine); so does a panel process's first look at the template names (an import checks them).
TRAINING_ENV_TIMEOUT_S = 180.0


@config_cli.command("list")
def list_configs(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The configs, newest first."""
    with api_client() as http:
        configs = http.get("/api/v1/configs").json()
    if as_json:
        typer.echo(json.dumps(configs, indent=2))
    elif not configs:
        typer.echo("no configs yet: tuneboard config import FILE.yaml, or create one at /configs/new")
    for c in [] if as_json else configs:
        frozen = " frozen" if c["frozen"] else ""
        typer.echo(f"{c['id']:>5}  {c['name']:<40} v{c['version']}{frozen}  gpus={c['gpus']}")


@config_cli.command("export")
def export(config_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Print the YAML `llamafactory-cli train` reads."""
    with api_client() as http:
        typer.echo(http.get(f"/api/v1/configs/{config_id}/yaml").text, nl=False)


@config_cli.command("import")
def import_(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A LLaMA-Factory YAML")],
    name: Annotated[str, typer.Option(help="Config name (default: the file name).")] = "",
) -> None:
    """Import a LLaMA-Factory training YAML."""
    with api_client(timeout=TRAINING_ENV_TIMEOUT_S) as http:
        answer = http.post("/api/v1/configs/import",
                           json={"yaml": file.read_text(encoding="utf-8"), "name": name or file.stem}).json()
    typer.echo(f"imported config {answer['config']['name']} (id {answer['config']['id']})")
    for notice in answer["notices"]:
        typer.echo(f"  note: {notice}")


@config_cli.command("validate")
def validate(config_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Run LLaMA-Factory's own argument checks on a saved config; exit 1 when it is refused."""
    with api_client(timeout=TRAINING_ENV_TIMEOUT_S) as http:
        config = http.get(f"/api/v1/configs/{config_id}").json()
        findings = http.post("/api/v1/configs/validate", json=config).json()
    for error in findings["errors"]:
        typer.echo(f"error: {error['field'] or 'config'}: {error['message']}")
    for warning in findings["warnings"]:
        typer.echo(f"warning: {warning['field'] or 'config'}: {warning['message']}")
    typer.echo("ok: LLaMA-Factory accepts it" if findings["ok"] else "refused")
    raise typer.Exit(0 if findings["ok"] else 1)
