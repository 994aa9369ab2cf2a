"""Training runs, their metric points, log lines and the event stream the dashboard replays."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field
from app.models.job import FINISHED_JOB_STATUSES, JobStatus
from app.models.user import OwnedPublic, expose_owner_name, owner_id_field
from app.wire import MetricPoint


# A run goes through the same states as every job of a worker (app/models/job.py).
RunStatus = JobStatus
FINISHED_RUN_STATUSES = FINISHED_JOB_STATUSES


class RunPriority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def rank(self) -> int:
        """Sort key: the scheduler takes lower ranks first (FIFO within one)."""
        return ("high", "normal", "low").index(self.value)


class RunBase(SQLModel):
    """The columns a run shows to its users (API, pages); Run adds the panel's bookkeeping."""

    name: str = Field(max_length=200)
    config_id: int = Field(foreign_key="train_config.id", index=True)
    status: RunStatus = Field(default=RunStatus.queued, index=True)
    status_reason: str = ""
    # Each start, resume or retry is a new attempt of the same run; a task carries its attempt
    # so that a redelivered task of an old attempt is recognised and ignored.
    attempt: int = 1
    resume_from: str | None = None
    gpus_requested: int = 0
    priority: RunPriority = RunPriority.normal
    # When this attempt joined the queue (FIFO order within a priority).
    queued_at: datetime = created_at_field()
    # The GPUs the dispatch hands out (held from dispatch until the attempt ends).
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = Field(default=None, index=True)
    dispatched_worker_id: str | None = None
    cancel_requested: bool = False
    current_step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    percentage: float = 0.0
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    exit_code: int | None = None
    results: dict[str, Any] = json_field()
    # Dataset content hashes and the library versions the run trained with.
    lineage: dict[str, Any] = json_field()
    # Whether the attempt saved a final adapter (it is in the artifact store as "adapter").
    has_adapter: bool = False
    # [{"name": "checkpoint-N", "step": N, "complete": bool}]
    checkpoints: list[dict[str, Any]] = json_field(list)
    # The automatic micro-batch (app/services/batching.py): the estimate shown before launch, the
    # split chosen and why (probe, cache, fallback), and what the run measured.
    batch_plan: dict[str, Any] = json_field()
    created_at: datetime = created_at_field()
    started_at: datetime | None = timestamp_field()
    finished_at: datetime | None = timestamp_field()
    heartbeat_at: datetime | None = timestamp_field()


class Run(RunBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # The panel's dispatch of a queued attempt to one worker (dispatched_worker_id): the task
    # carries dispatch_id and only that worker's claim with it is taken; one not claimed in time
    # is dispatched again.
    dispatch_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    # The worker process (instance) that claimed it: a restarted worker's new instance means
    # this attempt died with the old one.
    worker_instance: str | None = None
    task_id: str | None = None
    # A client's key for one start request: a repeated (double-clicked) start returns the same run.
    idempotency_key: str | None = Field(default=None, unique=True, max_length=200)
    train_yaml: str = Field(default="", sa_column=Column(Text, nullable=False))
    # Who started it (quotas and fair share count GPU time per owner).
    owner_id: int | None = owner_id_field()


class RunPublic(RunBase, OwnedPublic):
    id: int
    # The scheduler's view of a queued run (None otherwise): its place and why it waits.
    queue_position: int | None = None
    wait_reason: str | None = None


class RunMetric(MetricPoint, table=True):
    """One point per step: train and eval lines of the same step are merged, and a step logged
    again after a resume replaces the earlier point."""

    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True, ondelete="CASCADE")
    attempt: int = 1

    def point(self) -> dict[str, Any]:
        """The point as the API and the event stream send it."""
        return {name: getattr(self, name) for name in MetricPoint.model_fields}


class RunEvent(SQLModel, table=True):
    """What the live dashboard streams, in order, and the only record of a run's log lines: its id
    is the SSE event id, the `?after=` cursor and the log's `after_id`."""

    # A re-sent report adds no line twice (NULL keys, every other kind, never clash).
    __table_args__ = (UniqueConstraint("run_id", "log_key"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True, ondelete="CASCADE")
    kind: str  # "status" | "progress" | "metric" | "log"
    # A log line: {"attempt", "source" ("running_log" | "stdout"), "offset" (where it was read), "line"};
    # a metric: {"step"} alone, the stream sends RunMetric's point of that step.
    data: dict[str, Any] = json_field()
    # A log line's "attempt:source:offset"; None for the other kinds.
    log_key: str | None = None
    created_at: datetime = created_at_field()

    @staticmethod
    def log_key_of(attempt: int, source: str, offset: int) -> str:
        return f"{attempt}:{source}:{offset}"


class RunLogLine(SQLModel):
    """A log line as the API pages it (a RunEvent of kind "log")."""

    id: int
    run_id: int
    attempt: int
    source: str
    offset: int
    line: str

    @classmethod
    def of(cls, event: RunEvent) -> RunLogLine:
        return cls(id=event.id, run_id=event.run_id, **event.data)


expose_owner_name(Run)
