"""`tuneboard run …`: start, list, follow, cancel, resume and retry training runs through the
panel's API (TUNEBOARD_URL, TUNEBOARD_TOKEN)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer

from app.cli import cli
from app.cli.client import PanelClient, api_client

run_cli = typer.Typer(help="Training runs: start, watch, cancel, resume, retry.", no_args_is_help=True)
cli.add_typer(run_cli, name="run")

RECONNECT_DELAY_S = 1.0
RunArg = Annotated[int, typer.Argument(metavar="RUN", help="The run's id.")]


def _config_id(http: PanelClient, ref: str) -> int:
    """A config id, or the newest version of the config with that name."""
    if ref.isdigit():
        return int(ref)
    named = [c for c in http.get("/api/v1/configs").json() if c["name"] == ref]
    if not named:
        typer.echo(f"error: no config named {ref!r} (tuneboard config list)", err=True)
        raise typer.Exit(1)
    return max(named, key=lambda c: c["version"])["id"]


def _summary(run: dict[str, Any]) -> str:
    progress = f"{run['current_step']}/{run['total_steps']}" if run["total_steps"] else "-"
    return f"{run['id']:>5}  {run['status']:<10} {progress:>9}  attempt {run['attempt']}  {run['name']}"


@run_cli.command("start")
def start(
    config: Annotated[str, typer.Argument(metavar="CONFIG", help="A config id or name.")],
    gpus: Annotated[int | None, typer.Option(help="GPUs to use (0: CPU); default: the config's.")] = None,
    name: Annotated[str | None, typer.Option(help="The run's name.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print its log until it ends.")] = False,
) -> None:
    """Queue a run of a config."""
    with api_client() as http:
        body = {"config_id": _config_id(http, config), "name": name, "gpus": gpus}
        # One key per invocation: a retried request never starts a second run.
        run = http.post("/api/v1/runs", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}).json()
        typer.echo(f"run {run['id']} queued: {http.base_url}/runs/{run['id']}")
        if follow:
            raise typer.Exit(_follow(http, run["id"]))


@run_cli.command("list")
def list_runs(
    status: Annotated[str | None, typer.Option(help="Only runs in this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The runs, newest first."""
    with api_client() as http:
        runs = http.get("/api/v1/runs", params={"status": status} if status else None).json()
    if as_json:
        typer.echo(json.dumps(runs, indent=2))
        return
    if not runs:
        typer.echo("no runs yet: tuneboard run start CONFIG")
    for run in runs:
        typer.echo(_summary(run))


@run_cli.command("logs")
def logs(
    run_id: RunArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")] = False,
) -> None:
    """Print a run's log (every attempt); with -f, follow it live."""
    with api_client() as http:
        if follow:
            raise typer.Exit(_follow(http, run_id))
        after = 0
        while page := http.get(f"/api/v1/runs/{run_id}/logs", params={"after_id": after}).json():
            for line in page:
                typer.echo(line["line"])
            after = page[-1]["id"]


def _events(http: PanelClient, run_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The run's events from the start, reconnecting (from the last id) if the connection drops."""
    cursor = 0
    while True:
        try:
            with http.stream("GET", f"/api/v1/runs/{run_id}/events", params={"after": cursor},
                             timeout=httpx.Timeout(30, read=None)) as response:
                kind, data = "message", ""
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        cursor = int(line[3:].strip())
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                    elif not line and data:
                        yield kind, json.loads(data)
                        if kind == "end":
                            return
                        kind, data = "message", ""
        except httpx.TransportError:
            time.sleep(RECONNECT_DELAY_S)


def _follow(http: PanelClient, run_id: int) -> int:
    """Print log lines and status changes until the run ends; 0 if it succeeded."""
    status = ""
    for kind, data in _events(http, run_id):
        if kind == "log":
            typer.echo(data["line"])
        elif kind == "status":
            status = data["status"]
            reason = f": {data['reason']}" if data.get("reason") else ""
            typer.echo(f"[run {run_id} {status}{reason}]", err=True)
    return 0 if status == "succeeded" else 1


def _action(run_id: int, verb: str) -> None:
    with api_client() as http:
        typer.echo(_summary(http.post(f"/api/v1/runs/{run_id}/{verb}").json()))


@run_cli.command("cancel")
def cancel(run_id: RunArg) -> None:
    """Cancel a run (a running one saves its adapter first)."""
    _action(run_id, "cancel")


@run_cli.command("resume")
def resume(run_id: RunArg) -> None:
    """Continue a failed, cancelled or lost run from its latest complete checkpoint."""
    _action(run_id, "resume")


@run_cli.command("retry")
def retry(run_id: RunArg) -> None:
    """Start a failed, cancelled or lost run again from scratch."""
    _action(run_id, "retry")
