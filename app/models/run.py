"""Training runs, their metric points, log lines and the event stream the dashboard replays."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


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
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = Field(default=None, index=True)
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
    # Reported by the worker at finish: where the run folder's output lives on its machine.
    output_dir: str | None = None
    adapter_path: str | None = None
    # [{"name": "checkpoint-N", "step": N, "complete": bool}]
    checkpoints: list[dict[str, Any]] = json_field(list)
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
    gpu_ids: list[int]
    worker_id: str | None
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
    output_dir: str | None
    adapter_path: str | None
    checkpoints: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class MetricPoint(SQLModel):
    """One logged step as a worker reports it (fields unknown at that step stay None)."""

    step: int
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    total_tokens: int | None = None
    grad_norm: float | None = None
    gpu_util: float | None = None
    gpu_mem_mib: float | None = None
    elapsed_s: float | None = None


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
