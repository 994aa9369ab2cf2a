"""A job this worker runs for the panel besides training (an evaluation, an export): claim it,
beat while it runs (the reply says whether the user cancelled), run its processes so that a cancel
stops them, and report how it ended. app/services/jobs.py is the panel's side.

A subclass says what the job does (`work`, returning the fields of its finish report) and what
its finish report is (`finish_model`); the claim, the beat, the cancel and the finish are here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from app.settings import Settings, get_settings
from app.wire import EvalClaim, EvalHeartbeat, EvalReply
from workers import artifacts
from workers.process import ManagedProcess
from workers.reporter import AppUnavailable, Reporter
from workers.training import _PRIVATE_ENV, _last_lines

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
FAILURE_TAIL_LINES = 30


class JobFailed(RuntimeError):
    pass


class JobCancelled(RuntimeError):
    pass


def claim_and_run(path: str, claim: EvalClaim, make_job: Callable[[dict[str, Any], Reporter], "WorkerJob"]) -> str:
    """Claim the dispatched job at `path` ("/evaluations/12") and run it; a redelivered task or a
    job the panel ended meanwhile is not claimable (404/409) and does nothing."""
    reporter = Reporter(get_settings(), timeout_s=10.0)
    try:
        try:
            response = reporter.post(f"{path}/claim", json=claim.model_dump(), retry_for_s=60.0)
        except AppUnavailable as error:
            log.warning("%s: claim not delivered (%s)", path, error)
            return "not claimed: panel unavailable"
        if response.status_code in (404, 409):
            log.info("%s not claimed: %s", path, response.json().get("detail"))
            return "not claimable"
        response.raise_for_status()
        return make_job(response.json(), reporter).execute()
    finally:
        reporter.close()


class WorkerJob:
    finish_model: ClassVar[type[BaseModel]]

    def __init__(self, path: str, worker_id: str, settings: Settings, reporter: Reporter, folder: Path,
                 heartbeat_interval_s: float) -> None:
        self.path, self.worker_id, self.settings, self.reporter = path, worker_id, settings, reporter
        self.folder = folder
        self.log_path = folder / "stdout.log"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.cancel = threading.Event()
        self.gone = threading.Event()  # the panel ended the job (409/404)
        self.running = threading.Event()  # set once the job's real work starts

    @property
    def tag(self) -> str:
        return self.path.strip("/").replace("/", " ")

    def work(self) -> dict[str, Any]:
        """Do the job; return the fields of a successful finish report."""
        raise NotImplementedError

    def finish_fields(self) -> dict[str, Any]:
        """Fields every finish report of this kind carries, whatever the outcome."""
        return {}

    def cleanup(self) -> None:
        """After the job, succeeded or not (before the finish report)."""

    # ----------------------------------------------------------------------- the beat
    def _beat_loop(self, stop: threading.Event) -> None:
        beat_reporter = Reporter(self.settings, timeout_s=5.0)
        try:
            while not stop.wait(self.heartbeat_interval_s):
                self._beat(beat_reporter)
        finally:
            beat_reporter.close()

    def _beat(self, reporter: Reporter) -> None:
        body = EvalHeartbeat(worker_id=self.worker_id, status="running" if self.running.is_set() else None)
        try:
            response = reporter.post(f"{self.path}/heartbeat", json=body.model_dump())
        except AppUnavailable as error:
            log.warning("%s: heartbeat not delivered: %s", self.tag, error)
            return
        if response.status_code in (404, 409):
            self.gone.set()
        elif response.status_code == 200 and EvalReply.model_validate(response.json()).cancel:
            self.cancel.set()

    # ----------------------------------------------------------------------- the job
    def execute(self) -> str:
        started = time.monotonic()
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._beat_loop, args=(stop_beat,), daemon=True, name=f"beat-{self.tag}")
        beat.start()
        result: dict[str, Any] = {}
        try:
            self._beat(self.reporter)
            result = self.work()
            outcome, reason = "succeeded", ""
        except JobCancelled:
            outcome, reason = "cancelled", "cancelled by the user"
        except (JobFailed, OSError, AppUnavailable, artifacts.ArtifactTransferError, ValueError, KeyError) as error:
            log.warning("%s failed: %s", self.tag, error)
            outcome, reason = "failed", str(error)
        finally:
            stop_beat.set()
            beat.join(5)
            self.cleanup()
        if self.gone.is_set():
            return "ended by the panel"
        body = self.finish_model(worker_id=self.worker_id, outcome=outcome, reason=reason,
                                 elapsed_s=time.monotonic() - started, **self.finish_fields(), **result)
        try:
            response = self.reporter.post(f"{self.path}/finish", json=body.model_dump(), retry_for_s=300.0)
            if response.status_code != 200:
                log.warning("%s: finish refused (%s): %s", self.tag, response.status_code, response.text)
        except AppUnavailable as error:
            log.error("%s: finish not delivered: %s", self.tag, error)
        return outcome

    def environment(self, gpu_ids: list[int]) -> dict[str, str]:
        """This worker's environment without its secrets, offline, on `gpu_ids` (none: the CPU)."""
        env = {key: value for key, value in os.environ.items() if not _PRIVATE_ENV.match(key)}
        env.pop("FORCE_TORCHRUN", None)
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                    "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))})
        return env

    def run_process(self, command: list[str], env: dict[str, str], what: str) -> None:
        """Run one process of the job to its end; a cancel (or the panel ending the job) stops it."""
        process = ManagedProcess(command, env, self.folder, self.log_path)
        while (code := process.poll()) is None:
            if self.cancel.is_set() or self.gone.is_set():
                process.stop(STOP_GRACE_S, first_signal=signal.SIGTERM)
                raise JobCancelled()
            time.sleep(0.1)
        if code != 0:
            raise JobFailed(f"{what} exited with {code}:\n" + _last_lines(self.log_path, FAILURE_TAIL_LINES))
