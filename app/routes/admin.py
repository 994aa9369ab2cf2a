"""Admin pages and API: users (create, change role, disable, reset password) and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from app.auth import Admin
from app.db import SessionDep
from app.models.audit import AuditEntryPublic
from app.models.user import User, UserCreate, UserPublic, UserRole, UserUpdate
from app.services import audit, users
from app.templating import is_htmx, render

router = APIRouter(tags=["admin-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["admin"])

PAGE_SIZE = 100
EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


AuditQuery = Annotated[audit.AuditFilter, Query()]


# ------------------------------------------------------------------------ pages


def _users_page(request: Request, session: SessionDep, status_code: int = 200, **extra: Any) -> Response:
    context = {"section": "admin", "users": users.list_users(session), "roles": list(UserRole),
               "errors": {}, "form": {}, **extra}
    htmx = is_htmx(request)
    # app.js swaps a 4xx fragment only where HX-Retarget says: here, the users block itself.
    headers = {"HX-Retarget": "#users", "HX-Reswap": "innerHTML"} if htmx and status_code >= 400 else None
    return render(request, "admin/users.html", context, block="users" if htmx else None,
                  status_code=status_code, headers=headers)


@router.get("/admin/users")
def users_page(request: Request, session: SessionDep, _admin: Admin) -> Response:
    return _users_page(request, session)


@router.post("/admin/users")
def create_user_from_page(
    request: Request, session: SessionDep, _admin: Admin, username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "", role: Annotated[UserRole, Form()] = UserRole.member,
) -> Response:
    try:
        created = users.create_user(session, username, password, role=role)
    except users.UserError as error:  # the form again, the message next to its field
        audit.note(error=error.detail)
        return _users_page(request, session, 422, errors={error.field: error.detail},
                           form={"username": username, "role": role})
    return _users_page(request, session, message=f"Created {created.role.value} {created.username}.")


@router.post("/admin/users/{user_id}")
def update_user_from_page(
    request: Request, session: SessionDep, _admin: Admin, user_id: int,
    role: Annotated[UserRole | None, Form()] = None, disabled: Annotated[bool | None, Form()] = None,
    password: Annotated[str, Form()] = "",
) -> Response:
    """One row's change: its role, disabling or enabling it, or a new password."""
    user = users.require_user(session, user_id)
    changes = UserUpdate(role=role, disabled=disabled, password=password or None)
    audit.note(changed=sorted(changes.model_dump(exclude_none=True)))
    try:
        users.update_user(session, user, changes)
    except (users.UserError, users.LastAdmin) as error:
        audit.note(error=error.detail)
        return _users_page(request, session, 422, row_error={"user_id": user_id, "message": error.detail})
    return _users_page(request, session, message=f"Saved {user.username}.")


@router.get("/admin/audit")
def audit_page(request: Request, session: SessionDep, _admin: Admin, filters: AuditQuery,
               before_id: int | None = None) -> Response:
    entries = audit.list_entries(session, filters, limit=PAGE_SIZE, before_id=before_id)
    query = {k: v for k, v in request.query_params.items() if k != "before_id" and v}
    context = {"section": "admin", "entries": entries, "filters": filters, "query": query,
               "more": len(entries) == PAGE_SIZE, "usernames": [u.username for u in users.list_users(session)]}
    return render(request, "admin/audit.html", context, block="entries" if is_htmx(request) else None)


@router.get("/admin")
def admin_home(_admin: Admin) -> RedirectResponse:
    return RedirectResponse("/admin/users", status_code=status.HTTP_303_SEE_OTHER)


# -------------------------------------------------------------------------- API


@api_router.get("/users")
def list_users_api(session: SessionDep, _admin: Admin) -> list[UserPublic]:
    return [UserPublic.model_validate(user) for user in users.list_users(session)]


@api_router.post("/users", status_code=status.HTTP_201_CREATED)
def create_user_api(body: UserCreate, session: SessionDep, _admin: Admin) -> UserPublic:
    return UserPublic.model_validate(users.create_user(session, body.username, body.password, role=body.role))


@api_router.get("/users/{user_id}")
def get_user_api(user_id: int, session: SessionDep, _admin: Admin) -> UserPublic:
    return UserPublic.model_validate(users.require_user(session, user_id))


@api_router.patch("/users/{user_id}")
def update_user_api(user_id: int, body: UserUpdate, session: SessionDep, _admin: Admin) -> UserPublic:
    """Change a user's `role`, `disabled` or `password` (only the fields sent). A disabled user's
    sessions and tokens stop working at their next request; the last admin stays an admin."""
    audit.note(changed=sorted(body.model_dump(exclude_unset=True)))
    user: User = users.require_user(session, user_id)
    return UserPublic.model_validate(users.update_user(session, user, body))


@api_router.get("/audit")
def list_audit_api(session: SessionDep, _admin: Admin, filters: AuditQuery,
                   limit: Annotated[int, Query(ge=1, le=1000)] = PAGE_SIZE,
                   before_id: int | None = None) -> list[AuditEntryPublic]:
    """The audit log, newest first: filter by `username`, `action` (a prefix: `run` or `run.cancel`),
    `entity_type`, `entity_id`, `since`/`until` (ISO times); page back with `before_id`."""
    entries = audit.list_entries(session, filters, limit=limit, before_id=before_id)
    return [AuditEntryPublic.model_validate(entry) for entry in entries]


@api_router.get("/audit/export", response_class=StreamingResponse,
                responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}})
def export_audit_api(session: SessionDep, _admin: Admin, filters: AuditQuery,
                     format: Annotated[str, Query(pattern="^(csv|jsonl)$")] = "csv") -> StreamingResponse:
    """Every matching entry, oldest first, as CSV or JSON lines."""
    entries = audit.iter_entries(session, filters)
    lines = audit.export_csv(entries) if format == "csv" else audit.export_jsonl(entries)
    return StreamingResponse(lines, media_type=EXPORT_TYPES[format],
                             headers={"Content-Disposition": f'attachment; filename="audit.{format}"'})
