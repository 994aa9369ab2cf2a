"""The worker's heartbeat: it registers with the panel and advertises, every few seconds, its GPUs,
its CPU training and serving slots, the registered models it holds, the address its servers
listen on and its doctor report. The panel schedules against that (and greys the worker out once
it stops)."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from celery.signals import worker_ready, worker_shutting_down

from app.settings import Settings, get_settings
from app.wire import GpuInfo, Heartbeat, HeartbeatReply, ModelRef, model_fingerprint
from workers import artifacts
from workers.doctor import run_doctor
from workers.gpus import gpu_stats, worker_gpu_indices
from workers.reporter import AppUnavailable, Reporter
from workers.training import active_run_ids

log = logging.getLogger(__name__)

# New at each start of this process: the panel tells a restarted worker from a live one by it.
INSTANCE_ID = uuid.uuid4().hex
# The artifact cache's content goes with every this-many heartbeats (the first one included).
CACHE_REPORT_EVERY = 12


def advertise_host(settings: Settings) -> str:
    """TUNEBOARD_ADVERTISE_HOST, else 127.0.0.1 when the panel is on this machine, else the
    address of this machine's interface on the route to the panel (a UDP socket's connect
    picks it without sending anything)."""
    if settings.advertise_host:
        return settings.advertise_host
    parts = urlsplit(settings.app_url)
    host = parts.hostname or "127.0.0.1"
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass  # a name: resolve it below
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, parts.port or 80))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def cpu_train_slots(settings: Settings, gpu_indices: list[int]) -> int:
    if settings.worker_cpu_slots is not None:
        return settings.worker_cpu_slots
    return 0 if gpu_indices else 1


class HeartbeatSender:
    def __init__(self, worker_id: str, queues: list[str]) -> None:
        self.worker_id = worker_id
        self.queues = queues
        self.settings = get_settings()
        self.gpu_indices = worker_gpu_indices()
        self.advertise_host = advertise_host(self.settings)
        self.reporter = Reporter(self.settings, timeout_s=5.0)
        self._registered_models: list[ModelRef] = []
        self._stop = threading.Event()
        self._doctor: dict | None = None
        self._doctor_sent = False
        self._beats = 0
        self._thread = threading.Thread(target=self._loop, name="tuneboard-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._refresh_doctor, name="tuneboard-doctor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.reporter.post("/workers/heartbeat", json=self._payload(offline=True).model_dump(), retry_for_s=3)
        except AppUnavailable:
            log.warning("could not tell the panel that this worker stops")

    def _refresh_doctor(self) -> None:
        self._doctor = run_doctor(self.settings).as_dict()
        self._doctor_sent = False

    def _models_held(self) -> dict[str, str]:
        """The registered model folders this machine has, read as the panel reads them."""
        held = {}
        for model in self._registered_models:
            fingerprint = model_fingerprint(Path(model.path))
            if fingerprint is not None:
                held[model.path] = fingerprint
        return held

    def _local_runs(self) -> list[int]:
        runs = self.settings.resolved_data_dir / "runs"
        return sorted(int(p.name) for p in runs.iterdir() if p.name.isdigit()) if runs.is_dir() else []

    def _payload(self, *, offline: bool = False) -> Heartbeat:
        gpus = gpu_stats(self.gpu_indices) if self.gpu_indices else []
        cached_blobs = cached_folders = None
        if self._beats % CACHE_REPORT_EVERY == 0:
            cached_blobs, cached_folders = artifacts.cached_content(self.settings.resolved_data_dir / "cache")
        self._beats += 1
        return Heartbeat(
            worker_id=self.worker_id,
            instance_id=INSTANCE_ID,
            hostname=socket.gethostname(),
            advertise_host=self.advertise_host,
            queues=self.queues,
            gpus=[GpuInfo(**gpu.as_dict()) for gpu in gpus],
            cpu_train_slots=cpu_train_slots(self.settings, self.gpu_indices),
            serve_slots=self.settings.worker_serve_slots,
            models=self._models_held(),
            local_runs=self._local_runs(),
            cached_blobs=cached_blobs,
            cached_folders=cached_folders,
            doctor=self._doctor if not self._doctor_sent else None,
            offline=offline,
        )

    def _forget(self, run_ids: list[int]) -> None:
        """Delete the folders of runs the panel no longer has (never one that trains here now)."""
        active = active_run_ids()
        for run_id in run_ids:
            if run_id not in active:
                shutil.rmtree(self.settings.resolved_data_dir / "runs" / str(run_id), ignore_errors=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            payload = self._payload()
            try:
                response = self.reporter.post("/workers/heartbeat", json=payload.model_dump(), retry_for_s=0)
            except AppUnavailable as error:
                log.warning("heartbeat not delivered: %s", error)
            else:
                if response.status_code == 200:
                    reply = HeartbeatReply.model_validate(response.json())
                    self._doctor_sent = self._doctor_sent or payload.doctor is not None
                    models_changed = reply.models != self._registered_models
                    self._registered_models = reply.models
                    self._forget(reply.forget_runs)
                    artifacts.forget_cached(self.settings.resolved_data_dir / "cache", reply.forget_blobs,
                                            reply.forget_folders)
                    if reply.doctor_requested:
                        threading.Thread(target=self._refresh_doctor, daemon=True).start()
                    if models_changed:
                        continue  # say at once which of the newly registered models are here
            self._stop.wait(self.settings.heartbeat_interval_s)


_heartbeat: HeartbeatSender | None = None


@worker_ready.connect
def _start_heartbeat(sender, **_kwargs) -> None:
    global _heartbeat
    queues = sorted(sender.app.amqp.queues.consume_from or [])
    _heartbeat = HeartbeatSender(sender.hostname, queues)
    _heartbeat.start()


@worker_shutting_down.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
