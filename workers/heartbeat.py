"""The worker's heartbeat: it registers with the app and reports its GPUs, queues and doctor
report every few seconds, so the Workers page shows it online (and greyed once it stops)."""

from __future__ import annotations

import logging
import socket
import threading

from celery.signals import worker_ready, worker_shutting_down

from app.settings import get_settings
from workers.doctor import run_doctor
from workers.gpus import gpu_stats, worker_gpu_indices
from workers.reporter import AppUnavailable, Reporter

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, worker_id: str, queues: list[str]) -> None:
        self.worker_id = worker_id
        self.queues = queues
        self.settings = get_settings()
        self.gpu_indices = worker_gpu_indices()
        self.reporter = Reporter(self.settings, timeout_s=5.0)
        self._stop = threading.Event()
        self._doctor: dict | None = None
        self._doctor_sent = False
        self._thread = threading.Thread(target=self._loop, name="tuneboard-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        threading.Thread(target=self._refresh_doctor, name="tuneboard-doctor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.reporter.post("/workers/heartbeat", json=self._payload(offline=True), retry_for_s=3)
        except AppUnavailable:
            log.warning("could not tell the app that this worker stops")

    def _refresh_doctor(self) -> None:
        self._doctor = run_doctor(self.settings).as_dict()
        self._doctor_sent = False

    def _payload(self, *, offline: bool = False) -> dict:
        payload = {
            "worker_id": self.worker_id,
            "hostname": socket.gethostname(),
            "queues": self.queues,
            "gpus": [gpu.as_dict() for gpu in gpu_stats(self.gpu_indices)] if self.gpu_indices else [],
            "offline": offline,
        }
        if self._doctor is not None and not self._doctor_sent:
            payload["doctor"] = self._doctor
        return payload

    def _loop(self) -> None:
        while not self._stop.is_set():
            payload = self._payload()
            try:
                response = self.reporter.post("/workers/heartbeat", json=payload, retry_for_s=0)
            except AppUnavailable as error:
                log.warning("heartbeat not delivered: %s", error)
            else:
                if response.status_code == 200:
                    self._doctor_sent = self._doctor_sent or "doctor" in payload
                    if response.json().get("doctor_requested"):
                        threading.Thread(target=self._refresh_doctor, daemon=True).start()
            self._stop.wait(self.settings.heartbeat_interval_s)


_heartbeat: Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender, **_kwargs) -> None:
    global _heartbeat
    queues = sorted(sender.app.amqp.queues.consume_from or [])
    _heartbeat = Heartbeat(sender.hostname, queues)
    _heartbeat.start()


@worker_shutting_down.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
