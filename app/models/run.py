"""Training runs, their metric points, log lines and the event stream the dashboard replays."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field
from app.wire import MetricPoint


class RunStatus(StrEnum):
    queued = "queued"
    starting = "starting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"

    def is_finished(self) -> bool:
        return self in FINISHED_RUN_STATUSES

    def is_active(self) -> bool:
        return not self.is_finished()


FINISHED_RUN_STATUSES = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.lost}
)


class RunPriority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def rank(self) -> int:
        """Sort key: the scheduler takes lower ranks first (FIFO within one)."""
        return ("high", "normal", "low").index(self.value)


class Run(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
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
    # The panel's dispatch of a queued attempt to one worker: the task carries dispatch_id and
    # only that worker's claim with it is taken; one not claimed in time is dispatched again.
    dispatch_id: str | None = None
    dispatched_worker_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    # The GPUs the dispatch hands out (held from dispatch until the attempt ends).
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = Field(default=None, index=True)
    # The worker process (instance) that claimed it: a restarted worker's new instance means
    # this attempt died with the old one.
    worker_instance: str | None = None
    task_id: str | None = None
    cancel_requested: bool = False
    # A client's key for one start request: a repeated (double-clicked) start returns the same run.
    idempotency_key: str | None = Field(default=None, unique=True, max_length=200)
    train_yaml: str = Field(default="", sa_column=Column(Text, nullable=False))
    # Dataset content hashes and the library versions the run trained with.
    lineage: dict[str, Any] = json_field()
    current_step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    percentage: float = 0.0
    elapsed_s: float = 0.0
    remaining_s: float | None = None
    exit_code: int | None = None
    results: dict[str, Any] = json_field()
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


class RunPublic(SQLModel):
    id: int
    name: str
    config_id: int
    status: RunStatus
    status_reason: str
    attempt: int
    resume_from: str | None
    gpus_requested: int
    priority: RunPriority
    queued_at: datetime
    gpu_ids: list[int]
    worker_id: str | None
    dispatched_worker_id: str | None
    cancel_requested: bool
    current_step: int
    total_steps: int
    epoch: float
    percentage: float
    elapsed_s: float
    remaining_s: float | None
    exit_code: int | None
    results: dict[str, Any]
    lineage: dict[str, Any]
    has_adapter: bool
    checkpoints: list[dict[str, Any]]
    batch_plan: dict[str, Any] = {}
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
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


class RunEvent(SQLModel, table=True):
    """What the live dashboard streams: its id is the SSE event id and the `?after=` cursor."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True, ondelete="CASCADE")
    kind: str  # "metric" | "log" | "status"
    data: dict[str, Any] = json_field()
    created_at: datetime = created_at_field()


class RunLogLine(SQLModel, table=True):
    """A log line, keyed by where it was read so that a re-sent batch adds nothing."""

    __table_args__ = (UniqueConstraint("run_id", "attempt", "source", "offset"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True, ondelete="CASCADE")
    attempt: int
    source: str  # "running_log" | "stdout"
    offset: int
    line: str = Field(sa_column=Column(Text, nullable=False))
