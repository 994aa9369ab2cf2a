"""Serving tasks on the `serve` queue: start and supervise an inference server (vLLM's OpenAI
server, or `llamafactory-cli api`), load and unload adapters in it, stop it.

The app decides, the worker does: `serve_start` claims the server (a redelivered task gets 409
and does nothing), starts the process, reports ready once `/health` and `/v1/models` answer,
then keeps watching it — a heartbeat every couple of seconds whose reply says whether to stop,
and a `failed` report with the log tail when the process dies on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from celery.signals import worker_shutting_down

from app.settings import Settings, get_settings
from workers.celery_app import SERVE_QUEUE, celery_app
from workers.gpus import worker_gpu_indices
from workers.process import ManagedProcess
from workers.reporter import AppUnavailable, Reporter

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 6000
STOP_GRACE_S = 15.0

# server id → its stop signal, for the servers this worker process supervises.
_stop_events: dict[int, threading.Event] = {}
_worker_stopping = threading.Event()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def server_command(spec: dict[str, Any], port: int, settings: Settings, *, gpu: bool) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one inference server."""
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if spec["backend"] == "llamafactory":
        (adapter,) = spec["adapters"]  # this backend serves one adapter, merged at load
        command = [
            settings.llamafactory_cli, "api",
            "--model_name_or_path", spec["base_model_path"],
            "--adapter_name_or_path", adapter["path"],
            "--finetuning_type", "lora",
            "--infer_backend", "huggingface",
        ]
        if spec.get("template"):
            command += ["--template", spec["template"]]
        # Its API_HOST defaults to 0.0.0.0: bind to loopback, the gateway is the way in.
        env |= {"API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": adapter["lora_name"]}
        return command, env
    command = [
        settings.serve_python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec["base_model_path"],
        "--served-model-name", spec["base_name"] or spec["base_model_path"],
        "--enable-lora",
        "--max-lora-rank", str(spec["max_lora_rank"]),
        "--max-model-len", str(spec["max_model_len"]),
        "--host", "127.0.0.1", "--port", str(port),
    ]
    if spec["adapters"]:
        command += ["--lora-modules", *(f"{a['lora_name']}={a['path']}" for a in spec["adapters"])]
    if gpu:
        command += ["--gpu-memory-utilization", str(spec["gpu_memory_utilization"])]
    else:
        command += ["--kv-cache-memory-bytes", str(spec["kv_cache_bytes"])]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: starts ~8 s faster on CPU
        env["OMP_NUM_THREADS"] = str(spec["cpu_threads"])
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return command, env


class ServerSupervisor:
    def __init__(self, spec: dict[str, Any], reporter: Reporter, settings: Settings) -> None:
        self.spec = spec
        self.server_id = spec["server_id"]
        self.reporter = reporter
        self.settings = settings
        self.interval = float(spec["heartbeat_interval_s"])
        self.log_path = settings.path("servers", str(self.server_id)) / "server.log"
        self.stop_event = threading.Event()
        self.process: ManagedProcess | None = None

    def _report(self, **report: Any) -> dict[str, Any]:
        """Send a report; the reply says whether to stop (a 409: the app has given up on it)."""
        report.setdefault("log_tail", log_tail(self.log_path))
        retry = 60.0 if report.get("status") else 0.0
        try:
            response = self.reporter.post(f"/servers/{self.server_id}/events", json=report, retry_for_s=retry)
        except AppUnavailable as error:
            log.warning("server %s: report not delivered: %s", self.server_id, error)
            return {"stop": False}
        if response.status_code == 409:
            return {"stop": True}
        return response.json() if response.status_code == 200 else {"stop": False}

    def _stop_process(self) -> None:
        """SIGTERM to the server's group (vLLM stops in ~2 s), SIGKILL after a grace."""
        if self.process is not None and self.process.poll() is None:
            self.process.stop(STOP_GRACE_S, signal.SIGTERM)

    def _is_ready(self, client: httpx.Client, base_url: str) -> bool:
        try:
            if self.spec["backend"] == "vllm" and client.get(f"{base_url}/health").status_code != 200:
                return False
            models = client.get(f"{base_url}/v1/models")
        except httpx.HTTPError:
            return False
        if models.status_code != 200:
            return False
        served = {m.get("id") for m in models.json().get("data", [])}
        return all(a["lora_name"] in served for a in self.spec["adapters"])

    def run(self) -> None:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command, extra_env = server_command(self.spec, port, self.settings, gpu=bool(worker_gpu_indices()))
        log.info("server %s: starting %s", self.server_id, " ".join(command))
        _stop_events[self.server_id] = self.stop_event
        try:
            self.process = ManagedProcess(
                command, {**os.environ, **extra_env}, self.log_path.parent, self.log_path,
                term_grace_s=STOP_GRACE_S,
            )
            self._supervise(base_url)
        finally:
            self._stop_process()
            _stop_events.pop(self.server_id, None)

    def _supervise(self, base_url: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + float(self.spec["ready_timeout_s"])
        ready = False
        next_heartbeat = 0.0
        with httpx.Client(timeout=2.0) as client:
            while True:
                exit_code = self.process.poll()
                if exit_code is not None:
                    state = "while starting" if not ready else "under a live deployment"
                    self._report(status="failed", reason=f"the server exited with code {exit_code} {state}")
                    return
                if self.stop_event.is_set():
                    self._stop_process()
                    reason = "the worker shut down" if _worker_stopping.is_set() else "no adapter left"
                    self._report(status="stopped", reason=reason)
                    return
                if not ready and self._is_ready(client, base_url):
                    ready = True
                    reply = self._report(
                        status="ready", url=base_url, pid=self.process.pid,
                        adapters=[a["lora_name"] for a in self.spec["adapters"]],
                    )
                    next_heartbeat = time.monotonic() + self.interval
                    if reply.get("stop"):
                        self.stop_event.set()
                    continue
                if not ready and time.monotonic() > deadline:
                    self._stop_process()
                    self._report(status="failed", reason=f"not ready after {self.spec['ready_timeout_s']:.0f} s")
                    return
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self.interval
                    if self._report(status=None).get("stop"):
                        self.stop_event.set()
                        continue
                self.stop_event.wait(0.25 if not ready else min(self.interval, 0.5))


@celery_app.task(name="tuneboard.serve_start", queue=SERVE_QUEUE, bind=True)
def serve_start(task, server_id: int) -> None:
    settings = get_settings()
    reporter = Reporter(settings)
    try:
        worker_id = task.request.hostname or socket.gethostname()
        claim = reporter.post(f"/servers/{server_id}/claim", json={"worker_id": worker_id})
        if claim.status_code != 200:
            log.info("server %s not claimed: %s", server_id, claim.text)
            return
        ServerSupervisor(claim.json(), reporter, settings).run()
    finally:
        reporter.close()


@celery_app.task(name="tuneboard.serve_stop", queue=SERVE_QUEUE)
def serve_stop(server_id: int) -> None:
    """Stop at once when this worker process supervises it; otherwise its supervisor learns it
    from its next heartbeat's reply."""
    event = _stop_events.get(server_id)
    if event is not None:
        event.set()


@celery_app.task(name="tuneboard.serve_load_adapter", queue=SERVE_QUEUE)
def serve_load_adapter(deployment_id: int, url: str, lora_name: str, lora_path: str, replace: bool) -> None:
    body = {"lora_name": lora_name, "lora_path": lora_path, "load_inplace": replace}
    try:
        response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120.0)
        outcome = {"status": "ready"} if response.status_code == 200 else {
            "status": "failed", "reason": f"the server refused the adapter ({response.status_code}): {response.text[:2000]}",
        }
    except httpx.HTTPError as error:
        outcome = {"status": "failed", "reason": f"the server did not answer: {error!r}"}
    reporter = Reporter()
    try:
        reply = reporter.post(f"/deployments/{deployment_id}/events", json=outcome)
        if reply.status_code == 409 and outcome["status"] == "ready":
            serve_unload_adapter(deployment_id, url, lora_name)  # undeployed while it loaded
    finally:
        reporter.close()


@celery_app.task(name="tuneboard.serve_unload_adapter", queue=SERVE_QUEUE)
def serve_unload_adapter(deployment_id: int, url: str, lora_name: str) -> None:
    try:
        response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": lora_name}, timeout=60.0)
    except httpx.HTTPError as error:
        log.warning("deployment %s: unload of %s failed: %r", deployment_id, lora_name, error)
        return
    if response.status_code not in (200, 404):  # 404: not loaded, which is what we want
        log.warning("deployment %s: unload of %s: %s %s", deployment_id, lora_name, response.status_code, response.text)


@worker_shutting_down.connect
def _stop_servers_with_the_worker(**_kwargs: Any) -> None:
    """A warm shutdown waits for running tasks: end the supervisors, which stop their servers."""
    _worker_stopping.set()
    for event in list(_stop_events.values()):
        event.set()
