"""Runs: the state machine and everything that changes a run.

Every status change is one conditional UPDATE in `_transition` (WHERE the status is one the
target may be reached from, and the attempt is the one the caller knows), so two racing callers
(a redelivered task, a cancel against a finish, the lost-run sweep against a late heartbeat)
cannot both win, and a transition the table below does not list is refused.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, Field
from sqlalchemy import update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, func, select

from app.db import get_engine
from app.models import Dataset, Deployment, ModelEntry, Run, RunEvent, RunLogLine, RunMetric, RunStatus, TrainConfig
from app.models.base import as_utc, utcnow
from app.models.run import MetricPoint
from app.services import configs as config_service
from app.services.datasets import dataset_info_for, run_file_name
from app.services.run_events import hub
from app.services.workers import gpu_capacity_problem
from app.settings import get_settings

log = logging.getLogger(__name__)

S = RunStatus
# Every legal status change. A finished run only leaves its status through a new attempt
# (resume, retry), which queues it again.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.queued: frozenset({S.starting, S.cancelled, S.failed}),
    S.starting: frozenset({S.running, S.succeeded, S.failed, S.cancelled, S.lost}),
    S.running: frozenset({S.succeeded, S.failed, S.cancelled, S.lost}),
    S.succeeded: frozenset(),
    S.failed: frozenset({S.queued}),
    S.cancelled: frozenset({S.queued}),
    S.lost: frozenset({S.queued}),
}
ACTIVE = (S.queued, S.starting, S.running)
CLAIMED = (S.starting, S.running)
RESTARTABLE = (S.failed, S.cancelled, S.lost)

TRAIN_TASK = "tuneboard.train"
TRAIN_QUEUE = "train"
# How often a worker reports while its process lives (the per-run heartbeat).
RUN_HEARTBEAT_INTERVAL_S = 2.0
LOST_SWEEP_INTERVAL_S = 2.0
OUTPUT_DIR_PLACEHOLDER = "{OUTPUT_DIR}"
DATASET_DIR_PLACEHOLDER = "{DATASET_DIR}"
ARTIFACT_NAMES = frozenset({
    "training_loss.png", "training_eval_loss.png", "all_results.json", "train_results.json",
    "eval_results.json", "trainer_log.jsonl",
})
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
METRIC_FIELDS = tuple(name for name in MetricPoint.model_fields if name != "step")
REASON_MAX_CHARS = 8000


class RunError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RunNotFound(RunError):
    status_code = 404


class RunConflict(RunError):
    status_code = 409


class IllegalTransition(RunError):
    status_code = 409


# --------------------------------------------------------------------------- worker payloads
class ClaimRequest(BaseModel):
    attempt: int
    worker_id: str
    task_id: str = ""
    gpu_ids: list[int] = Field(default_factory=list)
    hostname: str = ""


class ProgressReport(BaseModel):
    current_steps: int | None = None
    total_steps: int | None = None
    percentage: float | None = None
    epoch: float | None = None
    elapsed_time: float | None = None
    remaining_time: float | None = None


class LogReport(BaseModel):
    source: str = Field(pattern="^(running_log|stdout)$")
    offset: int
    line: str


class EventsRequest(BaseModel):
    attempt: int
    worker_id: str
    status: RunStatus | None = None
    progress: ProgressReport | None = None
    metrics: list[MetricPoint] = Field(default_factory=list)
    logs: list[LogReport] = Field(default_factory=list)


class CheckpointReport(BaseModel):
    name: str
    step: int
    complete: bool = True


class FinishRequest(BaseModel):
    attempt: int
    worker_id: str
    outcome: RunStatus
    exit_code: int | None = None
    reason: str = ""
    results: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[CheckpointReport] = Field(default_factory=list)
    adapter_path: str | None = None
    output_dir: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the state machine
def _event(session: Session, run_id: int, kind: str, data: dict[str, Any]) -> None:
    session.add(RunEvent(run_id=run_id, kind=kind, data=data))


def _transition(
    session: Session,
    run_id: int,
    to: RunStatus,
    *,
    allowed_from: Iterable[RunStatus] | None = None,
    attempt: int | None = None,
    extra_where: Iterable[Any] = (),
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
) -> bool:
    """Move run `run_id` to `to` in one conditional UPDATE and commit; False if another caller
    got there first (the row was not in a status that may reach `to`)."""
    sources = {s for s, targets in TRANSITIONS.items() if to in targets}
    if allowed_from is not None:
        sources &= set(allowed_from)
    if not sources:
        raise IllegalTransition(f"no run may become {to.value} from {sorted(allowed_from or ())}")
    conditions = [Run.id == run_id, col(Run.status).in_(sources), *extra_where]
    if attempt is not None:
        conditions.append(Run.attempt == attempt)
    result = session.exec(_update_run(*conditions).values(status=to, **(values or {})))
    if result.rowcount != 1:
        session.rollback()
        return False
    _event(session, run_id, "status", {"status": to.value, **(event or {})})
    session.commit()
    hub.notify(run_id)
    return True


def _update_run(*conditions: Any) -> Any:
    # The caller refreshes what it reads next; evaluating these WHEREs in Python is not needed.
    return update(Run).where(*conditions).execution_options(synchronize_session=False)


def transition(session: Session, run_id: int, to: RunStatus, **kwargs: Any) -> bool:
    """The public form of the state machine (used by the tests and the lost-run sweep)."""
    return _transition(session, run_id, to, **kwargs)


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    session.refresh(run)
    return run


def list_runs(session: Session, *, status: RunStatus | None = None, limit: int = 200) -> list[Run]:
    query = select(Run).order_by(col(Run.id).desc()).limit(limit)
    if status is not None:
        query = query.where(Run.status == status)
    return list(session.exec(query).all())


# --------------------------------------------------------------------------- start
def run_dir(run_id: int) -> Path:
    """The run's folder under the data dir: the embedded worker's run folder and the artifacts."""
    return get_settings().resolved_data_dir / "runs" / str(run_id)


def artifacts_dir(run_id: int) -> Path:
    return run_dir(run_id) / "artifacts"


def _validated_inputs(session: Session, config: TrainConfig) -> tuple[ModelEntry, list[Dataset]]:
    if config.model_id is None:
        raise RunError(f"config {config.name!r} has no base model: pick one on the config page")
    model = session.get(ModelEntry, config.model_id)
    if model is None:
        raise RunNotFound(
            f"the base model (id {config.model_id}) of config {config.name!r} no longer exists: "
            "register it again or edit the config"
        )
    if not config.dataset_ids:
        raise RunError(f"config {config.name!r} has no dataset: add one on the config page")
    datasets = []
    for dataset_id in config.dataset_ids:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise RunNotFound(
                f"dataset {dataset_id} of config {config.name!r} no longer exists: upload it again "
                "or edit the config"
            )
        datasets.append(dataset)
    return model, datasets


def start_run(
    session: Session,
    config_id: int,
    *,
    name: str | None = None,
    gpus: int | None = None,
    idempotency_key: str | None = None,
    rerun_of: int | None = None,
) -> tuple[Run, bool]:
    """Queue a new run of a config; returns (run, created). A repeated idempotency key returns
    the run the first request created."""
    if idempotency_key:
        existing = session.exec(select(Run).where(Run.idempotency_key == idempotency_key)).first()
        if existing is not None:
            return existing, False
    config = session.get(TrainConfig, config_id)
    if config is None:
        raise RunNotFound(f"config {config_id} not found")
    model, datasets = _validated_inputs(session, config)
    gpus = config.gpus if gpus is None else gpus
    if gpus < 0:
        raise RunError("gpus must be 0 (CPU) or more")
    problem = gpu_capacity_problem(session, gpus)
    if problem:
        raise RunError(f"this run {problem}")

    config_service.freeze(session, config)
    # A CPU run trains in fp32 (transformers refuses bf16/fp16 without a GPU).
    cpu_overrides = {key: False for key in ("bf16", "fp16") if gpus == 0 and config.params.get(key)}
    train_yaml = config_service.render_train_yaml(
        config, output_dir=OUTPUT_DIR_PLACEHOLDER, dataset_dir=DATASET_DIR_PLACEHOLDER,
        dataset_names=[d.name for d in datasets], overrides=cpu_overrides,
    )
    lineage: dict[str, Any] = {
        "config": {"id": config.id, "name": config.name, "version": config.version},
        "model": {"id": model.id, "name": model.name, "path": model.path},
        # The names as the YAML knows them (a dataset renamed later keeps its name here).
        "datasets": [
            {"id": d.id, "name": d.name, "sha256": d.sha256, "rows": d.row_count, "file_name": run_file_name(d)}
            for d in datasets
        ],
    }
    if rerun_of is not None:
        lineage["rerun_of"] = rerun_of
    run = Run(
        name=(name or "").strip() or f"{config.name} v{config.version}",
        config_id=config_id, status=S.queued, gpus_requested=gpus, train_yaml=train_yaml,
        lineage=lineage, idempotency_key=idempotency_key or None,
    )
    session.add(run)
    try:
        session.flush()
    except IntegrityError:  # the same key won a race with us: one run only
        session.rollback()
        return session.exec(select(Run).where(Run.idempotency_key == idempotency_key)).one(), False
    _event(session, run.id, "status", {"status": S.queued.value, "attempt": 1})
    session.commit()
    session.refresh(run)
    _send_task(session, run)
    return run, True


def _send_task(session: Session, run: Run) -> None:
    from workers.celery_app import celery_app

    try:
        celery_app.send_task(
            # gpus travels with the task so that the worker reserves them before it claims.
            TRAIN_TASK, args=(run.id, run.attempt, run.gpus_requested), queue=TRAIN_QUEUE,
            retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as error:  # the broker is down: say so on the run instead of leaving it queued
        log.exception("run %s: could not queue its task", run.id)
        _transition(
            session, run.id, S.failed, attempt=run.attempt,
            values={"status_reason": f"could not queue the task: {error}", "finished_at": utcnow()},
        )
    session.refresh(run)


def run_again(session: Session, run_id: int, *, idempotency_key: str | None = None) -> tuple[Run, bool]:
    """A new run of the same frozen config."""
    run = get_run(session, run_id)
    return start_run(
        session, run.config_id, name=f"{run.name} (again)", gpus=run.gpus_requested,
        idempotency_key=idempotency_key, rerun_of=run.id,
    )


# --------------------------------------------------------------------------- user actions
def cancel_run(session: Session, run_id: int) -> Run:
    run = get_run(session, run_id)
    if run.status.is_finished():
        raise RunConflict(f"run {run_id} is already {run.status.value}: there is nothing to cancel")
    if run.status == S.queued and _transition(
        session, run_id, S.cancelled, allowed_from=[S.queued], attempt=run.attempt,
        values={"status_reason": "cancelled before it started", "finished_at": utcnow()},
    ):
        return get_run(session, run_id)
    # Claimed: the worker learns it from its next events reply and stops the process; its
    # finish call records `cancelled`.
    result = session.exec(
        _update_run(Run.id == run_id, col(Run.status).in_(CLAIMED), col(Run.cancel_requested).is_(False))
        .values(cancel_requested=True)
    )
    if result.rowcount == 1:
        _event(session, run_id, "status", {"status": run.status.value, "cancel_requested": True})
        session.commit()
        hub.notify(run_id)
        return get_run(session, run_id)
    session.rollback()
    run = get_run(session, run_id)
    if run.status.is_finished():
        raise RunConflict(f"run {run_id} is already {run.status.value}: there is nothing to cancel")
    return run  # a cancel was already requested


def latest_checkpoint(run: Run) -> str | None:
    """The newest complete checkpoint (its trainer_state.json is written last): listed on disk
    (the embedded worker shares the data dir) or as the worker reported it at finish."""
    steps: dict[int, str] = {}
    output = _local_output_dir(run)
    for child in output.iterdir() if output is not None else ():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            steps[int(match.group(1))] = child.name
    for checkpoint in run.checkpoints:
        if checkpoint.get("complete") and CHECKPOINT_RE.match(str(checkpoint.get("name", ""))):
            steps.setdefault(int(checkpoint["step"]), checkpoint["name"])
    return steps[max(steps)] if steps else None


def _new_attempt(session: Session, run: Run, *, resume_from: str | None, verb: str) -> Run:
    if run.status not in RESTARTABLE:
        raise RunConflict(
            f"run {run.id} is {run.status.value}: only a failed, cancelled or lost run can be {verb}"
        )
    gpus_problem = gpu_capacity_problem(session, run.gpus_requested)
    if gpus_problem:
        raise RunError(f"this run {gpus_problem}")
    attempt = run.attempt + 1
    moved = _transition(
        session, run.id, S.queued, allowed_from=RESTARTABLE, attempt=run.attempt,
        values={
            "attempt": attempt, "resume_from": resume_from, "cancel_requested": False,
            "status_reason": "", "worker_id": None, "task_id": None, "gpu_ids": [],
            "exit_code": None, "started_at": None, "finished_at": None, "heartbeat_at": None,
        },
        event={"attempt": attempt, "resume_from": resume_from, "reset": resume_from is None},
    )
    if not moved:  # a concurrent resume/retry made the new attempt already
        raise RunConflict(f"run {run.id} changed meanwhile: reload it")
    if resume_from is None:
        # From scratch: the curve starts over (a resume continues on the same chart instead).
        session.exec(delete(RunMetric).where(RunMetric.run_id == run.id))
        session.commit()
    run = get_run(session, run.id)
    _send_task(session, run)
    return run


def resume_run(session: Session, run_id: int) -> Run:
    run = get_run(session, run_id)
    if run.status not in RESTARTABLE:
        raise RunConflict(
            f"run {run_id} is {run.status.value}: only a failed, cancelled or lost run can be resumed"
        )
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise RunConflict(
            f"run {run_id} has no complete checkpoint to resume from (set save_steps in the config); "
            "retry it from scratch instead"
        )
    return _new_attempt(session, run, resume_from=checkpoint, verb="resumed")


def retry_run(session: Session, run_id: int) -> Run:
    return _new_attempt(session, get_run(session, run_id), resume_from=None, verb="retried")


def delete_run(session: Session, run_id: int) -> None:
    run = get_run(session, run_id)
    if run.status.is_active():
        raise RunConflict(f"run {run_id} is {run.status.value}: cancel it before deleting it")
    deployed = session.exec(select(Deployment).where(Deployment.run_id == run_id)).first()
    if deployed is not None:
        raise RunConflict(f"run {run_id} has deployment {deployed.name!r}: remove the deployment first")
    session.exec(delete(Run).where(Run.id == run_id, col(Run.status).not_in(ACTIVE)))
    session.commit()
    shutil.rmtree(run_dir(run_id), ignore_errors=True)


# --------------------------------------------------------------------------- the worker channel
def claim_run(session: Session, run_id: int, claim: ClaimRequest) -> dict[str, Any]:
    now = utcnow()
    claimed = _transition(
        session, run_id, S.starting, allowed_from=[S.queued], attempt=claim.attempt,
        values={
            "worker_id": claim.worker_id, "task_id": claim.task_id or None, "gpu_ids": claim.gpu_ids,
            "started_at": now, "heartbeat_at": now,
        },
        event={"attempt": claim.attempt, "worker_id": claim.worker_id, "gpu_ids": claim.gpu_ids},
    )
    if not claimed:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id} not found (deleted)")
        raise RunConflict(
            f"run {run_id} attempt {claim.attempt} is not claimable (the run is at attempt "
            f"{run.attempt}, {run.status.value})"
        )
    run = get_run(session, run_id)
    datasets = {entry["name"]: session.get(Dataset, entry["id"]) for entry in run.lineage["datasets"]}
    missing = [name for name, dataset in datasets.items() if dataset is None]
    if missing:
        fail_run(session, run, f"dataset(s) {', '.join(missing)} were deleted after the run was queued")
        raise RunConflict(f"run {run_id}: dataset(s) {', '.join(missing)} no longer exist")
    return {
        "run_id": run.id,
        "attempt": run.attempt,
        "train_yaml": run.train_yaml,
        "dataset_info": {name: dataset_info_for([d])[d.name] for name, d in datasets.items()},
        "datasets": [
            {"name": name, "file_name": run_file_name(d), "sha256": d.sha256,
             "url": f"/internal/v1/datasets/{d.id}/file"}
            for name, d in datasets.items()
        ],
        "resume_from_checkpoint": run.resume_from,
        "gpus": run.gpus_requested,
        "heartbeat_interval_s": RUN_HEARTBEAT_INTERVAL_S,
    }


def fail_run(session: Session, run: Run, reason: str) -> bool:
    return _transition(
        session, run.id, S.failed, attempt=run.attempt,
        values={"status_reason": reason, "finished_at": utcnow()}, event={"reason": reason},
    )


def _metric_public(metric: RunMetric) -> dict[str, Any]:
    return {"step": metric.step, **{name: getattr(metric, name) for name in METRIC_FIELDS}}


def _upsert_metric(session: Session, run: Run, report: MetricPoint) -> dict[str, Any] | None:
    """Merge one reported point into the run's point of that step; the changed point, or None."""
    metric = session.exec(
        select(RunMetric).where(RunMetric.run_id == run.id, RunMetric.step == report.step)
    ).first()
    if metric is None:
        metric = RunMetric(run_id=run.id, attempt=run.attempt, step=report.step)
    reported = report.model_dump(exclude={"step"}, exclude_none=True)
    if metric.id is not None and metric.attempt != run.attempt:
        # The step was logged again by a later attempt (after a resume): its values replace
        # the earlier point's wholesale.
        reported = {name: reported.get(name) for name in METRIC_FIELDS}
    metric.attempt = run.attempt
    changed = metric.id is None
    for name, value in reported.items():
        if getattr(metric, name) != value:
            setattr(metric, name, value)
            changed = True
    session.add(metric)
    return _metric_public(metric) if changed else None


def record_events(session: Session, run_id: int, report: EventsRequest) -> bool:
    """Apply one worker report; returns whether the user asked to cancel."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found (deleted)")
    session.refresh(run)
    if run.attempt != report.attempt or run.status not in CLAIMED:
        raise RunConflict(
            f"run {run_id} attempt {report.attempt} is over (the run is at attempt {run.attempt}, "
            f"{run.status.value}): stop its process"
        )
    if report.status == S.running and run.status == S.starting:
        _transition(session, run_id, S.running, allowed_from=[S.starting], attempt=report.attempt,
                    event={"attempt": report.attempt})

    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    progress_event: dict[str, Any] = {}
    if report.progress is not None:
        p = report.progress
        fields = {
            "current_step": p.current_steps, "total_steps": p.total_steps, "percentage": p.percentage,
            "epoch": p.epoch, "elapsed_s": p.elapsed_time, "remaining_s": p.remaining_time,
        }
        progress_event = {k: v for k, v in fields.items() if v is not None and getattr(run, k) != v}
        values.update({k: v for k, v in fields.items() if v is not None})
    result = session.exec(
        _update_run(Run.id == run_id, Run.attempt == report.attempt, col(Run.status).in_(CLAIMED))
        .values(**values)
    )
    if result.rowcount != 1:  # declared lost or finished between our read and this write
        session.rollback()
        raise RunConflict(f"run {run_id} attempt {report.attempt} is over: stop its process")
    if progress_event:
        _event(session, run_id, "progress", progress_event)

    for point in sorted(report.metrics, key=lambda m: m.step):
        changed = _upsert_metric(session, run, point)
        if changed is not None:
            _event(session, run_id, "metric", changed)
    for line in report.logs:
        inserted = session.exec(
            sqlite_insert(RunLogLine)
            .values(run_id=run_id, attempt=report.attempt, source=line.source, offset=line.offset, line=line.line)
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 1:
            _event(session, run_id, "log", {"attempt": report.attempt, "source": line.source, "line": line.line})
    session.commit()
    hub.notify(run_id)
    session.refresh(run)
    return run.cancel_requested


def _finished_outcome(run: Run, report: FinishRequest) -> RunStatus:
    if report.outcome not in (S.succeeded, S.failed, S.cancelled):
        raise RunError(f"outcome must be succeeded, failed or cancelled, not {report.outcome.value}")
    if report.outcome == S.failed and run.cancel_requested:
        return S.cancelled
    return report.outcome


def finish_run(session: Session, run_id: int, report: FinishRequest) -> None:
    run = get_run(session, run_id)
    outcome = _finished_outcome(run, report)
    reason = report.reason[-REASON_MAX_CHARS:]
    if outcome == S.cancelled and not reason:
        reason = "cancelled by the user"
    finished = _transition(
        session, run_id, outcome, allowed_from=CLAIMED, attempt=report.attempt,
        values={
            "exit_code": report.exit_code, "status_reason": reason, "results": report.results,
            "checkpoints": [c.model_dump() for c in report.checkpoints],
            "adapter_path": report.adapter_path, "output_dir": report.output_dir,
            "lineage": {**run.lineage, "versions": report.versions}, "finished_at": utcnow(),
        },
        event={"attempt": report.attempt, "reason": reason[-500:], "exit_code": report.exit_code},
    )
    if finished:
        return
    run = get_run(session, run_id)
    if run.attempt == report.attempt and run.status == outcome:
        return  # the same finish, re-sent
    raise RunConflict(
        f"run {run_id} attempt {report.attempt} cannot finish as {outcome.value}: the run is at "
        f"attempt {run.attempt}, {run.status.value}"
    )


def store_artifact(run_id: int, attempt: int, name: str, source: io.RawIOBase | Any, session: Session) -> Path:
    if name not in ARTIFACT_NAMES:
        raise RunError(f"artifact {name!r} is not one of {sorted(ARTIFACT_NAMES)}")
    run = get_run(session, run_id)
    if run.attempt != attempt:
        raise RunConflict(f"run {run_id} is at attempt {run.attempt}, not {attempt}")
    folder = artifacts_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.partial"
    with partial.open("wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    target = folder / name
    partial.replace(target)
    return target


# --------------------------------------------------------------------------- lost runs
def mark_lost_runs(session: Session, now: datetime | None = None) -> list[int]:
    """Runs whose worker has been silent past the timeout become lost (their GPUs are free:
    GPU holding is derived from active runs)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
    silent = session.exec(
        select(Run).where(col(Run.status).in_(CLAIMED), col(Run.heartbeat_at) < cutoff)
    ).all()
    lost = []
    for run in silent:
        since = as_utc(run.heartbeat_at)
        reason = f"worker {run.worker_id} silent since {since.isoformat(timespec='seconds')}"
        if _transition(
            session, run.id, S.lost, allowed_from=CLAIMED, attempt=run.attempt,
            extra_where=[col(Run.heartbeat_at) < cutoff],
            values={"status_reason": reason, "finished_at": now}, event={"reason": reason},
        ):
            lost.append(run.id)
    return lost


def _sweep_once() -> None:
    with Session(get_engine()) as session:
        for run_id in mark_lost_runs(session):
            log.warning("run %s is lost: its worker went silent", run_id)


@asynccontextmanager
async def watch_lost_runs(interval_s: float = LOST_SWEEP_INTERVAL_S) -> AsyncIterator[None]:
    """The app's background sweep (started in its lifespan)."""

    async def sweep_forever() -> None:
        # Workers cannot report while the app is down: after a (re)start, give them one timeout
        # to get through before calling anyone silent.
        await asyncio.sleep(get_settings().heartbeat_timeout_s)
        while True:
            try:
                await anyio.to_thread.run_sync(_sweep_once)
            except Exception:
                log.exception("lost-run sweep failed")
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(sweep_forever(), name="lost-run-sweep")
    try:
        yield
    finally:
        task.cancel()


# --------------------------------------------------------------------------- dashboard data
def metrics_of(session: Session, run_id: int) -> list[dict[str, Any]]:
    rows = session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
    return [_metric_public(m) for m in rows]


def log_tail(session: Session, run_id: int, *, upto_event: int, limit: int = 500) -> list[dict[str, Any]]:
    """The last `limit` log lines streamed up to event `upto_event` (the page's SSE cursor)."""
    rows = session.exec(
        select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.kind == "log", RunEvent.id <= upto_event)
        .order_by(col(RunEvent.id).desc()).limit(limit)
    ).all()
    return [row.data for row in reversed(rows)]


def log_lines(session: Session, run_id: int, *, after_id: int = 0, limit: int = 1000) -> list[RunLogLine]:
    return list(session.exec(
        select(RunLogLine).where(RunLogLine.run_id == run_id, RunLogLine.id > after_id)
        .order_by(RunLogLine.id).limit(limit)
    ).all())


def event_cursor(session: Session, run_id: int) -> int:
    return session.exec(select(func.max(RunEvent.id)).where(RunEvent.run_id == run_id)).one() or 0


def _local_output_dir(run: Run) -> Path | None:
    """The run's output dir on this machine: the embedded worker's run folder in the data dir.
    Never the path a worker reported (a remote worker's paths mean nothing here, and serving
    whatever path a worker names would let it read the app's files)."""
    output = run_dir(run.id) / "output"
    return output if output.is_dir() else None


def checkpoints_of(session: Session, run: Run) -> list[dict[str, Any]]:
    """Checkpoints with their step and the latest eval loss at or before it."""
    found: dict[int, dict[str, Any]] = {}
    for checkpoint in run.checkpoints:
        found[int(checkpoint["step"])] = {**checkpoint, "on_disk": False}
    output = _local_output_dir(run)
    if output is not None:
        for child in output.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match:
                step = int(match.group(1))
                found[step] = {
                    "name": child.name, "step": step,
                    "complete": (child / "trainer_state.json").is_file(), "on_disk": True,
                }
    evals = [(m["step"], m["eval_loss"]) for m in metrics_of(session, run.id) if m["eval_loss"] is not None]
    for step, checkpoint in found.items():
        earlier = [loss for eval_step, loss in evals if eval_step <= step]
        checkpoint["eval_loss"] = earlier[-1] if earlier else None
    return [found[step] for step in sorted(found)]


def artifacts_of(run_id: int) -> list[str]:
    folder = artifacts_dir(run_id)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in ARTIFACT_NAMES)


def artifact_path(run_id: int, name: str) -> Path:
    path = artifacts_dir(run_id) / name
    if name not in ARTIFACT_NAMES or not path.is_file():
        raise RunNotFound(f"run {run_id} has no artifact {name!r}")
    return path


def download_files(run: Run, checkpoint: str | None = None) -> list[tuple[Path, str]]:
    """The files of the adapter (the top level of the output dir) or of one checkpoint."""
    output = _local_output_dir(run)
    if output is None:
        raise RunNotFound(
            f"the output of run {run.id} is not on this machine (it trained on worker {run.worker_id})"
        )
    if checkpoint is None:
        folder = output
        if not (folder / "adapter_config.json").is_file():
            raise RunNotFound(f"run {run.id} has no saved adapter yet")
    else:
        if not CHECKPOINT_RE.match(checkpoint) or not (output / checkpoint).is_dir():
            raise RunNotFound(f"run {run.id} has no {checkpoint!r}")
        folder = output / checkpoint
    return [(p, p.name) for p in sorted(folder.iterdir()) if p.is_file()]


class _ChunkSink(io.RawIOBase):
    """A write-only, unseekable file that hands its bytes on: zipfile then writes a streamable
    zip (data descriptors instead of seeking back)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> Iterator[bytes]:
        chunks, self._chunks = self._chunks, []
        yield from chunks


def stream_zip(files: list[tuple[Path, str]]) -> Iterator[bytes]:
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path, arcname in files:
            with path.open("rb") as source, archive.open(arcname, "w", force_zip64=True) as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
                    yield from sink.drain()
    yield from sink.drain()
