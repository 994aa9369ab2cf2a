"""The audit log: one entry per state-changing request of a user (who, what, when, from which
address, and how it ended), written by one middleware (app/web/audit.py) that sees every such
request; this module keeps what a request notes as it goes, the entries and their reading.

Why a middleware and not the services: most state changes are conditional UPDATEs that the ORM
never sees as objects, and a refused request changes nothing a service could record, while the
request always knows its actor, its route and its answer. The entity a create made comes from the
ORM (`after_flush` notes each row the request inserted); the entity a route acts on, from its path
parameters. Entries are only ever inserted: no route updates or deletes one.

Not recorded: reads, the workers' /internal channel (their reports are the runs' own history)
and the gateway's /v1 completions (requests, not changes).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import field_validator
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, SQLModel, col, select

from app.models.audit import AuditEntry, AuditEntryPublic, AuditOutcome
from app.models.user import User

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# POST routes that compute an answer and change nothing (app/services/permissions.py lets
# viewers use them too).
READS_BY_POST = frozenset({
    "/api/v1/configs/validate", "/api/v1/configs/estimate",
    "/configs/form/estimate", "/configs/form/validate", "/configs/{config_id}/validate",
})
# Rows a request inserts as part of another change, never the entity it made.
BOOKKEEPING_TABLES = frozenset({"audit_entry", "runevent", "runmetric"})


@dataclass
class RequestAudit:
    """What one request tells its audit entry as it goes: set by app.auth (the user), by the
    login route (an action of its own), noted by the ORM (rows inserted)."""

    # The actor, read when noted: the route's session (and its User) is closed by the time the
    # entry is written.
    user_id: int | None = None
    username: str = ""
    action: str | None = None
    entity: tuple[str, int] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    created: list[tuple[str, int]] = field(default_factory=list)


REQUEST_AUDIT: ContextVar[RequestAudit | None] = ContextVar("request_audit", default=None)


def current() -> RequestAudit | None:
    return REQUEST_AUDIT.get()


def note_user(user: User) -> None:
    """The actor of this request (app.auth calls it for every logged-in request; login for its user)."""
    audit = REQUEST_AUDIT.get()
    if audit is not None:
        audit.user_id, audit.username = user.id, user.username


def note(*, action: str | None = None, entity: tuple[str, int] | None = None, **detail: Any) -> None:
    """Name this request's action or entity where its route cannot say it (login, a user's change)."""
    audit = REQUEST_AUDIT.get()
    if audit is None:
        return
    audit.action = action or audit.action
    audit.entity = entity or audit.entity
    audit.detail.update(detail)


@event.listens_for(OrmSession, "after_flush")
def _note_inserted_rows(session: OrmSession, _flush_context: Any) -> None:
    audit = REQUEST_AUDIT.get()
    if audit is None:
        return
    for row in session.new:
        table = getattr(row, "__tablename__", None)
        inserted_id = getattr(row, "id", None)
        if isinstance(table, str) and table not in BOOKKEEPING_TABLES and isinstance(inserted_id, int):
            audit.created.append((table, inserted_id))


def record(session: Session, action: str, entity_type: str, entity_id: int | None, *, user_id: int | None = None,
           username: str = "", address: str = "", outcome: AuditOutcome = AuditOutcome.done,
           detail: dict[str, Any] | None = None) -> None:
    """Append one entry and commit it (the middleware's, and the server shell's `tuneboard user`)."""
    session.add(AuditEntry(user_id=user_id, username=username, address=address, action=action,
                           entity_type=entity_type, entity_id=entity_id, outcome=outcome, detail=detail or {}))
    session.commit()


# ------------------------------------------------------------------------- reading


class AuditFilter(SQLModel):
    """What the audit page and `GET /api/v1/audit` filter by (query parameters of those names)."""

    username: str | None = None
    action: str | None = None  # a prefix: "run" matches run.create, run.cancel …
    entity_type: str | None = None
    entity_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:  # an empty field of the page's filter form
        return None if value == "" else value


def _filtered(filters: AuditFilter) -> Any:
    statement = select(AuditEntry)
    if filters.username:
        statement = statement.where(AuditEntry.username == filters.username)
    if filters.action:
        statement = statement.where(col(AuditEntry.action).startswith(filters.action, autoescape=True))
    if filters.entity_type:
        statement = statement.where(AuditEntry.entity_type == filters.entity_type)
    if filters.entity_id is not None:
        statement = statement.where(AuditEntry.entity_id == filters.entity_id)
    if filters.since is not None:
        statement = statement.where(AuditEntry.created_at >= filters.since)
    if filters.until is not None:
        statement = statement.where(AuditEntry.created_at < filters.until)
    return statement


def list_entries(session: Session, filters: AuditFilter, *, limit: int = 100, before_id: int | None = None,
                 ) -> list[AuditEntry]:
    """Newest first; `before_id` pages back."""
    statement = _filtered(filters)
    if before_id is not None:
        statement = statement.where(col(AuditEntry.id) < before_id)
    return list(session.exec(statement.order_by(col(AuditEntry.id).desc()).limit(limit)))


def iter_entries(session: Session, filters: AuditFilter, batch: int = 500) -> Iterator[AuditEntry]:
    """Every matching entry, oldest first, read in batches (an export of a long log)."""
    after = 0
    while True:
        rows = list(session.exec(_filtered(filters).where(col(AuditEntry.id) > after)
                                 .order_by(col(AuditEntry.id)).limit(batch)))
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1].id


EXPORT_COLUMNS = ("id", "created_at", "username", "user_id", "address", "action", "entity_type", "entity_id",
                  "outcome", "detail")


def _public(entry: AuditEntry) -> dict[str, Any]:
    return AuditEntryPublic.model_validate(entry).model_dump(mode="json")


def export_jsonl(entries: Iterable[AuditEntry]) -> Iterator[str]:
    for entry in entries:
        yield json.dumps(_public(entry), ensure_ascii=False) + "\n"


def export_csv(entries: Iterable[AuditEntry]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(EXPORT_COLUMNS)
    yield flush()
    for entry in entries:
        row = _public(entry)
        row["detail"] = json.dumps(row["detail"], ensure_ascii=False)
        writer.writerow([row[name] if row[name] is not None else "" for name in EXPORT_COLUMNS])
        yield flush()
