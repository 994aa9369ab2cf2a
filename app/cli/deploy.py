"""`tuneboard deploy RUN` and `tuneboard undeploy DEP`: serve a run's adapter through the panel's API."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from app.cli import cli
from app.cli.client import api_client

TERMINAL = ("ready", "failed", "stopped")


@cli.command()
def deploy(
    run: Annotated[int, typer.Argument(help="Id of a succeeded run (or a finished run with --checkpoint).")],
    name: Annotated[str | None, typer.Option(help="The `model` name clients send; default: run name and id.")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="A complete checkpoint folder, e.g. checkpoint-100.")] = None,
    backend: Annotated[str, typer.Option(help="vllm, or llamafactory for models vLLM can't serve.")] = "vllm",
    wait: Annotated[bool, typer.Option(help="Wait until it is ready (or failed).")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Deploy a run's LoRA adapter behind the OpenAI-compatible gateway."""
    with api_client() as client:
        body = {"run_id": run, "name": name, "checkpoint": checkpoint, "backend": backend}
        deployment = client.post("/api/v1/deployments", json=body).json()
        typer.echo(f"deployment {deployment['id']} ({deployment['name']}): {deployment['status']}")
        deadline = time.monotonic() + timeout
        while wait and deployment["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(1.0)
            deployment = client.get(f"/api/v1/deployments/{deployment['id']}").json()
    if deployment["status"] == "failed":
        server = deployment.get("server") or {}
        typer.echo(f"failed: {deployment['status_reason']}\n{server.get('log_tail', '')[-2000:]}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{deployment['name']} is {deployment['status']}; call it with model={deployment['name']!r} on /v1")


@cli.command()
def undeploy(dep: Annotated[str, typer.Argument(help="Deployment id or model name.")]) -> None:
    """Stop serving a deployment (its server stops with its last adapter)."""
    with api_client() as client:
        if not dep.isdigit():
            active = client.get("/api/v1/deployments", params={"include_stopped": False}).json()
            match = [d for d in active if d["name"] == dep]
            if not match:
                typer.echo(f"error: no active deployment named {dep}", err=True)
                raise typer.Exit(1)
            dep = str(match[0]["id"])
        deployment = client.delete(f"/api/v1/deployments/{dep}").json()
    typer.echo(f"deployment {deployment['id']} ({deployment['name']}): {deployment['status']}")
