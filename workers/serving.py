"""Serving tasks, sent by the panel to this worker's own queue: start and supervise an inference
server (vLLM's OpenAI server, or `llamafactory-cli api`), load and unload adapters in it, stop it.

The panel decides, the worker does: `serve_start` claims the server it was dispatched (a
redelivered task gets 409 and does nothing), fetches the adapters from the artifact store into a
cache keyed by content, starts the process on this worker's advertised address behind the
server's secret (vLLM's --api-key), reports ready once `/health` and `/v1/models` answer, then
keeps watching it: a heartbeat every couple of seconds whose reply says whether to stop, and a
`failed` report with the log tail when the process dies on its own.
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
from app.wire import (
    LOAD_ADAPTER_TASK,
    SERVE_START_TASK,
    SERVE_STOP_TASK,
    UNLOAD_ADAPTER_TASK,
    AdapterLoadTask,
    AdapterReport,
    AdapterSpec,
    AdapterUnloadTask,
    ServerClaim,
    ServerReply,
    ServerReport,
    ServerSpec,
    ServerStopTask,
    ServeStartTask,
)
from workers import artifacts
from workers.celery_app import celery_app
from workers.heartbeat import INSTANCE_ID, advertise_host
from workers.process import ManagedProcess
from workers.reporter import AppUnavailable, Reporter

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 6000
STOP_GRACE_S = 15.0

# server id → its supervisor, for the servers this worker process runs.
_supervisors: dict[int, "ServerSupervisor"] = {}
_worker_stopping = threading.Event()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def server_command(
    spec: ServerSpec, adapter_paths: dict[str, Path], host: str, port: int, settings: Settings,
) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one inference server, listening on `host`
    (an address the panel reaches) behind the server's secret."""
    env = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if spec.gpu_ids:
        # nvidia-smi / NVML number GPUs in PCI order; make CUDA agree with them.
        env |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.gpu_ids))}
    if spec.backend == "llamafactory":
        (adapter,) = spec.adapters  # this backend serves one adapter, merged at load
        command = [
            settings.llamafactory_cli, "api",
            "--model_name_or_path", spec.base_model_path,
            "--adapter_name_or_path", str(adapter_paths[adapter.lora_name]),
            "--finetuning_type", "lora",
            "--infer_backend", "huggingface",
        ]
        if spec.template:
            command += ["--template", spec.template]
        env |= {"API_HOST": host, "API_PORT": str(port), "API_MODEL_NAME": adapter.lora_name,
                "API_KEY": spec.api_key}
        return command, env
    command = [
        settings.serve_python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.base_model_path,
        "--served-model-name", spec.base_name or spec.base_model_path,
        "--enable-lora",
        "--max-lora-rank", str(spec.max_lora_rank),
        "--max-model-len", str(spec.max_model_len),
        "--host", host, "--port", str(port),
    ]
    if spec.adapters:
        command += ["--lora-modules", *(f"{a.lora_name}={adapter_paths[a.lora_name]}" for a in spec.adapters)]
    if spec.gpu_ids:
        command += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    else:
        command += ["--kv-cache-memory-bytes", spec.kv_cache_bytes]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: starts ~8 s faster on CPU
        env["OMP_NUM_THREADS"] = str(spec.cpu_threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # The secret is passed in the environment, not on the command line other users can read.
    env["VLLM_API_KEY"] = spec.api_key
    return command, env


class ServerSupervisor:
    def __init__(self, spec: ServerSpec, reporter: Reporter, settings: Settings) -> None:
        self.spec = spec
        self.server_id = spec.server_id
        self.reporter = reporter
        self.settings = settings
        self.interval = spec.heartbeat_interval_s
        self.log_path = settings.path("servers", str(self.server_id)) / "server.log"
        self.stop_event = threading.Event()
        self.process: ManagedProcess | None = None
        self.url = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.spec.api_key}"}

    def _report(self, report: ServerReport, reporter: Reporter | None = None) -> ServerReply:
        """Send a report; the reply says whether to stop (a 409: the panel has given up on it)."""
        if report.log_tail is None:
            report.log_tail = log_tail(self.log_path)
        retry = 60.0 if report.status else 0.0
        try:
            response = (reporter or self.reporter).post(f"/servers/{self.server_id}/events",
                                                        json=report.model_dump(), retry_for_s=retry)
        except AppUnavailable as error:
            log.warning("server %s: report not delivered: %s", self.server_id, error)
            return ServerReply()
        if response.status_code == 409:
            return ServerReply(stop=True)
        return ServerReply.model_validate(response.json()) if response.status_code == 200 else ServerReply()

    def _stop_process(self) -> None:
        """SIGTERM to the server's group (vLLM stops in ~2 s), SIGKILL after a grace."""
        if self.process is not None and self.process.poll() is None:
            self.process.stop(STOP_GRACE_S, signal.SIGTERM)

    def _is_ready(self, client: httpx.Client) -> bool:
        try:
            if self.spec.backend == "vllm" and client.get(f"{self.url}/health").status_code != 200:
                return False
            models = client.get(f"{self.url}/v1/models", headers=self.headers)
        except httpx.HTTPError:
            return False
        if models.status_code != 200:
            return False
        served = {m.get("id") for m in models.json().get("data", [])}
        return all(a.lora_name in served for a in self.spec.adapters)

    def run(self) -> None:
        _supervisors[self.server_id] = self
        try:
            try:
                adapter_paths = self._fetch_adapters()
            except Exception as error:
                log.exception("server %s: could not fetch its adapters", self.server_id)
                self._report(ServerReport(status="failed", reason=f"could not fetch the adapters: {error}"))
                return
            if self.stop_event.is_set():  # undeployed (or the worker stops) while it fetched
                reason = "the worker shut down" if _worker_stopping.is_set() else "no adapter left"
                self._report(ServerReport(status="stopped", reason=reason))
                return
            host = advertise_host(self.settings)
            try:
                # An advertised address this machine does not have fails here (EADDRNOTAVAIL).
                port = free_port(host)
                self.url = f"http://{host}:{port}"
                command, extra_env = server_command(self.spec, adapter_paths, host, port, self.settings)
                log.info("server %s: starting %s", self.server_id, " ".join(command))
                self.process = ManagedProcess(
                    command, {**os.environ, **extra_env}, self.log_path.parent, self.log_path,
                    term_grace_s=STOP_GRACE_S,
                )
            except Exception as error:
                # Said to the panel, which would otherwise wait for the silent-server sweep and
                # blame a worker that is alive.
                log.exception("server %s: could not start", self.server_id)
                self._report(ServerReport(status="failed", reason=f"could not start the server on {host}: {error!r}"))
                return
            self._supervise()
        finally:
            self._stop_process()
            _supervisors.pop(self.server_id, None)

    def _fetch_adapters(self) -> dict[str, Path]:
        """The adapters in this worker's cache, heartbeating meanwhile: fetching a large adapter
        from a remote panel can outlast the panel's heartbeat timeout, which would fail the server
        as silent."""
        done = threading.Event()
        beat_reporter = Reporter(self.settings)  # its own connection, beside the downloads

        def beat() -> None:
            while not done.wait(self.interval):
                if self._report(ServerReport(), beat_reporter).stop:
                    self.stop_event.set()

        beating = threading.Thread(target=beat, name=f"server-{self.server_id}-fetch-heartbeat", daemon=True)
        beating.start()
        try:
            return {a.lora_name: fetch_adapter(self.reporter, a, self.settings) for a in self.spec.adapters}
        finally:
            done.set()
            beating.join()
            beat_reporter.close()

    def _supervise(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.spec.ready_timeout_s
        ready = False
        next_heartbeat = 0.0
        with httpx.Client(timeout=2.0) as client:
            while True:
                exit_code = self.process.poll()
                if exit_code is not None:
                    state = "while starting" if not ready else "under a live deployment"
                    self._report(ServerReport(status="failed", reason=f"the server exited with code {exit_code} {state}"))
                    return
                if self.stop_event.is_set():
                    self._stop_process()
                    reason = "the worker shut down" if _worker_stopping.is_set() else "no adapter left"
                    self._report(ServerReport(status="stopped", reason=reason))
                    return
                if not ready and self._is_ready(client):
                    ready = True
                    reply = self._report(ServerReport(
                        status="ready", url=self.url, pid=self.process.pid,
                        adapters=[a.lora_name for a in self.spec.adapters],
                    ))
                    next_heartbeat = time.monotonic() + self.interval
                    if reply.stop:
                        self.stop_event.set()
                    continue
                if not ready and time.monotonic() > deadline:
                    self._stop_process()
                    self._report(ServerReport(status="failed", reason=f"not ready after {self.spec.ready_timeout_s:.0f} s"))
                    return
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self.interval
                    if self._report(ServerReport()).stop:
                        self.stop_event.set()
                        continue
                self.stop_event.wait(0.25 if not ready else min(self.interval, 0.5))


def fetch_adapter(reporter: Reporter, adapter: AdapterSpec, settings: Settings) -> Path:
    """The adapter's folder in this worker's cache (keyed by its content), fetched if missing."""
    return artifacts.fetch_manifest(reporter, adapter.manifest, settings.path("cache"))


@celery_app.task(name=SERVE_START_TASK, bind=True)
def serve_start(self, task: dict[str, Any]) -> None:
    start = ServeStartTask.model_validate(task)
    settings = get_settings()
    reporter = Reporter(settings)
    try:
        worker_id = self.request.hostname or socket.gethostname()
        claim = ServerClaim(worker_id=worker_id, dispatch_id=start.dispatch_id, instance_id=INSTANCE_ID)
        response = reporter.post(f"/servers/{start.server_id}/claim", json=claim.model_dump())
        if response.status_code != 200:
            log.info("server %s not claimed: %s", start.server_id, response.text)
            return
        ServerSupervisor(ServerSpec.model_validate(response.json()), reporter, settings).run()
    finally:
        reporter.close()


@celery_app.task(name=SERVE_STOP_TASK)
def serve_stop(task: dict[str, Any]) -> None:
    """Stop at once when this worker process supervises it; otherwise its supervisor learns it
    from its next heartbeat's reply."""
    supervisor = _supervisors.get(ServerStopTask.model_validate(task).server_id)
    if supervisor is not None:
        supervisor.stop_event.set()


@celery_app.task(name=LOAD_ADAPTER_TASK)
def serve_load_adapter(task: dict[str, Any]) -> None:
    load = AdapterLoadTask.model_validate(task)
    adapter = load.adapter
    settings = get_settings()
    reporter = Reporter(settings)
    try:
        supervisor = _supervisors.get(load.server_id)
        if supervisor is None or not supervisor.url:
            outcome = AdapterReport(status="failed", reason=f"server {load.server_id} does not run on this worker")
        else:
            outcome = _load(supervisor, adapter, reporter, settings, replace=load.replace)
        reply = reporter.post(f"/deployments/{adapter.deployment_id}/events", json=outcome.model_dump())
        if reply.status_code == 409 and outcome.status == "ready" and supervisor is not None:
            _unload(supervisor, adapter.lora_name)  # undeployed while it loaded
    finally:
        reporter.close()


def _load(supervisor: ServerSupervisor, adapter: AdapterSpec, reporter: Reporter, settings: Settings, *,
          replace: bool) -> AdapterReport:
    try:
        path = fetch_adapter(reporter, adapter, settings)
    except Exception as error:
        return AdapterReport(status="failed", reason=f"could not fetch the adapter: {error}")
    body = {"lora_name": adapter.lora_name, "lora_path": str(path), "load_inplace": replace}
    try:
        response = httpx.post(f"{supervisor.url}/v1/load_lora_adapter", json=body, headers=supervisor.headers,
                              timeout=120.0)
    except httpx.HTTPError as error:
        return AdapterReport(status="failed", reason=f"the server did not answer: {error!r}")
    if response.status_code == 200:
        return AdapterReport(status="ready")
    return AdapterReport(status="failed",
                         reason=f"the server refused the adapter ({response.status_code}): {response.text[:2000]}")


@celery_app.task(name=UNLOAD_ADAPTER_TASK)
def serve_unload_adapter(task: dict[str, Any]) -> None:
    unload = AdapterUnloadTask.model_validate(task)
    supervisor = _supervisors.get(unload.server_id)
    if supervisor is not None and supervisor.url:
        _unload(supervisor, unload.lora_name)


def _unload(supervisor: ServerSupervisor, lora_name: str) -> None:
    try:
        response = httpx.post(f"{supervisor.url}/v1/unload_lora_adapter", json={"lora_name": lora_name},
                              headers=supervisor.headers, timeout=60.0)
    except httpx.HTTPError as error:
        log.warning("server %s: unload of %s failed: %r", supervisor.server_id, lora_name, error)
        return
    if response.status_code not in (200, 404):  # 404: not loaded, which is what we want
        log.warning("server %s: unload of %s: %s %s", supervisor.server_id, lora_name, response.status_code,
                    response.text)


@worker_shutting_down.connect
def _stop_servers_with_the_worker(**_kwargs: Any) -> None:
    """A warm shutdown waits for running tasks: end the supervisors, which stop their servers."""
    _worker_stopping.set()
    for supervisor in list(_supervisors.values()):
        supervisor.stop_event.set()
