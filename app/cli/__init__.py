"""The `tuneboard` command."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli.supervisor import Supervisor
from app.settings import get_settings
from app.wire import DEFAULT_QUEUE

cli = typer.Typer(help="Tuneboard: fine-tune LLMs with LLaMA-Factory from a browser.", no_args_is_help=True)


def _web_command(host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", host, "--port", str(port), "--timeout-graceful-shutdown", "5",
    ]


def _worker_command(name: str) -> list[str]:
    """A Celery worker named `name`: it consumes the default queue and one of its own (see
    workers/celery_app.py), with a thread for each run and server its capacity allows at once,
    plus two for adapter loads and pings."""
    from workers.gpus import worker_gpu_indices
    from workers.heartbeat import cpu_train_slots

    settings = get_settings()
    gpus = worker_gpu_indices()
    concurrency = len(gpus) + cpu_train_slots(settings, gpus) + settings.worker_serve_slots + 2
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-Q", DEFAULT_QUEUE, "--pool", "threads", "--concurrency", str(concurrency),
        "--loglevel", "INFO", "--without-gossip", "--without-mingle", "-n", name,
    ]


@cli.command()
def up(
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless you mean it.")] = "",
    port: Annotated[int, typer.Option()] = 0,
    demo: Annotated[bool, typer.Option(help="Build and register the tiny demo model and dataset.")] = False,
) -> None:
    """The web app and one embedded worker (started again if it dies); Ctrl-C stops both and
    every child they started."""
    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    if demo:
        os.environ["TUNEBOARD_DEMO"] = "1"  # the web app installs it at start-up
    if "app_url" not in settings.model_fields_set:  # the embedded worker reports to this very app
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        os.environ["TUNEBOARD_APP_URL"] = f"http://{local}:{port}"
    from workers.celery_app import celery_app, declare_queues

    worker_name = f"embedded@{socket.gethostname()}"
    declare_queues(celery_app, [worker_name])
    supervisor = Supervisor()
    supervisor.start("web", _web_command(host, port))
    supervisor.start("worker", _worker_command(worker_name), restart=True)
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
    gpus: Annotated[str | None, typer.Option(help="GPU indices this worker may use, e.g. 0,1, or none.")] = None,
    cpu_slots: Annotated[int | None, typer.Option(help="Runs on the CPU at once (default 1 without GPUs, else 0).")] = None,
    serve_slots: Annotated[int | None, typer.Option(help="Inference servers at once (0: this worker never serves).")] = None,
    advertise_host: Annotated[str | None, typer.Option(help="Address the panel reaches this worker's servers at.")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name; default worker@hostname.")] = None,
) -> None:
    """A worker for a GPU box: trains and serves what the panel dispatches to it, reporting to
    the panel over HTTP."""
    options = {"BROKER_URL": broker, "WORKER_GPUS": gpus, "WORKER_CPU_SLOTS": cpu_slots,
               "WORKER_SERVE_SLOTS": serve_slots, "ADVERTISE_HOST": advertise_host}
    os.environ.update({f"TUNEBOARD_{key}": str(value) for key, value in options.items() if value is not None})
    get_settings.cache_clear()
    os.execv(sys.executable, _worker_command(name or f"worker@{socket.gethostname()}"))


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
    from workers.train_env import TrainEnvError

    try:
        typer.echo(build_demo_model(path))
    except TrainEnvError as error:
        typer.echo(str(error), err=True)
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
