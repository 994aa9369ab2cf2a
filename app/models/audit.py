"""The audit log: who changed what, when and from which address. Append-only: the panel writes
entries and never updates or deletes one (no route does)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field


class AuditOutcome(StrEnum):
    """From the answer's status: 2xx/3xx done, 401/403 denied, other 4xx refused, 5xx failed."""

    done = "done"
    denied = "denied"
    refused = "refused"
    failed = "failed"


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = created_at_field()
    # The actor; the username is kept as it was then (None/"" for an anonymous login attempt).
    user_id: int | None = Field(default=None, index=True)
    username: str = ""
    address: str = ""
    # What was asked, as <entity>.<verb>: "run.create", "run.cancel", "user.update", "session.login".
    action: str = Field(index=True)
    # What it touched: a table name ("run", "dataset", "user", ...) and the row's id (the row a
    # create made, else the one the route names).
    entity_type: str = Field(default="", index=True)
    entity_id: int | None = None
    outcome: AuditOutcome = AuditOutcome.done
    # The request ("POST /api/v1/runs/{run_id}/cancel"), its status code and path parameters,
    # the fields an admin changed, why it was denied.
    detail: dict[str, Any] = json_field()


class AuditEntryPublic(SQLModel):
    id: int
    created_at: datetime
    user_id: int | None
    username: str
    address: str
    action: str
    entity_type: str
    entity_id: int | None
    outcome: AuditOutcome
    detail: dict[str, Any]
