"""Exports: a run's adapter (final or checkpoint) merged into its base model by
`llamafactory-cli export`, stored as the run's artifact "export-N" and registered as a model."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field
from app.models.job import JobStatus


class ModelExport(SQLModel, table=True):
    __tablename__ = "model_export"

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True, ondelete="CASCADE")
    checkpoint: str | None = None  # None: the run's final adapter
    adapter_digest: str = ""
    model_path: str
    template: str
    export_size: int = 5
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    status_reason: str = ""
    gpus_requested: int = 0
    dispatch_id: str | None = None
    dispatched_worker_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = None
    cancel_requested: bool = False
    heartbeat_at: datetime | None = timestamp_field()
    # The registered merged model (ModelEntry), once it succeeded.
    model_id: int | None = None
    size: int = 0
    elapsed_s: float | None = None
    created_at: datetime = created_at_field()
    started_at: datetime | None = timestamp_field()
    finished_at: datetime | None = timestamp_field()
