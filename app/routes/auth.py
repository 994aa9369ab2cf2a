"""Logging in and out, the one-time setup page, and the account page with personal API tokens.

`public_router` needs no login; `router` (pages) and `api_router` (/api/v1) do."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response, status
from fastapi.responses import RedirectResponse

from app.auth import CurrentUser, session_user
from app.db import SessionDep
from app.errors import Forbidden
from app.models.user import ApiTokenCreated, ApiTokenPublic, PersonalTokenCreate, User, UserRole
from app.security import (
    clear_session,
    csrf_matches,
    login_needs_https,
    new_csrf_token,
    password_fingerprint,
    read_session,
    safe_next_url,
    write_session,
)
from app.services import audit, users
from app.templating import render

public_router = APIRouter(tags=["auth-pages"], include_in_schema=False)
router = APIRouter(tags=["account-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["tokens"])

EXPIRED_FORM = "This form has expired (or cookies are blocked). Reload the page and try again."


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def _anonymous_page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """A login or setup page; visitors without a session get one holding just a CSRF token, so
    that their first POST can be checked too (a cross-site POST to /setup could otherwise
    create the admin of a fresh install)."""
    data = read_session(request)
    fresh = "csrf" not in data
    if fresh:
        data = {"csrf": new_csrf_token()}
        request.state.session_data = data
    # Over plain http in prod the browser drops the Secure cookie: say so rather than bounce silently.
    context = {**context, "needs_https": login_needs_https(request)}
    response = render(request, name, context, status_code=status_code)
    if fresh:
        write_session(request, response, data)
    return response


def _log_in(request: Request, user: User, target: str) -> RedirectResponse:
    # A new CSRF token at login: a token seen before it grants nothing after.
    response = _redirect(safe_next_url(target))
    data = {"uid": user.id, "pw": password_fingerprint(user.password_hash), "csrf": new_csrf_token()}
    write_session(request, response, data)
    return response


@public_router.get("/login")
def login_page(request: Request, session: SessionDep, next: str = "/") -> Response:
    if users.user_count(session) == 0:
        return _redirect("/setup")
    if session_user(request, session) is not None:
        return _redirect(safe_next_url(next))
    return _anonymous_page(request, "auth/login.html", {"next": safe_next_url(next), "username": ""})


@public_router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    context = {"next": safe_next_url(next), "username": username}
    audit.note(action="session.login", username=username[:100])
    if not csrf_matches(read_session(request).get("csrf"), csrf_token):
        return _anonymous_page(request, "auth/login.html", {**context, "error": EXPIRED_FORM}, 403)
    try:
        user = users.authenticate(session, username, password)
    except users.AccountDisabled as refused:  # the form says so
        audit.note(error=refused.detail)
        return _anonymous_page(request, "auth/login.html", {**context, "error": refused.detail}, 403)
    if user is None:
        error = "Wrong username or password."
        audit.note(error=error)
        return _anonymous_page(request, "auth/login.html", {**context, "error": error}, 400)
    audit.note_user(user)
    audit.note(entity=("user", user.id))
    return _log_in(request, user, next)


@public_router.get("/setup")
def setup_page(request: Request, session: SessionDep) -> Response:
    if users.user_count(session) > 0:
        return _redirect("/login")
    return _anonymous_page(request, "auth/setup.html", {"username": "", "errors": {}})


@public_router.post("/setup")
def setup(
    request: Request,
    session: SessionDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    password_again: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    if users.user_count(session) > 0:
        raise Forbidden("setup is done: an admin exists, log in instead")
    page = "auth/setup.html"
    if not csrf_matches(read_session(request).get("csrf"), csrf_token):
        return _anonymous_page(request, page, {"username": username, "errors": {"form": EXPIRED_FORM}}, 403)
    if password != password_again:
        errors = {"password_again": "The two passwords differ."}
        return _anonymous_page(request, page, {"username": username, "errors": errors}, 400)
    try:
        admin = users.create_user(session, username, password, role=UserRole.admin)
    except users.UserError as error:
        errors = {error.field: error.detail}
        return _anonymous_page(request, page, {"username": username, "errors": errors}, 400)
    audit.note_user(admin)
    audit.note(action="user.setup")
    return _log_in(request, admin, "/")


@public_router.post("/logout")
async def logout(request: Request, session: SessionDep) -> Response:
    data = read_session(request)
    user = session_user(request, session)
    if user is not None:
        audit.note_user(user)
    audit.note(action="session.logout")
    if "uid" in data:
        given = request.headers.get("X-CSRF-Token") or (await request.form()).get("csrf_token")
        if not csrf_matches(data.get("csrf"), given if isinstance(given, str) else None):
            raise Forbidden("missing or wrong CSRF token")
    response = _redirect("/login")
    clear_session(request, response)
    return response


# ------------------------------------------------------------------ account page


# What the token form offers: (label, days; None: until revoked).
TOKEN_LIFETIMES = (("30 days", 30), ("90 days", 90), ("1 year", 365), ("7 days", 7), ("never", None))


def _account_context(session: SessionDep, user: User, **extra: Any) -> dict[str, Any]:
    return {"tokens": users.list_tokens(session, user), "lifetimes": TOKEN_LIFETIMES, "is_expired": users.is_expired,
            "errors": {}, **extra}


def _tokens_fragment(request: Request, session: SessionDep, user: User, **extra: Any) -> Response:
    return render(request, "auth/account.html", _account_context(session, user, **extra), block="tokens")


@router.get("/account")
def account_page(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    return render(request, "auth/account.html", _account_context(session, user))


@router.post("/account/password")
def change_password_from_page(
    request: Request, session: SessionDep, user: CurrentUser,
    current_password: Annotated[str, Form()] = "", new_password: Annotated[str, Form()] = "",
    new_password_again: Annotated[str, Form()] = "",
) -> Response:
    """htmx: the password form again, with the refusal next to its field or a confirmation."""
    audit.note(action="user.password", entity=("user", user.id))
    try:
        users.change_password(session, user, current_password, new_password, new_password_again)
    except users.UserError as error:
        context = _account_context(session, user, password_errors={error.field: error.detail})
        return render(request, "auth/account.html", context, block="password")
    response = render(request, "auth/account.html", _account_context(session, user, password_changed=True),
                      block="password")
    # This browser stays logged in with the new password's fingerprint; every other session of
    # this user (the old fingerprint) is logged out.
    write_session(request, response, {**read_session(request), "pw": password_fingerprint(user.password_hash)})
    return response


@router.post("/account/tokens")
def create_token_from_page(
    request: Request, session: SessionDep, user: CurrentUser, name: Annotated[str, Form()] = "",
    expires_in_days: Annotated[str, Form()] = "", read_only: Annotated[bool, Form()] = False,
) -> Response:
    if not name.strip():
        return _tokens_fragment(request, session, user, errors={"name": "Name the token (e.g. laptop CLI)."})
    days = int(expires_in_days) if expires_in_days in {str(d) for _, d in TOKEN_LIFETIMES if d} else None
    _token, raw = users.create_token(session, user, name[:100], kind="api", expires_in_days=days,
                                     read_only=read_only)
    return _tokens_fragment(request, session, user, new_token=raw)


@router.delete("/account/tokens/{token_id}")
def revoke_token_from_page(request: Request, session: SessionDep, user: CurrentUser, token_id: int) -> Response:
    users.revoke_token(session, user, token_id)  # already gone: the refreshed list shows that
    return _tokens_fragment(request, session, user)


# ------------------------------------------------------------------------- API


@api_router.get("/tokens")
def list_api_tokens(session: SessionDep, user: CurrentUser) -> list[ApiTokenPublic]:
    """Your personal API tokens (never the tokens themselves)."""
    return [ApiTokenPublic.model_validate(token) for token in users.list_tokens(session, user)]


@api_router.post("/tokens", status_code=status.HTTP_201_CREATED)
def create_api_token(body: PersonalTokenCreate, session: SessionDep, user: CurrentUser) -> ApiTokenCreated:
    """A new personal API token; `token` is shown in this response only."""
    token, raw = users.create_token(session, user, body.name, kind="api", expires_in_days=body.expires_in_days,
                                    read_only=body.read_only)
    return ApiTokenCreated.model_validate({**token.model_dump(), "owner": user.username, "token": raw})


@api_router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_api_token(token_id: int, session: SessionDep, user: CurrentUser) -> None:
    users.revoke_api_token(session, user, token_id)
