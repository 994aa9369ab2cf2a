"""The lifecycle of a job a worker runs for the panel besides training (an evaluation, an export):
queue, dispatch, claim, heartbeat, finish, cancel, lost. One `JobLifecycle` per table.

A job waits queued in the database; the scheduler (app/services/scheduler.py, `JOB_SERVICES`)
dispatches it to a worker (`dispatch_id`), the worker claims it (queued → starting), beats
(starting → running) and finishes it. Every status change is one conditional UPDATE, so a re-sent
report or a double click changes nothing twice; a dispatch that is not claimed in time is
released, a claimed job whose worker goes silent is lost.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import update
from sqlmodel import Session, SQLModel, col, select

from app.errors import Conflict, DomainError, NotFound
from app.models.base import as_utc, utcnow
from app.models.job import JobStatus
from app.services import artifacts as artifact_service
from app.services.broker import kick_scheduler, send_to_workers
from app.settings import get_settings
from app.wire import ADAPTER_ARTIFACT, ArtifactManifest, EvalClaim, EvalHeartbeat

log = logging.getLogger(__name__)

J = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.queued: frozenset({J.starting, J.cancelled, J.failed}),
    J.starting: frozenset({J.running, J.succeeded, J.failed, J.cancelled, J.lost}),
    J.running: frozenset({J.succeeded, J.failed, J.cancelled, J.lost}),
    J.succeeded: frozenset(),
    J.failed: frozenset(),
    J.cancelled: frozenset(),
    J.lost: frozenset(),
}
CLAIMED = (J.starting, J.running)
HOLDING = (J.queued, J.starting, J.running)
REASON_MAX_CHARS = 8000


class JobError(DomainError):
    """A refused request about an evaluation or an export (a 400 unless a kind below)."""


class JobNotFound(JobError, NotFound):
    pass


class JobConflict(JobError, Conflict):
    pass


class JobLifecycle:
    """The state machine of one job table (`Evaluation`, `ModelExport`); `label` names a job in
    messages ("evaluation 12"), `make_task(job_id, dispatch_id, gpu_ids)` is its broker task."""

    def __init__(self, table: type[SQLModel], label: str, task_name: str,
                 make_task: Callable[[int, str, list[int]], BaseModel],
                 on_finished: Callable[[Session, int], None] | None = None) -> None:
        self.table, self.label, self.task_name, self.make_task = table, label, task_name, make_task
        # Called once a job has ended, however it ended (finished, cancelled, failed, lost).
        self.on_finished = on_finished

    def _update(self, *conditions: Any) -> Any:
        return update(self.table).where(*conditions).execution_options(synchronize_session=False)

    def transition(self, session: Session, job_id: int, to: JobStatus, *,
                   allowed_from: Iterable[JobStatus] | None = None, extra_where: Iterable[Any] = (),
                   values: dict[str, Any] | None = None) -> bool:
        """One conditional UPDATE; False if the row was not in a status that may reach `to`."""
        sources = {s for s, targets in TRANSITIONS.items() if to in targets}
        if allowed_from is not None:
            sources &= set(allowed_from)
        table = self.table
        result = session.exec(self._update(table.id == job_id, col(table.status).in_(sources), *extra_where)
                              .values(status=to, **(values or {})))
        if result.rowcount != 1:
            session.rollback()
            return False
        session.commit()
        if self.on_finished is not None and to.is_finished():
            self.on_finished(session, job_id)
        return True

    def get(self, session: Session, job_id: int) -> Any:
        job = session.get(self.table, job_id)
        if job is None:
            raise JobNotFound(f"{self.label} {job_id} not found")
        session.refresh(job)
        return job

    # ----------------------------------------------------------------------- scheduling
    def holding(self, session: Session) -> list[Any]:
        """Jobs that hold part of a worker (dispatched, claimed or running)."""
        table = self.table
        return list(session.exec(select(table).where(
            col(table.status).in_(HOLDING), col(table.dispatched_worker_id).is_not(None))).all())

    def waiting(self, session: Session) -> list[Any]:
        """Queued jobs not dispatched yet, oldest first."""
        table = self.table
        return list(session.exec(select(table).where(
            table.status == J.queued, col(table.dispatch_id).is_(None)).order_by(col(table.id))).all())

    def dispatch(self, session: Session, choices: list[tuple[Any, str, list[int]]]) -> int:
        """Hand each queued job to its worker, then send the tasks; a refused send is taken back."""
        table = self.table
        sent = []
        now = utcnow()
        for job, worker_id, gpu_ids in choices:
            dispatch_id = uuid.uuid4().hex
            result = session.exec(self._update(table.id == job.id, table.status == J.queued,
                                               col(table.dispatch_id).is_(None))
                                  .values(dispatch_id=dispatch_id, dispatched_worker_id=worker_id,
                                          dispatched_at=now, gpu_ids=gpu_ids))
            if result.rowcount == 1:
                sent.append((job.id, worker_id, dispatch_id, gpu_ids))
        session.commit()
        errors = send_to_workers([(worker_id, self.task_name, self.make_task(job_id, dispatch_id, gpu_ids))
                                  for job_id, worker_id, dispatch_id, gpu_ids in sent])
        for (job_id, worker_id, dispatch_id, _gpus), error in zip(sent, errors, strict=True):
            if error is not None:
                log.error("%s %s: could not send its task to %s: %s", self.label, job_id, worker_id, error)
                self.release_dispatch(session, job_id, dispatch_id, f"the broker refused the task: {error}")
        return sum(error is None for error in errors)

    def release_dispatch(self, session: Session, job_id: int, dispatch_id: str, reason: str) -> bool:
        table = self.table
        result = session.exec(self._update(table.id == job_id, table.status == J.queued,
                                           table.dispatch_id == dispatch_id)
                              .values(dispatch_id=None, dispatched_worker_id=None, dispatched_at=None, gpu_ids=[]))
        if result.rowcount != 1:
            session.rollback()
            return False
        session.commit()
        log.warning("%s %s: dispatch released: %s", self.label, job_id, reason)
        return True

    def release_stale_dispatches(self, session: Session, online: set[str], now: datetime) -> None:
        table = self.table
        cutoff = now - timedelta(seconds=get_settings().dispatch_timeout_s)
        for job in session.exec(select(table).where(table.status == J.queued,
                                                    col(table.dispatch_id).is_not(None))).all():
            if job.dispatched_worker_id not in online:
                self.release_dispatch(session, job.id, job.dispatch_id, "its worker went offline")
            elif job.dispatched_at is not None and as_utc(job.dispatched_at) < cutoff:
                self.release_dispatch(session, job.id, job.dispatch_id, "not claimed in time")

    def mark_lost(self, session: Session, now: datetime | None = None) -> list[int]:
        """Claimed jobs whose worker has been silent past the heartbeat timeout."""
        table = self.table
        now = now or utcnow()
        cutoff = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
        lost = [job.id for job in session.exec(select(table).where(
            col(table.status).in_(CLAIMED), col(table.heartbeat_at) < cutoff)).all()
            if self.transition(session, job.id, J.lost, allowed_from=CLAIMED,
                               extra_where=[col(table.heartbeat_at) < cutoff],
                               values={"status_reason": f"worker {job.worker_id} went silent", "finished_at": now})]
        if lost:
            kick_scheduler()
        return lost

    # ----------------------------------------------------------------------- the worker channel
    def claim(self, session: Session, job_id: int, request: EvalClaim) -> Any:
        """queued → starting, once, by the worker it was dispatched to."""
        table = self.table
        now = utcnow()
        values: dict[str, Any] = {"worker_id": request.worker_id, "started_at": now, "heartbeat_at": now}
        if "worker_instance" in table.model_fields:
            values["worker_instance"] = request.instance_id or None
        claimed = self.transition(session, job_id, J.starting, allowed_from=[J.queued],
                                  extra_where=[table.dispatch_id == request.dispatch_id,
                                               table.dispatched_worker_id == request.worker_id],
                                  values=values)
        job = self.get(session, job_id)
        if not claimed:
            raise JobConflict(f"{self.label} {job_id} is not claimable by {request.worker_id} "
                              f"({job.status.value}, dispatched to {job.dispatched_worker_id})")
        return job

    def claimed_by(self, session: Session, job_id: int, worker_id: str) -> Any:
        """The job, while `worker_id` holds it; else the worker is told to stop (404/409)."""
        job = session.get(self.table, job_id)
        if job is None:
            raise JobNotFound(f"{self.label} {job_id} not found (deleted)")
        session.refresh(job)
        if job.status not in CLAIMED or job.worker_id != worker_id:
            raise JobConflict(f"{self.label} {job_id} is {job.status.value} (worker {job.worker_id}): stop it")
        return job

    def heartbeat(self, session: Session, job_id: int, report: EvalHeartbeat) -> bool:
        """A worker's beat; returns whether the user asked to cancel."""
        table = self.table
        job = self.claimed_by(session, job_id, report.worker_id)
        if report.status == "running" and job.status == J.starting:
            self.transition(session, job_id, J.running, allowed_from=[J.starting])
        result = session.exec(self._update(table.id == job_id, col(table.status).in_(CLAIMED),
                                           table.worker_id == report.worker_id).values(heartbeat_at=utcnow()))
        if result.rowcount != 1:
            session.rollback()
            raise JobConflict(f"{self.label} {job_id} is over: stop it")
        session.commit()
        return self.get(session, job_id).cancel_requested

    def claimed_adapter(self, session: Session, job: Any) -> ArtifactManifest:
        """The stored adapter a claimed job of a run was created for; a job whose adapter was
        deleted or replaced since fails (and the claim is refused)."""
        name = job.checkpoint or ADAPTER_ARTIFACT
        try:
            manifest = artifact_service.get_manifest(session, job.run_id, name)
        except artifact_service.ArtifactError:
            manifest = None
        if manifest is None or manifest.digest != job.adapter_digest:
            reason = f"{name} of run {job.run_id} was deleted or replaced"
            self.fail(session, job.id, reason)
            raise JobConflict(f"{self.label} {job.id}: {reason}")
        return manifest

    def fail(self, session: Session, job_id: int, reason: str) -> bool:
        return self.transition(session, job_id, J.failed, values={"status_reason": reason, "finished_at": utcnow()})

    @staticmethod
    def reported_outcome(job: Any, outcome: str, reason: str) -> tuple[JobStatus, str]:
        """What a worker's finish means: a job that failed after a cancel was cancelled."""
        status = J(outcome)
        if status == J.failed and job.cancel_requested:
            status = J.cancelled
        if status == J.cancelled and not reason:
            reason = "cancelled by the user"
        return status, reason[-REASON_MAX_CHARS:]

    def finish(self, session: Session, job_id: int, worker_id: str, outcome: JobStatus,
               values: dict[str, Any]) -> Any:
        """claimed → `outcome` with `values`; the same finish re-sent is answered the same."""
        finished = self.transition(session, job_id, outcome, allowed_from=CLAIMED,
                                   extra_where=[self.table.worker_id == worker_id],
                                   values={**values, "finished_at": utcnow()})
        job = self.get(session, job_id)
        if finished:
            kick_scheduler()
            return job
        if job.status == outcome:
            return job  # the same finish, re-sent
        raise JobConflict(f"{self.label} {job_id} cannot finish as {outcome.value}: it is {job.status.value}")

    # ----------------------------------------------------------------------- user actions
    def cancel(self, session: Session, job_id: int) -> Any:
        """A queued job is cancelled at once; a claimed one is asked to stop (its worker's next beat)."""
        table = self.table
        job = self.get(session, job_id)
        if job.status.is_finished():
            raise JobConflict(f"{self.label} {job_id} is already {job.status.value}")
        if job.status == J.queued and self.transition(
                session, job_id, J.cancelled, allowed_from=[J.queued],
                values={"status_reason": "cancelled before it started", "finished_at": utcnow()}):
            return self.get(session, job_id)
        session.exec(self._update(table.id == job_id, col(table.status).in_(CLAIMED)).values(cancel_requested=True))
        session.commit()
        return self.get(session, job_id)
