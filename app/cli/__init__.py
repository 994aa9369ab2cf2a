"""The `tuneboard` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli.supervisor import Supervisor
from app.settings import get_settings

cli = typer.Typer(help="Tuneboard: fine-tune LLMs with LLaMA-Factory from a browser.", no_args_is_help=True)


def _web_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", host, "--port", str(port), "--timeout-graceful-shutdown", "5",
    ]


def _worker_command(queues: str, concurrency: int, name: str | None) -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-Q", queues, "--pool", "threads", "--concurrency", str(concurrency),
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]
    if name:
        command += ["-n", name]
    return command


@cli.command()
def up(
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless you mean it.")] = "",
    port: Annotated[int, typer.Option()] = 0,
    demo: Annotated[bool, typer.Option(help="Build and register the tiny demo model and dataset.")] = False,
) -> None:
    """The web app and one embedded worker; Ctrl-C stops both and every child they started."""
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    if demo:
        os.environ["TUNEBOARD_DEMO"] = "1"  # the web app installs it at start-up
    if "app_url" not in settings.model_fields_set:  # the embedded worker reports to this very app
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        os.environ["TUNEBOARD_APP_URL"] = f"http://{local}:{port}"
    from workers.celery_app import celery_app, declare_queues

    declare_queues(celery_app)
    supervisor = Supervisor()
    supervisor.start("web", _web_command(host, port))
    supervisor.start("worker", _worker_command("train,serve,default", 4, "embedded@%h"))
    typer.echo(f"Tuneboard is up at http://{host}:{port}  (Ctrl-C stops it)")
    raise typer.Exit(supervisor.wait())


@cli.command()
def web(
    host: Annotated[str, typer.Option()] = "",
    port: Annotated[int, typer.Option()] = 0,
) -> None:
    """Only the web app (workers run elsewhere, against Redis)."""
    settings = get_settings()
    os.execv(sys.executable, _web_command(host or settings.host, port or settings.port))


@cli.command()
def worker(
    broker: Annotated[str | None, typer.Option(help="redis://host:6379/0 of the panel's broker.")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPU indices this worker may use, e.g. 0,1.")] = None,
    queues: Annotated[str, typer.Option(help="Queues to consume.")] = "train,serve,default",
    concurrency: Annotated[int, typer.Option(help="Tasks at once (runs on disjoint GPUs).")] = 4,
    name: Annotated[str | None, typer.Option(help="Worker name; default worker@hostname.")] = None,
) -> None:
    """A worker for a GPU box: trains and serves, reporting to the app over HTTP."""
    if broker:
        os.environ["TUNEBOARD_BROKER_URL"] = broker
    if gpus is not None:
        os.environ["TUNEBOARD_WORKER_GPUS"] = gpus
    os.execv(sys.executable, _worker_command(queues, concurrency, name))


@cli.command("migrate")
def migrate_command() -> None:
    """Apply database migrations (also done at start-up)."""
    from app.db import migrate

    migrate()
    typer.echo("database is at the newest migration")


@cli.command("demo-model")
def demo_model(path: Path) -> None:
    """Build the tiny random Qwen2 model (offline, < 1 MB) into PATH with the training env."""
    from app.demo import build_demo_model

    try:
        typer.echo(build_demo_model(path))
    except subprocess.CalledProcessError as error:
        typer.echo(error.stderr, err=True)
        raise typer.Exit(1) from None


@cli.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
    """Check this machine: OS, GPUs and drivers, CUDA, the training and serving environments, disk."""
    import json

    from workers.doctor import run_doctor

    report = run_doctor(get_settings())
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.as_text())
    raise typer.Exit(1 if report.worst == "error" else 0)


def main() -> None:
    cli()

from app.cli import user  # noqa: E402,F401  (registers the `tuneboard user` commands)
from app.cli import dataset  # noqa: E402,F401  (registers the `tuneboard dataset` commands)
from app.cli import deploy  # noqa: E402,F401  (registers `tuneboard deploy` / `undeploy`)
from app.cli import config  # noqa: E402,F401  (registers the `tuneboard config` commands)
from app.cli import run  # noqa: E402,F401  (registers the `tuneboard run` commands)
