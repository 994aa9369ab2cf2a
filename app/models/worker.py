"""Workers as they registered with the app, kept up to date by their heartbeats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


class WorkerBase(SQLModel):
    id: str = Field(primary_key=True, max_length=200)
    hostname: str
    # Where the panel's gateway reaches this worker's inference servers.
    advertise_host: str = "127.0.0.1"
    queues: list[str] = json_field(list)
    # [{"index", "name", "memory_total_mib", "memory_used_mib", "utilization"}]; empty: CPU-only.
    gpus: list[dict[str, Any]] = json_field(list)
    # Runs on the CPU at once, and inference servers at once (the scheduler's capacity).
    cpu_train_slots: int = 0
    serve_slots: int = 0
    # Registered model folders it holds: path → fingerprint, as it read them.
    models: dict[str, str] = json_field()
    # The last `tuneboard doctor` report: {"checks": [...], "facts": {...}, "worst", "created_at"}.
    doctor: dict[str, Any] = json_field()
    started_at: datetime = created_at_field()
    last_seen_at: datetime | None = timestamp_field()
    # Set by its last heartbeat when it shut down cleanly; a killed worker just goes silent.
    stopped_at: datetime | None = timestamp_field()


class Worker(WorkerBase, table=True):
    # The worker process that sent the last heartbeat (new at each start).
    instance_id: str = ""
    doctor_requested: bool = False


class WorkerPublic(WorkerBase):
    online: bool
