"""Workers as they registered with the app, kept up to date by their heartbeats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


class Worker(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=200)
    hostname: str
    queues: list[str] = json_field(list)
    # [{"index", "name", "memory_total_mib", "memory_used_mib", "utilization"}]; empty: CPU-only.
    gpus: list[dict[str, Any]] = json_field(list)
    doctor: dict[str, Any] = json_field()
    started_at: datetime = created_at_field()
    last_seen_at: datetime | None = timestamp_field()
