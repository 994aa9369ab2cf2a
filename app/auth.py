"""Who is calling: every page and API route depends on `require_user` (which also applies the
role rules of app/services/permissions.py to state-changing requests); admin-only routes on
`Admin`; the worker channel on `require_worker`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Query, Request, status
from sqlmodel import Session

from app.db import SessionDep
from app.errors import Forbidden, NotFound
from app.models.base import row_id
from app.models.user import User
from app.security import (
    CSRF_FORM_FIELD,
    CSRF_HEADER,
    csrf_matches,
    password_fingerprint,
    read_session,
)
from app.services import audit, permissions
from app.services.audit import STATE_CHANGING_METHODS
from app.services.users import find_token, get_user
from app.settings import get_settings
from app.templating import is_htmx, templates

API_PREFIX = "/api/v1"


def _login_url(request: Request) -> str:
    # For htmx, come back to the page the fragment was on, not to the fragment's URL.
    current = request.headers.get("HX-Current-URL")
    if current:
        parts = urlsplit(current)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    else:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(target, safe='/')}"


def _not_logged_in(request: Request) -> HTTPException:
    if request.url.path.startswith(API_PREFIX):
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED, "log in or send Authorization: Bearer <API token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if is_htmx(request):
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED, "login required", headers={"HX-Redirect": _login_url(request)}
        )
    return HTTPException(status.HTTP_303_SEE_OTHER, "login required", headers={"Location": _login_url(request)})


def session_user(request: Request, session: SessionDep) -> User | None:
    """The user of the session cookie, if it is valid, their password has not changed since and
    they are not disabled (checked at every request: disabling ends their sessions at once)."""
    data = read_session(request)
    user_id = data.get("uid")
    if not isinstance(user_id, int):
        return None
    user = get_user(session, user_id)
    if user is None or user.disabled or data.get("pw") != password_fingerprint(user.password_hash):
        return None
    return user


async def _check_csrf(request: Request, expected: str | None) -> None:
    given = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    # Only url-encoded forms are read here: parsing a multipart body would consume a streaming
    # upload, so uploads must send the header.
    if given is None and content_type.startswith("application/x-www-form-urlencoded"):
        field = (await request.form()).get(CSRF_FORM_FIELD)
        given = field if isinstance(field, str) else None
    if not csrf_matches(expected, given):
        raise Forbidden(
            f"missing or wrong CSRF token: send the {CSRF_HEADER} header (or a {CSRF_FORM_FIELD} "
            "form field); reload the page if it has expired"
        )


def authenticated_user(request: Request, session: SessionDep) -> User:
    """A session cookie or, for /api/v1, `Authorization: Bearer <personal API token>`.
    Synchronous on purpose: FastAPI runs it on the threadpool, so its queries never block the
    event loop (which would stall every SSE stream)."""
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer ") and request.url.path.startswith(API_PREFIX):
        token = find_token(session, authorization.removeprefix("Bearer ").strip(), kind="api")
        user = get_user(session, token.user_id) if token is not None else None
        if user is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "unknown or revoked API token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.bearer = True
        request.state.read_only_token = token.read_only
        return user
    user = session_user(request, session)
    if user is None:
        raise _not_logged_in(request)
    return user


async def require_user(request: Request, user: Annotated[User, Depends(authenticated_user)]) -> User:
    """The logged-in user; state-changing requests of a browser session must carry the CSRF token
    (a bearer token is not sent by browsers on their own: no CSRF to fear), and must be allowed
    to the user's role and token."""
    audit.note_user(user)
    request.state.user = user
    if request.method in STATE_CHANGING_METHODS:
        if not getattr(request.state, "bearer", False):
            await _check_csrf(request, read_session(request).get("csrf"))
        route = request.scope.get("route")
        permissions.check_request(user, getattr(route, "path", None),
                                  read_only_token=getattr(request.state, "read_only_token", False))
    return user


CurrentUser = Annotated[User, Depends(require_user)]


def admin_user(user: CurrentUser) -> User:
    permissions.require_admin(user)
    return user


Admin = Annotated[User, Depends(admin_user)]
# A list's filter by who created its entries: "me", a username, or all (absent).
OwnerQuery = Annotated[str | None, Query(max_length=100, description='"me", a username, or absent for everyone\'s')]


def require_owner(load: Callable[[Session, int], Any], param: str, label: str) -> Any:
    """A route dependency: the caller may change the entity that path parameter `param` names
    (`load(session, id)` fetches it, raising NotFound); else 403 before the route runs."""

    def check(request: Request, session: SessionDep, user: CurrentUser) -> None:
        entity_id = row_id(request.path_params.get(param, ""))
        if entity_id is not None:  # anything else: the route's own validation answers 422
            permissions.require_can_change(user, load(session, entity_id), f"{label} {entity_id}")

    return Depends(check)


def auth_context(request: Request) -> dict[str, Any]:
    """What every template sees: `current_user` and `csrf_token` (for forms and base.html's htmx header)."""
    return {
        "current_user": getattr(request.state, "user", None),
        "csrf_token": read_session(request).get("csrf", ""),
    }


templates.context_processors.append(auth_context)


def require_metrics_token(request: Request) -> None:
    """Prometheus scrapes with a token of its own (TUNEBOARD_METRICS_TOKEN); without one set, the
    endpoint is off."""
    token = get_settings().metrics_token
    if not token:
        raise NotFound("metrics are off: set TUNEBOARD_METRICS_TOKEN to enable them")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "metrics token required",
                            headers={"WWW-Authenticate": "Bearer"})


def require_worker(request: Request) -> None:
    """Workers authenticate with the internal token (TUNEBOARD_INTERNAL_TOKEN), never a user's."""
    expected = f"Bearer {get_settings().worker_token}"
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "worker token required")
