"""Who may do what: the one place roles, ownership and read-only tokens are decided.

- admin: users, settings, everything;
- member: creates things, changes (edits, cancels, deletes) only their own, reads everyone's;
- viewer: reads only.

`check_request` runs on every state-changing request of a logged-in user (app.auth calls it), so
a viewer or a read-only token is refused before any route runs, new routes included. Routes that
act on an existing entity call `require_can_change`; admin-only routes depend on `app.auth.Admin`.
Who created a row is stamped on it at its insert (`_stamp_owner`).
"""

from __future__ import annotations

from typing import Any, NoReturn

from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession

from app.errors import Forbidden
from app.models.user import User, UserRole
from app.services import audit
from app.services.audit import READS_BY_POST

# A viewer manages their own account (password, personal tokens); a read-only token may not.
OWN_ACCOUNT_ROUTES = frozenset({
    "/account/password", "/account/tokens", "/account/tokens/{token_id}",
    "/api/v1/tokens", "/api/v1/tokens/{token_id}",
})


def check_request(user: User, route_path: str | None, *, read_only_token: bool) -> None:
    """A state-changing request (POST, PUT, PATCH, DELETE) to the route `route_path` (its template)."""
    if route_path in READS_BY_POST:
        return
    if read_only_token:
        _refuse("this API token is read-only: create a token without read-only to change things")
    if route_path in OWN_ACCOUNT_ROUTES:
        return
    if user.role == UserRole.viewer:
        _refuse(f"{user.username} is a viewer: viewers read only (an admin can change the role)")


def can_change(user: User, entity: Any) -> bool:
    """Whether `user` may edit, cancel or delete `entity` (anything with `owner_id`)."""
    if user.role == UserRole.admin:
        return True
    return user.role == UserRole.member and entity.owner_id is not None and entity.owner_id == user.id


def require_can_change(user: User, entity: Any, what: str) -> None:
    """Refuse (403) unless `user` may change `entity`; `what` names it in the message ("run 12")."""
    if can_change(user, entity):
        return
    if user.role == UserRole.viewer:
        _refuse(f"{user.username} is a viewer: viewers read only")
    owner = getattr(entity, "owner", None)
    whose = f"belongs to {owner}" if owner else "has no owner"
    _refuse(f"{what} {whose}: only its owner or an admin may change it")


def require_admin(user: User) -> None:
    if user.role != UserRole.admin:
        _refuse("only an admin may do this")


def _refuse(reason: str) -> NoReturn:
    audit.note(error=reason)  # the audit log says why, whatever the answer's form (JSON, a page)
    raise Forbidden(reason)


@event.listens_for(OrmSession, "before_flush")
def _stamp_owner(session: OrmSession, _flush_context: Any, _instances: Any) -> None:
    """A row with an `owner_id` that a user's request creates is theirs: every create path
    (API, pages, import, "run again", a config's new version) records its owner here, once.
    Rows the panel makes on its own (the demo, the scheduler) keep None."""
    request_audit = audit.current()
    if request_audit is None or request_audit.user_id is None:
        return
    for row in session.new:
        if hasattr(row, "owner_id") and row.owner_id is None:
            row.owner_id = request_audit.user_id
