"""Read-only queries for the list pages and the pickers: only the columns a page shows, never a
config's full parameters or a run's YAML, lineage and results for a table row or an <option>."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_
from sqlmodel import Session, col, select

from app.models import ModelEntry, Run, RunEvent, RunMetric, RunStatus, TrainConfig
from app.models.artifact import RunArtifact
from app.models.run import RunPriority
from app.wire import ADAPTER_ARTIFACT, checkpoint_step

RUN_ROWS_LIMIT = 200


@dataclass(frozen=True)
class ConfigChoice:
    """A config as a picker lists it."""

    id: int
    name: str
    version: int
    frozen: bool


@dataclass(frozen=True)
class ConfigRow:
    id: int
    name: str
    version: int
    frozen: bool
    gpus: int
    created_at: datetime
    dataset_count: int
    # The registered model's name, or the hub id / path an imported YAML named.
    model: str | None
    owner: str | None = None


@dataclass(frozen=True)
class RunRow:
    id: int
    name: str
    status: RunStatus
    attempt: int
    cancel_requested: bool
    current_step: int
    total_steps: int
    percentage: float
    created_at: datetime
    # For a queued run's place in the queue (runs/_queue_spot.html).
    priority: RunPriority
    dispatched_worker_id: str | None
    # The last logged train loss (all_results.json's train_loss is wrong after a resume).
    last_loss: float | None
    owner: str | None = None


def config_choices(session: Session) -> list[ConfigChoice]:
    rows = session.exec(
        select(TrainConfig.id, TrainConfig.name, TrainConfig.version, TrainConfig.frozen)
        .order_by(TrainConfig.name, TrainConfig.version)
    ).all()
    return [ConfigChoice(*row) for row in rows]


def config_rows(session: Session, owner_id: int | None = None) -> list[ConfigRow]:
    query = (
        select(
            TrainConfig.id, TrainConfig.name, TrainConfig.version, TrainConfig.frozen, TrainConfig.gpus,
            TrainConfig.created_at, func.json_array_length(TrainConfig.dataset_ids),
            func.coalesce(ModelEntry.name, func.json_extract(TrainConfig.params, "$.model_name_or_path")),
            TrainConfig.owner,
        )
        .outerjoin(ModelEntry, col(ModelEntry.id) == col(TrainConfig.model_id))
        .order_by(col(TrainConfig.id).desc())
    )
    if owner_id is not None:
        query = query.where(TrainConfig.owner_id == owner_id)
    return [ConfigRow(*row) for row in session.exec(query).all()]


def _run_rows_query(owner_id: int | None = None):
    last_loss = (
        select(RunMetric.loss)
        .where(RunMetric.run_id == Run.id, col(RunMetric.loss).is_not(None))
        .order_by(col(RunMetric.step).desc()).limit(1)
        .scalar_subquery()
    )
    query = select(
        Run.id, Run.name, Run.status, Run.attempt, Run.cancel_requested, Run.current_step, Run.total_steps,
        Run.percentage, Run.created_at, Run.priority, Run.dispatched_worker_id, last_loss, Run.owner,
    )
    return query if owner_id is None else query.where(Run.owner_id == owner_id)


def _run_row(row) -> RunRow:
    run_id, name, status, attempt, cancel, step, total, percentage, created_at, priority, dispatched, loss, owner = row
    return RunRow(run_id, name, RunStatus(status), attempt, cancel, step, total, percentage, created_at,
                  RunPriority(priority), dispatched, loss, owner)


def run_rows(session: Session, *, limit: int = RUN_ROWS_LIMIT, owner_id: int | None = None) -> list[RunRow]:
    """The newest runs (of `owner_id`, if given), as the runs table shows them."""
    rows = session.exec(_run_rows_query(owner_id).order_by(col(Run.id).desc()).limit(limit)).all()
    return [_run_row(row) for row in rows]


def run_rows_changed(session: Session, after_event: int, owner_id: int | None = None) -> tuple[list[RunRow], int]:
    """The rows of the runs that have an event after `after_event` (status, progress, a metric:
    what the table shows), and the newest event id, the next call's cursor."""
    cursor = latest_event_id(session)
    if cursor <= after_event:
        return [], after_event
    changed = select(RunEvent.run_id).where(RunEvent.id > after_event, RunEvent.id <= cursor).distinct()
    # The table shows the newest runs only: an old cursor never brings back the whole history.
    rows = session.exec(
        _run_rows_query(owner_id).where(col(Run.id).in_(changed)).order_by(col(Run.id).desc()).limit(RUN_ROWS_LIMIT)
    ).all()
    return [_run_row(row) for row in rows], cursor


def latest_event_id(session: Session) -> int:
    return session.exec(select(func.max(RunEvent.id))).one() or 0


def any_run_active(session: Session) -> bool:
    active = (RunStatus.queued, RunStatus.starting, RunStatus.running)
    return session.exec(select(Run.id).where(col(Run.status).in_(active)).limit(1)).first() is not None


@dataclass(frozen=True)
class RunChoice:
    """A run as the deploy form's picker lists it."""

    id: int
    name: str
    status: RunStatus


def deployable_run_choices(session: Session) -> list[RunChoice]:
    """Finished runs with a stored adapter to serve (the rule of app.services.deployments.
    deployable_runs, in SQL): a succeeded run's final adapter, or any run's checkpoint."""
    stored = select(RunArtifact.id).where(RunArtifact.run_id == Run.id)
    rows = session.exec(
        select(Run.id, Run.name, Run.status)
        .where(or_(
            and_(Run.status == RunStatus.succeeded, stored.exists()),
            and_(col(Run.status).in_((RunStatus.failed, RunStatus.cancelled)),
                 stored.where(RunArtifact.name != ADAPTER_ARTIFACT).exists()),
        ))
        .order_by(col(Run.id).desc())
    ).all()
    return [RunChoice(run_id, name, RunStatus(status)) for run_id, name, status in rows]


def adapter_choices(session: Session, run: RunChoice) -> list[tuple[str, str]]:
    """(checkpoint field value, label) of what the run can serve: its final adapter (value ""),
    then its stored checkpoints, newest first."""
    names = set(session.exec(select(RunArtifact.name).where(RunArtifact.run_id == run.id)).all())
    choices = [("", "final adapter")] if run.status == RunStatus.succeeded and ADAPTER_ARTIFACT in names else []
    checkpoints = sorted((n for n in names if checkpoint_step(n) is not None), key=checkpoint_step, reverse=True)
    listed = choices + [(name, f"{name} (step {checkpoint_step(name):,})") for name in checkpoints]
    # The best checkpoint (lowest eval loss, the one retention keeps) is offered first among the
    # checkpoints, right after the final adapter of a succeeded run (the default the pages keep).
    from app.services import artifacts as artifact_service

    stored = [a for a in artifact_service.list_artifacts(session, run.id) if checkpoint_step(a.name) is not None]
    best = artifact_service._best_checkpoint(session, stored)
    if best is None:
        return listed
    others = [choice for choice in listed[len(choices):] if choice[0] != best.name]
    return choices + [(best.name, f"{best.name} (step {best.step:,}) — best: lowest eval loss")] + others
