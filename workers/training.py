"""One training attempt on this worker: claim the attempt the panel dispatched here, prepare the
run folder (datasets and, for a resume, the checkpoint come from the panel), run
`llamafactory-cli train` on the GPUs the panel handed out, report what it logs, upload each
complete checkpoint and the final adapter to the artifact store, stop it when asked, report how
it ended.

The panel is the only database writer; everything here goes through the Reporter and the
payloads of app/wire.py. Every report is idempotent there, so anything not acknowledged is kept
and sent again: a metric line is never dropped because the panel was briefly away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from celery.signals import worker_shutting_down

from app.settings import Settings, get_settings
from app.wire import (
    ADAPTER_ARTIFACT,
    CHECKPOINT_COMPLETE_MARKER,
    CHECKPOINT_PATTERN,
    DATASET_DIR_PLACEHOLDER,
    OUTPUT_DIR_PLACEHOLDER,
    RESULT_FILES,
    BatchChoice,
    BatchFallback,
    CheckpointReport,
    ClaimRequest,
    DatasetFile,
    EventsReply,
    EventsRequest,
    FinishRequest,
    Outcome,
    ProbeReport,
    RunSpec,
    TrainTask,
)
from workers import artifacts, train_env
from workers import batching as auto_batch
from workers.gpus import gpu_stats
from workers.log_tail import RunTails, TailBatch
from workers.process import ManagedProcess
from workers.reporter import AppUnavailable, Reporter

log = logging.getLogger(__name__)

TAIL_INTERVAL_S = 0.1
# After a failed report, wait this long before the next try (the process keeps running).
REPORT_BACKOFF_S = 1.0
# Items per events call; a long backlog (the app was away) goes in several calls.
MAX_BATCH = 500
# Stopping on worker shutdown must fit in `tuneboard up`'s own stop timeout (20 s).
SHUTDOWN_GRACE_S = 8.0
# Stopping an attempt the app no longer wants (declared lost, deleted, superseded).
SUPERSEDED_GRACE_S = 5.0
FAILURE_TAIL_LINES = 30
# How often the supervisor looks for newly completed checkpoints to upload.
CHECKPOINT_SCAN_S = 2.0
# Uploads still running when the trainer exits get this long to finish before the finish report.
UPLOAD_DRAIN_S = 1800.0
PLACEHOLDERS = {OUTPUT_DIR_PLACEHOLDER: "__TUNEBOARD_OUTPUT_DIR__", DATASET_DIR_PLACEHOLDER: "__TUNEBOARD_DATASET_DIR__"}
VERSION_PACKAGES = ("llamafactory", "transformers", "peft", "torch")
# The worker's own configuration (its secrets included) is none of the trainer's business.
_PRIVATE_ENV = re.compile(r"^(TUNEBOARD_|VIRTUAL_ENV$|PYTHONPATH$|PYTHONHOME$)")


class PreparationFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- the worker's runs
_active_runs: dict[tuple[int, int], "TrainingRun"] = {}
_active_lock = threading.Lock()
_shutting_down = threading.Event()


def active_run_ids() -> set[int]:
    """The runs this worker trains now (their folders are never forgotten)."""
    with _active_lock:
        return {run_id for run_id, _attempt in _active_runs}


@worker_shutting_down.connect
def _stop_runs_on_shutdown(**_kwargs: Any) -> None:
    """Celery's warm shutdown (SIGTERM, Ctrl-C of `tuneboard up`) waits for the running tasks:
    make them stop their trainers now and report the run cancelled."""
    _shutting_down.set()
    with _active_lock:
        runs = list(_active_runs.values())
    for run in runs:
        run.request_stop("worker shut down", SHUTDOWN_GRACE_S)


# --------------------------------------------------------------------------- entry point
def train(task: TrainTask, *, worker_id: str, instance_id: str, task_id: str) -> str:
    """Claim the dispatched attempt and train it; returns a one-line summary. An attempt that is
    not claimable (redelivered, superseded, cancelled) is left alone; one this worker cannot
    claim now (shutting down, the panel unreachable) is left to the panel, which dispatches it
    again when no claim arrives."""
    if _shutting_down.is_set():
        log.info("run %s attempt %s: not claimed, the worker is shutting down", task.run_id, task.attempt)
        return "not claimed: shutting down"
    settings = get_settings()
    reporter = Reporter(settings, timeout_s=5.0)
    try:
        claimed_at = time.monotonic()
        claim = ClaimRequest(attempt=task.attempt, dispatch_id=task.dispatch_id, worker_id=worker_id,
                             instance_id=instance_id, task_id=task_id, hostname=socket.gethostname())
        try:
            response = reporter.post(f"/runs/{task.run_id}/claim", json=claim.model_dump(), retry_for_s=60.0)
        except AppUnavailable as error:
            log.warning("run %s attempt %s: claim not delivered (%s); the panel dispatches it again",
                        task.run_id, task.attempt, error)
            return "not claimed: panel unavailable"
        if response.status_code in (404, 409):
            log.info("run %s attempt %s not claimed: %s", task.run_id, task.attempt, response.json().get("detail"))
            return "not claimable"
        response.raise_for_status()
        spec = RunSpec.model_validate(response.json())
        run = TrainingRun(spec, worker_id=worker_id, settings=settings, reporter=reporter, claimed_at=claimed_at)
        return run.execute()
    finally:
        reporter.close()


# --------------------------------------------------------------------------- one attempt
@dataclass
class _StopRequest:
    reason: str
    grace_s: float
    asked_at: float


class _Outbox:
    """Reports not yet acknowledged by the app: the latest progress, metric points (one per
    step: later lines of a step override earlier ones, as the app's upsert would) and log lines."""

    def __init__(self) -> None:
        self.status: str | None = "running"
        self.progress: dict[str, Any] | None = None
        self.metrics: dict[int, dict[str, Any]] = {}
        self.logs: list[dict[str, Any]] = []
        self.news = True

    def add(self, batch: TailBatch) -> None:
        if not batch:
            return
        self.news = True
        if batch.progress is not None:
            self.progress = batch.progress
        for point in batch.metrics:
            self.metrics[point["step"]] = {**self.metrics.get(point["step"], {}), **point}
        self.logs += batch.logs

    def take(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "progress": self.progress,
            "metrics": list(self.metrics.values())[:MAX_BATCH],
            "logs": self.logs[:MAX_BATCH],
        }

    def acknowledge(self, sent: dict[str, Any]) -> None:
        self.status = None
        if self.progress is sent["progress"]:
            self.progress = None
        for point in sent["metrics"]:
            if self.metrics.get(point["step"]) is point:
                del self.metrics[point["step"]]
        del self.logs[: len(sent["logs"])]
        self.news = bool(self.metrics or self.logs)

    def drop(self) -> None:
        self.status = self.progress = None
        self.metrics.clear()
        self.logs.clear()
        self.news = False


class CheckpointUploader:
    """Uploads complete checkpoints to the artifact store in the background, one at a time, so
    that the supervisor keeps tailing and reporting while they travel."""

    def __init__(self, run: "TrainingRun") -> None:
        self.run = run
        self.reporter = Reporter(run.settings)
        self.uploaded: set[str] = set()
        self._seen: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"upload-run-{run.run_id}", daemon=True)
        self._thread.start()

    def scan(self) -> None:
        for checkpoint in list_checkpoints(self.run.output_dir):
            if checkpoint.complete and checkpoint.name not in self._seen:
                self._seen.add(checkpoint.name)
                self._queue.put(checkpoint.name)

    def _loop(self) -> None:
        while (name := self._queue.get()) is not None:
            folder = self.run.output_dir / name
            try:
                artifacts.upload_folder(self.reporter, self.run.run_id, self.run.attempt, self.run.worker_id,
                                        folder, name, int(CHECKPOINT_PATTERN.match(name)[1]))
                self.uploaded.add(name)
            except Exception:  # a checkpoint deleted meanwhile (save_total_limit), the panel away
                log.exception("%s: upload of %s failed", self.run.tag, name)

    def drain(self, timeout_s: float) -> None:
        """Upload what is complete now, then wait for the queue to empty."""
        self.scan()
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("%s: checkpoint uploads still running after %.0f s", self.run.tag, timeout_s)
        self.reporter.close()


class TrainingRun:
    def __init__(
        self, spec: RunSpec, *, worker_id: str, settings: Settings, reporter: Reporter, claimed_at: float,
    ) -> None:
        self.spec = spec
        self.run_id = spec.run_id
        self.attempt = spec.attempt
        self.worker_id = worker_id
        self.gpu_ids = spec.gpu_ids
        self.settings = settings
        self.reporter = reporter
        self.heartbeat_interval_s = spec.heartbeat_interval_s
        self.run_dir = settings.path("runs", str(self.run_id))
        self.output_dir = self.run_dir / "output"
        self.stdout_log = self.run_dir / "stdout.log"
        self.process: ManagedProcess | None = None
        self._stop: _StopRequest | None = None
        self._app_gone = False  # the app answered 409: this attempt is over there
        self._next_report_at = 0.0
        self._last_report_at = 0.0
        self._gpu_sample: dict[str, float] = {}
        self._gpu_sampled_at = 0.0
        self._uploader: CheckpointUploader | None = None
        self.timings: dict[str, float] = {"claimed": claimed_at}
        # The automatic micro-batch: the split this attempt trains with (None: the YAML's own).
        self.batch: BatchChoice | None = spec.batch
        self._fell_back = False
        self._launch_offset = 0
        self._checkpoints_at_launch: set[str] = set()

    @property
    def tag(self) -> str:
        return f"run {self.run_id} attempt {self.attempt}"

    def request_stop(self, reason: str, grace_s: float) -> None:
        """Thread-safe: the supervising loop sends the signals. The first reason sticks."""
        if self._stop is None:
            self._stop = _StopRequest(reason, grace_s, time.monotonic())
        elif grace_s < self._stop.grace_s:
            self._stop = _StopRequest(self._stop.reason, grace_s, self._stop.asked_at)

    def execute(self) -> str:
        with _active_lock:
            _active_runs[(self.run_id, self.attempt)] = self
        try:
            if _shutting_down.is_set():
                return self.fail_before_start("worker shut down", outcome="cancelled")
            try:
                command, env = self._prepare()
            except (PreparationFailed, OSError, AppUnavailable) as error:
                return self.fail_before_start(f"could not prepare the run folder: {error}")
            ended = self._choose_batch()
            if ended is not None:
                return ended
            self._launch(command, env)
            self._uploader = CheckpointUploader(self)
            self.timings["started"] = time.monotonic()
            log.info("%s: started %s (pid %s, GPUs %s)", self.tag, " ".join(command), self.process.pid,
                     self.gpu_ids or "none")
            exit_code = self._supervise()
            while self._fall_back(exit_code):  # out of memory in the first steps: once, one size smaller
                self._launch(command, env)
                exit_code = self._supervise()
            self.timings["exited"] = time.monotonic()
            return self._finish(exit_code)
        except Exception:
            log.exception("%s: supervisor failed", self.tag)
            if self.process is not None and self.process.poll() is None:
                self.process.stop(SUPERSEDED_GRACE_S)
            if self._uploader is not None:
                self._uploader.drain(0)
            self._send_finish("failed", None, f"the worker's supervisor failed:\n{traceback.format_exc()}")
            return "failed"
        finally:
            with _active_lock:
                _active_runs.pop((self.run_id, self.attempt), None)

    def fail_before_start(self, reason: str, outcome: str = "failed") -> str:
        log.warning("%s: %s", self.tag, reason)
        self._send_finish(outcome, None, reason)
        return outcome

    # ----------------------------------------------------------------------- preparation
    def _empty_output_dir(self) -> None:
        for child in self.output_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.spec.resume_from_checkpoint:
            # A fresh attempt (a retry) starts from nothing: an earlier attempt's checkpoints on this
            # disk (one half-written when its worker was killed) would be resumed by LLaMA-Factory.
            self._empty_output_dir()
        data_dir = self.run_dir / "data"
        data_dir.mkdir(exist_ok=True)
        local_names = {}
        for dataset in self.spec.datasets:
            local_names[dataset.file_name] = self._fetch_dataset(dataset, data_dir)
        # dataset_dir is the run folder; the files live under data/ (see the contract).
        dataset_info = {
            name: {**entry, "file_name": f"data/{local_names.get(entry.get('file_name'), entry.get('file_name'))}"}
            if "file_name" in entry else entry
            for name, entry in self.spec.dataset_info.items()
        }
        (self.run_dir / "dataset_info.json").write_text(json.dumps(dataset_info, indent=2, ensure_ascii=False))
        config = render_train_yaml(self.spec.train_yaml, output_dir=self.output_dir, dataset_dir=self.run_dir)
        checkpoint = self.spec.resume_from_checkpoint
        if checkpoint:
            checkpoint_dir = self._resume_checkpoint(checkpoint)
            config["resume_from_checkpoint"] = str(checkpoint_dir)
            config["overwrite_output_dir"] = False
        (self.run_dir / "train.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        )
        # Each attempt's log lines are keyed by their offsets in fresh files: the earlier
        # attempt's copies were reported under its own attempt.
        self.stdout_log.unlink(missing_ok=True)
        (self.output_dir / "running_log.txt").unlink(missing_ok=True)
        self.tails = RunTails(self.output_dir, self.stdout_log, resume=bool(checkpoint))
        return [self.settings.llamafactory_cli, "train", "train.yaml"], self._environment()

    def _resume_checkpoint(self, name: str) -> Path:
        """The checkpoint to resume from: on this disk when this worker saved it, else fetched
        from the artifact store into the output folder."""
        folder = self.output_dir / name
        if not CHECKPOINT_PATTERN.match(name):
            raise PreparationFailed(f"{name!r} is not a checkpoint name")
        if (folder / CHECKPOINT_COMPLETE_MARKER).is_file():
            return folder
        if self.spec.resume_manifest is None:
            raise PreparationFailed(f"no complete checkpoint {name!r} here nor in the artifact store")
        artifacts.fetch_manifest(self.reporter, self.spec.resume_manifest, self._cache_dir)
        artifacts.materialize_into(self.spec.resume_manifest, self._cache_dir, folder)  # replaces a partial copy
        return folder

    @property
    def _cache_dir(self) -> Path:
        return self.settings.path("cache")

    def _fetch_dataset(self, dataset: DatasetFile, data_dir: Path) -> str:
        """Download a dataset file unless the same content is already there. Always a download,
        even for the embedded worker that shares the panel's data dir: one code path, and the
        run folder never aliases the panel's stored file."""
        name = Path(dataset.file_name).name
        target = data_dir / name
        if target.is_file() and _sha256(target) == dataset.sha256:
            return name
        digest = self.reporter.download(dataset.url.removeprefix("/internal/v1"), target)
        if digest != dataset.sha256:
            target.unlink(missing_ok=True)
            raise PreparationFailed(f"dataset {dataset.name}: sha256 {digest} instead of {dataset.sha256}")
        return name

    def _environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not _PRIVATE_ENV.match(key)}
        env.pop("FORCE_TORCHRUN", None)
        train_bin = str(Path(self.settings.llamafactory_cli).parent)  # torchrun is found on PATH
        env.update({
            "PATH": f"{train_bin}{os.pathsep}{env.get('PATH', '')}",
            "LLAMABOARD_ENABLED": "1",
            "LLAMABOARD_WORKDIR": str(self.output_dir),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # nvidia-smi / NVML number GPUs in PCI order; make CUDA agree with them.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(gpu_id) for gpu_id in self.gpu_ids),
        })
        if len(self.gpu_ids) > 1:
            env["FORCE_TORCHRUN"] = "1"
        if self.gpu_ids:
            env["RECORD_VRAM"] = "1"  # peak memory in trainer_log.jsonl: measured against the estimate
        return env

    # ----------------------------------------------------------------------- the micro-batch
    def _choose_batch(self) -> str | None:
        """Train with the claim's split, or probe first and train with the panel's answer (the
        YAML's own split when the probe fails or the panel is away). Returns the outcome when the
        attempt ended meanwhile (cancelled, or ended by the panel)."""
        train_yaml = self.run_dir / "train.yaml"
        if self.spec.probe is not None:
            report = self._probe(train_yaml)
            if self._app_gone:
                return "superseded"
            if self._stop is not None:
                return self.fail_before_start(self._stop.reason, outcome="cancelled")
            try:
                response = self.reporter.post(f"/runs/{self.run_id}/probe", json=report.model_dump(), retry_for_s=60.0)
            except AppUnavailable as error:
                log.warning("%s: probe result not delivered (%s): training with the YAML's split", self.tag, error)
                return None
            if response.status_code in (404, 409):
                self._app_gone = True
                return "superseded"
            if response.status_code != 200:
                log.error("%s: probe result refused (%s): %s", self.tag, response.status_code, response.text)
                return None
            self.batch = BatchChoice.model_validate(response.json())
        if self.batch is not None:
            auto_batch.apply_split(train_yaml, self.batch.per_device_train_batch_size,
                                   self.batch.gradient_accumulation_steps)
            log.info("%s: micro-batch %s × %s (%s): %s", self.tag, self.batch.per_device_train_batch_size,
                     self.batch.gradient_accumulation_steps, self.batch.source, self.batch.reason)
        return None

    def _probe(self, train_yaml: Path) -> ProbeReport:
        """workers/envscripts/batch_probe.py on this attempt's first GPU, its output in the run's log,
        with the per-run heartbeat going on (a cancel stops it)."""
        assert self.spec.probe is not None
        request_path, result_path = self.run_dir / "probe-request.json", self.run_dir / "probe-result.json"
        result_path.unlink(missing_ok=True)
        auto_batch.probe_request_file(request_path, train_yaml, self.spec.probe)
        env = self._environment()
        for key in ("FORCE_TORCHRUN", "LLAMABOARD_ENABLED", "LLAMABOARD_WORKDIR"):
            env.pop(key, None)
        env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_ids[0]) if self.gpu_ids else ""
        process = ManagedProcess([self.settings.train_python, str(auto_batch.PROBE_SCRIPT), str(request_path),
                                  str(result_path)], env, self.run_dir, self.stdout_log)
        log.info("%s: probing micro-batches for %s sequences per step (pid %s)", self.tag, self.spec.probe.step,
                 process.pid)
        deadline = time.monotonic() + self.settings.probe_timeout_s
        outbox, timed_out = _Outbox(), False
        outbox.status = None  # the run stays `starting` while it probes
        stdout = self.tails.log_sources["stdout"]
        while (code := process.poll()) is None:
            if self._stop is not None:
                process.request_stop(SUPERSEDED_GRACE_S, first_signal=signal.SIGTERM)
            elif time.monotonic() > deadline and not timed_out:
                timed_out = True
                process.request_stop(SUPERSEDED_GRACE_S, first_signal=signal.SIGTERM)
            outbox.add(TailBatch(logs=[{"source": "stdout", "offset": line.offset, "line": line.line}
                                       for line in stdout.read()]))
            now = time.monotonic()
            due = outbox.news or now - self._last_report_at >= self.heartbeat_interval_s
            if due and now >= self._next_report_at:
                self._report(outbox)
            time.sleep(TAIL_INTERVAL_S)
        outbox.add(TailBatch(logs=[{"source": "stdout", "offset": line.offset, "line": line.line}
                                   for line in stdout.read(final=True)]))
        if outbox.news and not self._app_gone:
            self._report(outbox)
        error = (f"it took longer than {self.settings.probe_timeout_s:.0f} s" if timed_out
                 else None if code == 0 else f"the probe exited with {code}")
        return auto_batch.read_probe_result(result_path, self.attempt, self.worker_id, error)

    def _launch(self, command: list[str], env: dict[str, str]) -> None:
        self._launch_offset = self.stdout_log.stat().st_size if self.stdout_log.is_file() else 0
        self._checkpoints_at_launch = {c.name for c in list_checkpoints(self.output_dir) if c.complete}
        self.process = ManagedProcess(command, env, self.run_dir, self.stdout_log)

    def _fall_back(self, exit_code: int) -> bool:
        """After an out-of-memory exit before this launch saved a checkpoint: the next smaller split
        of the same step, once per attempt, reported to the panel. False: the attempt ends as it is."""
        if (exit_code == 0 or self._stop is not None or self._app_gone or self._fell_back or self.batch is None
                or self.batch.source == "config"):
            return False
        if not auto_batch.ran_out_of_memory(self.stdout_log, self._launch_offset):
            return False
        if any(c.complete and c.name not in self._checkpoints_at_launch for c in list_checkpoints(self.output_dir)):
            return False  # it had trained past its first steps: a Resume continues from the checkpoint
        train_yaml = self.run_dir / "train.yaml"
        micro, accumulation = auto_batch.current_split(train_yaml)
        smaller = auto_batch.smaller_split(self.batch, micro, accumulation)
        if smaller is None:
            return False
        logged = _logged_steps(self.output_dir)
        auto_batch.apply_split(train_yaml, *smaller)
        if not self.spec.resume_from_checkpoint:  # nothing of the failed launch is worth keeping
            self._empty_output_dir()
            self.tails.restart_trainer_log()
        reason = (f"micro-batch {micro} ran out of memory after {logged} logged step(s): "
                  f"training again at {smaller[0]} × {smaller[1]}")
        fallback = BatchFallback(attempt=self.attempt, worker_id=self.worker_id, failed_micro=micro,
                                 per_device_train_batch_size=smaller[0], gradient_accumulation_steps=smaller[1],
                                 logged_steps=logged or 0, reason=reason)
        try:
            response = self.reporter.post(f"/runs/{self.run_id}/batch-fallback", json=fallback.model_dump(),
                                          retry_for_s=30.0)
            if response.status_code in (404, 409):
                self._app_gone = True
                return False
        except AppUnavailable as error:
            log.warning("%s: fallback not reported (%s)", self.tag, error)
        self._fell_back = True
        self.batch = BatchChoice(per_device_train_batch_size=smaller[0], gradient_accumulation_steps=smaller[1],
                                 source="fallback", reason=reason,
                                 fallbacks=[m for m in self.batch.fallbacks if m < smaller[0]])
        log.warning("%s: %s", self.tag, reason)
        return True

    # ----------------------------------------------------------------------- supervision
    def _supervise(self) -> int:
        assert self.process is not None and self._uploader is not None
        outbox = _Outbox()
        next_scan = 0.0
        while True:
            exit_code = self.process.poll()
            outbox.add(self.tails.read(final=exit_code is not None))
            if exit_code is not None:
                self._report(outbox, final=True)
                return exit_code
            stop = self._stop
            if stop is not None:
                self.process.request_stop(max(0.0, stop.asked_at + stop.grace_s - time.monotonic()))
            now = time.monotonic()
            if now >= next_scan:
                self._uploader.scan()
                next_scan = now + CHECKPOINT_SCAN_S
            due = outbox.news or now - self._last_report_at >= self.heartbeat_interval_s
            if due and now >= self._next_report_at:
                self._report(outbox)
            time.sleep(TAIL_INTERVAL_S)

    def _report(self, outbox: _Outbox, *, final: bool = False) -> None:
        """Send what the outbox holds (all of it when `final`); keep it when the app is away."""
        while True:
            payload = outbox.take()
            self._add_gpu_sample(payload["metrics"])
            try:
                request = EventsRequest(attempt=self.attempt, worker_id=self.worker_id, **payload)
                response = self.reporter.post(
                    f"/runs/{self.run_id}/events", json=request.model_dump(exclude_none=True),
                    retry_for_s=120.0 if final else 0.0,
                )
            except AppUnavailable as error:
                log.warning("%s: events not delivered, kept for later: %s", self.tag, error)
                self._next_report_at = time.monotonic() + REPORT_BACKOFF_S
                return
            now = time.monotonic()
            self._last_report_at = now
            if response.status_code in (404, 409):
                self._app_gone = True
                outbox.drop()
                log.warning("%s: the app ended this attempt (%s)", self.tag, response.text)
                self.request_stop("the app ended this attempt", SUPERSEDED_GRACE_S)
                return
            if response.status_code != 200:
                # A request the app refuses would be refused again: say so, don't loop on it.
                log.error("%s: events refused (%s): %s", self.tag, response.status_code, response.text)
                outbox.drop()
                return
            if payload["metrics"] and "first_metric" not in self.timings:
                self.timings["first_metric"] = now
            outbox.acknowledge(payload)
            if EventsReply.model_validate(response.json()).cancel:
                self.request_stop("cancelled by the user", self.settings.cancel_grace_s)
            if not (final and outbox.news):
                return

    def _add_gpu_sample(self, metrics: list[dict[str, Any]]) -> None:
        if not self.gpu_ids or not metrics:
            return
        now = time.monotonic()
        if now - self._gpu_sampled_at >= self.heartbeat_interval_s:
            self._gpu_sampled_at = now
            try:
                stats = gpu_stats(self.gpu_ids)
            except Exception:  # a flaky driver must not stop the reports
                log.exception("%s: GPU statistics unavailable", self.tag)
                stats = []
            self._gpu_sample = {
                "gpu_util": sum(gpu.utilization for gpu in stats) / len(stats),
                "gpu_mem_mib": sum(gpu.memory_used_mib for gpu in stats),
            } if stats else {}
        for point in metrics:
            for key, value in self._gpu_sample.items():
                point.setdefault(key, value)

    # ----------------------------------------------------------------------- the end
    def _finish(self, exit_code: int) -> str:
        if self._stop is not None:
            outcome, reason = "cancelled", self._stop.reason
        elif exit_code == 0:
            outcome, reason = "succeeded", ""
        else:
            outcome = "failed"
            reason = f"llamafactory-cli exited with {exit_code}:\n" + _last_lines(self.stdout_log, FAILURE_TAIL_LINES)
        if not self._app_gone:
            if self._uploader is not None:
                self._uploader.drain(UPLOAD_DRAIN_S)
            has_adapter = self._upload_adapter()
            self._upload_result_files()
            self._send_finish(outcome, exit_code, reason, has_adapter=has_adapter)
        self._log_timings(outcome, exit_code)
        return outcome

    def _upload_adapter(self) -> bool:
        """The final adapter (the top level of the output folder), when the attempt saved one; for a
        full or freeze fine-tune, the whole model it saved there."""
        whole_model = (self.output_dir / "config.json").is_file() and any(self.output_dir.glob("*.safetensors"))
        if not (self.output_dir / "adapter_config.json").is_file() and not whole_model:
            return False
        try:
            artifacts.upload_folder(self.reporter, self.run_id, self.attempt, self.worker_id, self.output_dir,
                                    ADAPTER_ARTIFACT, None)
        except Exception:
            log.exception("%s: upload of the final adapter failed", self.tag)
            return False
        return True

    def _upload_result_files(self) -> None:
        for name in RESULT_FILES:
            path = self.output_dir / name
            if not path.is_file():
                continue
            try:
                response = self.reporter.post(
                    f"/runs/{self.run_id}/results",
                    data={"attempt": str(self.attempt), "name": name},
                    files={"file": (name, path.read_bytes())},
                )
                if response.status_code != 200:
                    log.error("%s: result file %s refused (%s): %s", self.tag, name, response.status_code, response.text)
            except AppUnavailable as error:
                log.error("%s: result file %s not delivered: %s", self.tag, name, error)

    def _send_finish(self, outcome: Outcome, exit_code: int | None, reason: str, *, has_adapter: bool = False) -> None:
        body = FinishRequest(
            attempt=self.attempt, worker_id=self.worker_id, outcome=outcome, exit_code=exit_code, reason=reason,
            results=_read_json(self.output_dir / "all_results.json"), checkpoints=list_checkpoints(self.output_dir),
            has_adapter=has_adapter, versions=training_env_versions(self.settings.train_python),
            peak_memory=auto_batch.peak_memory(self.output_dir) if self.gpu_ids else {},
        )
        try:
            response = self.reporter.post(f"/runs/{self.run_id}/finish", json=body.model_dump(), retry_for_s=600.0)
        except AppUnavailable as error:
            log.error("%s: finish (%s) not delivered; the app will mark the run lost: %s", self.tag, outcome, error)
            return
        if response.status_code != 200:
            log.warning("%s: finish (%s) refused (%s): %s", self.tag, outcome, response.status_code, response.text)

    def _log_timings(self, outcome: str, exit_code: int) -> None:
        t = self.timings
        parts = [f"claim→process start {t['started'] - t['claimed']:.3f}s"]
        if "first_metric" in t:
            parts.append(f"process start→first metric posted {t['first_metric'] - t['started']:.3f}s")
        if self._stop is not None:
            parts.append(f"stop asked→exit {t['exited'] - self._stop.asked_at:.3f}s")
        log.info("%s: %s (exit %s); timings: %s", self.tag, outcome, exit_code, ", ".join(parts))


# --------------------------------------------------------------------------- helpers
def render_train_yaml(text: str, *, output_dir: Path, dataset_dir: Path) -> dict[str, Any]:
    """The app's YAML with its placeholders replaced by this worker's paths. Swapped for plain
    tokens before parsing, so a bare `{OUTPUT_DIR}` is not read as a YAML mapping and a path
    needs no quoting."""
    for placeholder, token in PLACEHOLDERS.items():
        text = text.replace(placeholder, token)
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise PreparationFailed("train_yaml is not a mapping")
    paths = {
        PLACEHOLDERS["{OUTPUT_DIR}"]: str(output_dir),
        PLACEHOLDERS["{DATASET_DIR}"]: str(dataset_dir),
    }

    def substitute(value: Any) -> Any:
        if isinstance(value, str):
            for token, path in paths.items():
                value = value.replace(token, path)
        return value

    return {key: substitute(value) for key, value in config.items()}


def list_checkpoints(output_dir: Path) -> list[CheckpointReport]:
    """checkpoint-N folders; complete once their trainer_state.json (written last) exists."""
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else ():
        if (match := CHECKPOINT_PATTERN.match(path.name)) and path.is_dir():
            found.append(CheckpointReport(name=path.name, step=int(match[1]),
                                          complete=(path / CHECKPOINT_COMPLETE_MARKER).is_file()))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


@lru_cache
def training_env_versions(train_python: str) -> dict[str, str]:
    """Versions of the training environment's key packages, asked once per worker."""
    try:
        packages = train_env.run_script("env_report.py", python=train_python, timeout_s=120)["packages"]
    except train_env.TrainEnvError as error:
        log.error("could not read the training environment's versions: %s", error)
        return {}
    return {name: packages.get(name, "missing") for name in VERSION_PACKAGES}


def _logged_steps(output_dir: Path) -> int:
    """The last step trainer_log.jsonl logged a training loss for."""
    last = 0
    try:
        with (output_dir / "trainer_log.jsonl").open("rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and "loss" in record and isinstance(record.get("current_steps"), int):
                    last = max(last, record["current_steps"])
    except OSError:
        pass
    return last


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_lines(path: Path, count: int) -> str:
    try:
        with path.open("rb") as handle:
            lines = deque(handle, maxlen=count)
    except OSError:
        return ""
    return b"".join(lines).decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
