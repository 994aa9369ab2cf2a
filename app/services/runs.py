"""Runs: the state machine and everything that changes a run.

Every status change is one conditional UPDATE in `_transition` (WHERE the status is one the
target may be reached from, and the attempt is the one the caller knows), so two racing callers
(a redelivered task, a cancel against a finish, the lost-run sweep against a late heartbeat)
cannot both win, and a transition the table below does not list is refused.
"""

from __future__ import annotations

import io
import logging
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, func, select

from app.errors import Conflict, DomainError, NotFound
from app.models import Dataset, Deployment, ModelEntry, Run, RunEvent, RunLogLine, RunMetric, RunStatus, TrainConfig
from app.models.base import as_utc, utcnow
from app.models.run import RunPriority
from app.services import artifacts as artifact_service
from app.services import batching
from app.services import configs as config_service
from app.services import webhooks
from app.services.broker import kick_scheduler, send_to_workers
from app.services.datasets import dataset_info_for, run_file_name
from app.services.run_events import hub
from app.services.workers import gpu_capacity_problem
from app.settings import get_settings
from app.wire import (
    ADAPTER_ARTIFACT,
    CHECKPOINT_PATTERN,
    DATASET_DIR_PLACEHOLDER,
    METRIC_FIELDS,
    OUTPUT_DIR_PLACEHOLDER,
    RESULT_FILES,
    TRAIN_TASK,
    ArtifactManifest,
    ClaimRequest,
    DatasetFile,
    EventsRequest,
    FinishRequest,
    MetricPoint,
    RunSpec,
    TrainTask,
)

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
REASON_MAX_CHARS = 8000


class RunError(DomainError):
    """A refused run action (400 unless a kind below says otherwise)."""


class RunNotFound(RunError, NotFound):
    pass


class RunConflict(RunError, Conflict):
    pass


class IllegalTransition(RunError, Conflict):
    pass


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
    webhooks.enqueue_run_event(session, run_id, to.value)  # committed with the change: never lost
    session.commit()
    hub.notify(run_id)
    return True


def _update_run(*conditions: Any) -> Any:
    # The caller refreshes what it reads next; evaluating these WHEREs in Python is not needed.
    return update(Run).where(*conditions).execution_options(synchronize_session=False)


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    session.refresh(run)
    return run


def list_runs(session: Session, *, status: RunStatus | None = None, limit: int = 200,
              owner_id: int | None = None) -> list[Run]:
    query = select(Run).order_by(col(Run.id).desc()).limit(limit)
    if status is not None:
        query = query.where(Run.status == status)
    if owner_id is not None:
        query = query.where(Run.owner_id == owner_id)
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
    unresolved = config.params.get("dataset")  # names an imported YAML had that are not registered
    if unresolved:
        raise RunError(f"config {config.name!r} names datasets that are not registered ({unresolved}): "
                       "upload them on the Datasets page and choose them on the config page")
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
    priority: RunPriority = RunPriority.normal,
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
    refusal = config_service.run_refusal(config, datasets, gpus)
    if refusal:
        raise RunError(refusal)

    config_service.freeze(session, config)
    train_yaml = config_service.render_train_yaml(
        config, output_dir=OUTPUT_DIR_PLACEHOLDER, dataset_dir=DATASET_DIR_PLACEHOLDER,
        dataset_names=[d.name for d in datasets], gpus=gpus,
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
        lineage=lineage, idempotency_key=idempotency_key or None, priority=priority,
        batch_plan=batching.initial_plan(session, config, gpus),  # the estimate shown before launch
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
    kick_scheduler()
    return run, True


# --------------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class Dispatch:
    """The scheduler's choice for one queued attempt: this worker, these GPUs."""

    run_id: int
    attempt: int
    worker_id: str
    gpu_ids: list[int]


def dispatch_runs(session: Session, dispatches: list[Dispatch]) -> int:
    """Hand each queued attempt to its worker (one transaction), then send the workers their
    tasks (one broker connection). A run that changed meanwhile is skipped; one whose task the
    broker refused is taken back for the next pass. Returns how many were dispatched."""
    sent: list[tuple[Dispatch, str]] = []
    now = utcnow()
    for choice in dispatches:
        dispatch_id = uuid.uuid4().hex
        result = session.exec(
            _update_run(Run.id == choice.run_id, Run.attempt == choice.attempt, Run.status == S.queued,
                        col(Run.dispatch_id).is_(None))
            .values(dispatch_id=dispatch_id, dispatched_worker_id=choice.worker_id, dispatched_at=now,
                    gpu_ids=choice.gpu_ids)
        )
        if result.rowcount == 1:
            _event(session, choice.run_id, "status",
                   {"status": S.queued.value, "dispatched_to": choice.worker_id, "gpu_ids": choice.gpu_ids})
            sent.append((choice, dispatch_id))
    session.commit()
    errors = send_to_workers([
        (choice.worker_id, TRAIN_TASK, TrainTask(run_id=choice.run_id, attempt=choice.attempt,
                                                 dispatch_id=dispatch_id, gpu_ids=choice.gpu_ids))
        for choice, dispatch_id in sent
    ])
    for (choice, dispatch_id), error in zip(sent, errors, strict=True):
        hub.notify(choice.run_id)
        if error is not None:
            log.error("run %s: could not send its task to %s: %s", choice.run_id, choice.worker_id, error)
            release_dispatch(session, choice.run_id, dispatch_id, f"the broker refused the task: {error}")
    return sum(error is None for error in errors)


def release_dispatch(session: Session, run_id: int, dispatch_id: str, reason: str) -> bool:
    """Take back a dispatch that was never claimed, so that the next pass dispatches it again."""
    result = session.exec(
        _update_run(Run.id == run_id, Run.status == S.queued, Run.dispatch_id == dispatch_id)
        .values(dispatch_id=None, dispatched_worker_id=None, dispatched_at=None, gpu_ids=[])
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    _event(session, run_id, "status", {"status": S.queued.value, "redispatch": reason})
    session.commit()
    hub.notify(run_id)
    log.warning("run %s: dispatch released: %s", run_id, reason)
    return True


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


def stored_checkpoints(session: Session, run_id: int) -> dict[int, str]:
    """step → name of the run's checkpoints in the artifact store (complete ones only: a worker
    uploads a checkpoint once its trainer_state.json, written last, is there)."""
    return {
        artifact.step: artifact.name for artifact in artifact_service.list_artifacts(session, run_id)
        if artifact.step is not None and CHECKPOINT_PATTERN.match(artifact.name)
    }


def latest_checkpoint(session: Session, run: Run) -> str | None:
    """The newest checkpoint in the artifact store: any worker can resume from it."""
    steps = stored_checkpoints(session, run.id)
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
            "status_reason": "", "worker_id": None, "worker_instance": None, "task_id": None, "gpu_ids": [],
            "dispatch_id": None, "dispatched_worker_id": None, "dispatched_at": None, "queued_at": utcnow(),
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
    kick_scheduler()
    return get_run(session, run.id)


def resume_run(session: Session, run_id: int) -> Run:
    run = get_run(session, run_id)
    if run.status not in RESTARTABLE:
        raise RunConflict(
            f"run {run_id} is {run.status.value}: only a failed, cancelled or lost run can be resumed"
        )
    checkpoint = latest_checkpoint(session, run)
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
    artifact_service.delete_run_artifacts(session, run_id)
    session.exec(delete(Run).where(Run.id == run_id, col(Run.status).not_in(ACTIVE)))
    session.commit()
    shutil.rmtree(run_dir(run_id), ignore_errors=True)


# --------------------------------------------------------------------------- the worker channel
def claim_run(session: Session, run_id: int, claim: ClaimRequest) -> RunSpec:
    """A worker's claim of the attempt dispatched to it: queued → starting, once. A redelivered
    or superseded task (another attempt, another dispatch) is refused."""
    now = utcnow()
    claimed = _transition(
        session, run_id, S.starting, allowed_from=[S.queued], attempt=claim.attempt,
        extra_where=[Run.dispatch_id == claim.dispatch_id, Run.dispatched_worker_id == claim.worker_id],
        values={
            "worker_id": claim.worker_id, "worker_instance": claim.instance_id or None,
            "task_id": claim.task_id or None, "started_at": now, "heartbeat_at": now,
        },
        event={"attempt": claim.attempt, "worker_id": claim.worker_id},
    )
    if not claimed:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id} not found (deleted)")
        session.refresh(run)
        raise RunConflict(
            f"run {run_id} attempt {claim.attempt} is not claimable by {claim.worker_id} (the run is at "
            f"attempt {run.attempt}, {run.status.value}, dispatched to {run.dispatched_worker_id or 'nobody'})"
        )
    run = get_run(session, run_id)
    datasets = {entry["name"]: session.get(Dataset, entry["id"]) for entry in run.lineage["datasets"]}
    missing = [name for name, dataset in datasets.items() if dataset is None]
    if missing:
        fail_run(session, run, f"dataset(s) {', '.join(missing)} were deleted after the run was queued")
        raise RunConflict(f"run {run_id}: dataset(s) {', '.join(missing)} no longer exist")
    resume_manifest = (
        artifact_service.get_manifest(session, run.id, run.resume_from) if run.resume_from else None
    )
    batch, probe = batching.claim_plan(session, run)  # the automatic micro-batch: a split, or a probe first
    return RunSpec(
        run_id=run.id,
        attempt=run.attempt,
        train_yaml=run.train_yaml,
        dataset_info={name: dataset_info_for([d])[d.name] for name, d in datasets.items()},
        datasets=[
            DatasetFile(name=name, file_name=run_file_name(d), sha256=d.sha256,
                        url=f"/internal/v1/datasets/{d.id}/file")
            for name, d in datasets.items()
        ],
        gpu_ids=run.gpu_ids,
        gpus=run.gpus_requested,
        resume_from_checkpoint=run.resume_from,
        resume_manifest=resume_manifest,
        batch=batch,
        probe=probe,
    )


def fail_run(session: Session, run: Run, reason: str) -> bool:
    return _transition(
        session, run.id, S.failed, attempt=run.attempt,
        values={"status_reason": reason, "finished_at": utcnow()}, event={"reason": reason},
    )


def _upsert_metric(session: Session, run: Run, report: MetricPoint) -> bool:
    """Merge one reported point into the run's point of that step; whether it changed."""
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
    return changed


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
        if _upsert_metric(session, run, point):
            # The event names the step; the stream sends the point as RunMetric holds it.
            _event(session, run_id, "metric", {"step": point.step})
    for line in report.logs:  # a line already stored (a re-sent report) is skipped by its key
        session.exec(
            sqlite_insert(RunEvent)
            .values(run_id=run_id, kind="log", created_at=utcnow(),
                    log_key=RunEvent.log_key_of(report.attempt, line.source, line.offset),
                    data={"attempt": report.attempt, "source": line.source, "offset": line.offset, "line": line.line})
            .on_conflict_do_nothing()
        )
    session.commit()
    hub.notify(run_id)
    session.refresh(run)
    return run.cancel_requested


def _finished_outcome(run: Run, report: FinishRequest) -> RunStatus:
    outcome = RunStatus(report.outcome)
    if outcome == S.failed and run.cancel_requested:
        return S.cancelled
    return outcome


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
            "checkpoints": [c.model_dump() for c in report.checkpoints], "has_adapter": report.has_adapter,
            "lineage": {**run.lineage, "versions": report.versions}, "finished_at": utcnow(),
        },
        event={"attempt": report.attempt, "reason": reason[-500:], "exit_code": report.exit_code},
    )
    if finished:
        kick_scheduler()  # its GPUs or slot are free
        batching.record_finish(session, run_id, report)  # measured memory and time against the estimates
        return
    run = get_run(session, run_id)
    if run.attempt == report.attempt and run.status == outcome:
        return  # the same finish, re-sent
    raise RunConflict(
        f"run {run_id} attempt {report.attempt} cannot finish as {outcome.value}: the run is at "
        f"attempt {run.attempt}, {run.status.value}"
    )


def store_result_file(run_id: int, attempt: int, name: str, source: io.RawIOBase | Any, session: Session) -> Path:
    if name not in RESULT_FILES:
        raise RunError(f"result file {name!r} is not one of {sorted(RESULT_FILES)}")
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
        if _mark_lost(session, run, reason, now, extra_where=[col(Run.heartbeat_at) < cutoff]):
            lost.append(run.id)
    return lost


def mark_restarted_worker_runs(session: Session, worker_id: str, instance_id: str) -> list[int]:
    """A worker came back as a new process: the attempts its previous process had claimed died
    with it (their trainers die with their worker), and its unclaimed dispatches are taken back."""
    now = utcnow()
    lost = []
    for run in session.exec(
        select(Run).where(col(Run.status).in_(CLAIMED), Run.worker_id == worker_id,
                          col(Run.worker_instance).is_not(None), Run.worker_instance != instance_id)
    ).all():
        reason = f"worker {worker_id} restarted (its previous process died during the run)"
        if _mark_lost(session, run, reason, now, extra_where=[Run.worker_instance == run.worker_instance]):
            lost.append(run.id)
    for run in session.exec(
        select(Run).where(Run.status == S.queued, Run.dispatched_worker_id == worker_id)
    ).all():
        release_dispatch(session, run.id, run.dispatch_id or "", f"worker {worker_id} restarted before claiming it")
    return lost


def _mark_lost(session: Session, run: Run, reason: str, now: datetime, *, extra_where: list[Any]) -> bool:
    if not _transition(
        session, run.id, S.lost, allowed_from=CLAIMED, attempt=run.attempt, extra_where=extra_where,
        values={"status_reason": reason, "finished_at": now}, event={"reason": reason},
    ):
        return False
    kick_scheduler()
    return True


# --------------------------------------------------------------------------- dashboard data
def metrics_of(session: Session, run_id: int) -> list[dict[str, Any]]:
    rows = session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
    return [m.point() for m in rows]


def log_tail(session: Session, run_id: int, *, upto_event: int, limit: int = 500) -> list[dict[str, Any]]:
    """The last `limit` log lines streamed up to event `upto_event` (the page's SSE cursor)."""
    rows = session.exec(
        select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.kind == "log", RunEvent.id <= upto_event)
        .order_by(col(RunEvent.id).desc()).limit(limit)
    ).all()
    return [row.data for row in reversed(rows)]


def log_lines(session: Session, run_id: int, *, after_id: int = 0, limit: int = 1000) -> list[RunLogLine]:
    events = session.exec(
        select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.kind == "log", RunEvent.id > after_id)
        .order_by(RunEvent.id).limit(limit)
    ).all()
    return [RunLogLine.of(event) for event in events]


def event_cursor(session: Session, run_id: int) -> int:
    return session.exec(select(func.max(RunEvent.id)).where(RunEvent.run_id == run_id)).one() or 0


def checkpoints_of(session: Session, run: Run) -> list[dict[str, Any]]:
    """Checkpoints as the worker reported them and as the artifact store holds them, each with
    the latest eval loss at or before its step."""
    found: dict[int, dict[str, Any]] = {}
    for checkpoint in run.checkpoints:
        found[int(checkpoint["step"])] = {**checkpoint, "stored": False}
    for step, name in stored_checkpoints(session, run.id).items():
        found[step] = {"name": name, "step": step, "complete": True, "stored": True}
    evals = [(m["step"], m["eval_loss"]) for m in metrics_of(session, run.id) if m["eval_loss"] is not None]
    for step, checkpoint in found.items():
        earlier = [loss for eval_step, loss in evals if eval_step <= step]
        checkpoint["eval_loss"] = earlier[-1] if earlier else None
    # The best stored checkpoint by eval loss: the one retention keeps (and Deploy offers first).
    best = artifact_service._best_checkpoint(session, [
        a for a in artifact_service.list_artifacts(session, run.id) if CHECKPOINT_PATTERN.match(a.name)])
    for checkpoint in found.values():
        checkpoint["best"] = best is not None and checkpoint["name"] == best.name and checkpoint["stored"]
    return [found[step] for step in sorted(found)]


def result_files_of(run_id: int) -> list[str]:
    folder = artifacts_dir(run_id)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name in RESULT_FILES)


def result_file_path(run_id: int, name: str) -> Path:
    path = artifacts_dir(run_id) / name
    if name not in RESULT_FILES or not path.is_file():
        raise RunNotFound(f"run {run_id} has no result file {name!r}")
    return path


def download_manifest(session: Session, run: Run, checkpoint: str | None = None) -> ArtifactManifest:
    """The stored files of the final adapter or of one checkpoint."""
    name = checkpoint or ADAPTER_ARTIFACT
    if checkpoint is not None and not CHECKPOINT_PATTERN.match(checkpoint):
        raise RunNotFound(f"run {run.id} has no {checkpoint!r}")
    try:
        return artifact_service.get_manifest(session, run.id, name)
    except artifact_service.ArtifactError:
        what = f"no stored {checkpoint!r}" if checkpoint else "no saved adapter yet"
        raise RunNotFound(f"run {run.id} has {what}") from None


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


def stream_zip(manifest: ArtifactManifest) -> Iterator[bytes]:
    """The manifest's files, read from the artifact store, as a zip streamed while it is built."""
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for entry in manifest.files:
            with artifact_service.open_blob(entry.sha256) as source, \
                    archive.open(entry.path, "w", force_zip64=True) as target:
                while chunk := source.read(1024 * 1024):
                    target.write(chunk)
                    yield from sink.drain()
    yield from sink.drain()
