"""Users, their roles, passwords and API tokens (personal tokens, kind "api", and gateway keys,
kind "gateway")."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from app.errors import Conflict, Forbidden, Invalid, NotFound
from app.models.base import as_utc, utcnow
from app.models.user import ApiToken, User, UserRole, UserUpdate
from app.security import (
    hash_api_token,
    hash_password,
    new_api_token,
    password_needs_rehash,
    token_display_prefix,
    verify_password,
)

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
MIN_PASSWORD_LENGTH = 8
# A token's "last used" is a hint, not an audit log: one write a minute at most per token.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class UserError(Invalid):
    """A refused user change; `field` names the form field it belongs to."""


class AccountDisabled(Forbidden):
    """The right password of a disabled user."""


class LastAdmin(Conflict):
    """The panel would be left without an admin who can log in."""


def user_count(session: Session) -> int:
    return session.exec(select(func.count()).select_from(User)).one()


def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def require_user(session: Session, user_id: int) -> User:
    user = get_user(session, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(User.username)))


def _active_admin_count(session: Session) -> int:
    statement = select(func.count()).select_from(User).where(User.role == UserRole.admin, User.disabled.is_(False))
    return session.exec(statement).one()


def get_user_by_name(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username)).first()


def check_password(password: str, field: str = "password") -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"Use at least {MIN_PASSWORD_LENGTH} characters.", field=field)


def create_user(session: Session, username: str, password: str, *, role: UserRole = UserRole.member) -> User:
    username = username.strip()
    if not USERNAME_PATTERN.match(username):
        raise UserError("Use 1–100 letters, digits or . _ @ - (no spaces).", field="username")
    if get_user_by_name(session, username) is not None:
        raise UserError(f"User {username} already exists.", field="username")
    check_password(password)
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """Also the admin's reset: every session holding the old password's fingerprint ends."""
    check_password(password)
    user.password_hash = hash_password(password)
    session.add(user)
    session.commit()


def update_user(session: Session, user: User, changes: UserUpdate) -> User:
    """An admin's change of `user`'s role, disabled flag or password (only the fields set). The
    last enabled admin can be neither demoted nor disabled: nobody could manage users after."""
    loses_admin = user.role == UserRole.admin and not user.disabled and (
        (changes.role is not None and changes.role != UserRole.admin) or changes.disabled is True
    )
    if loses_admin and _active_admin_count(session) <= 1:
        raise LastAdmin(f"{user.username} is the last admin: make another user an admin first",
                        field="role" if changes.role is not None else "disabled")
    if changes.password is not None:
        check_password(changes.password)
        user.password_hash = hash_password(changes.password)
    if changes.role is not None:
        user.role = changes.role
    if changes.disabled is not None:
        user.disabled = changes.disabled
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def change_password(session: Session, user: User, current: str, new: str, new_again: str) -> None:
    """The account page's change: the current password first. Every session of the user that
    holds the old password's fingerprint stops working (app.auth checks it)."""
    if not verify_password(user.password_hash, current):
        raise UserError("That is not your current password.", field="current_password")
    if new != new_again:
        raise UserError("The two new passwords differ.", field="new_password_again")
    if new == current:
        raise UserError("Choose a password other than the current one.", field="new_password")
    check_password(new, field="new_password")
    set_password(session, user, new)


# Verified against when the username is unknown, so both failures take the same time.
_UNKNOWN_USER_HASH: dict[str, str] = {}


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The user with this name and password; None for a wrong pair. A disabled user who knows
    their password is told so (AccountDisabled) rather than sent to retype it."""
    user = get_user_by_name(session, username.strip())
    if user is None:
        dummy = _UNKNOWN_USER_HASH.setdefault("hash", hash_password("no such user"))
        verify_password(dummy, password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if user.disabled:
        raise AccountDisabled("This account is disabled: ask an admin to enable it.")
    if password_needs_rehash(user.password_hash):
        set_password(session, user, password)
    return user


def create_token(
    session: Session, user: User, name: str, kind: str = "api", *, expires_in_days: int | None = None,
    read_only: bool = False,
) -> tuple[ApiToken, str]:
    """A new token for `user`, valid for `expires_in_days` (None: until revoked), acting with the
    user's role or, `read_only`, only reading; returns the row and the raw token, never stored."""
    raw = new_api_token()
    token = ApiToken(
        user_id=user.id, kind=kind, name=name.strip(), prefix=token_display_prefix(raw),
        token_hash=hash_api_token(raw), read_only=read_only,
        expires_at=utcnow() + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    session.add(token)
    session.commit()
    session.refresh(token)
    return token, raw


def list_tokens(session: Session, user: User, kind: str = "api") -> list[ApiToken]:
    statement = (
        select(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.kind == kind, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.created_at.desc())
    )
    return list(session.exec(statement))


def revoke_token(session: Session, user: User, token_id: int, kind: str = "api") -> bool:
    """Revoke one of `user`'s tokens; False when there is no such live token of theirs."""
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id or token.kind != kind or token.revoked_at is not None:
        return False
    token.revoked_at = utcnow()
    session.add(token)
    session.commit()
    return True


def revoke_api_token(session: Session, user: User, token_id: int) -> None:
    """The API's revoke: a token that is not a live one of `user`'s is a 404 (the pages just refresh)."""
    if not revoke_token(session, user, token_id):
        raise NotFound(f"no live API token {token_id} of yours")


def is_expired(token: ApiToken, now: datetime | None = None) -> bool:
    return token.expires_at is not None and as_utc(token.expires_at) <= (now or utcnow())


def find_token(session: Session, raw: str, kind: str = "api") -> ApiToken | None:
    """The live (not revoked, not expired, of a user not disabled) token whose hash matches
    `raw`; records its use. Checked at every request: disabling a user stops their tokens at once."""
    statement = select(ApiToken).join(User, User.id == ApiToken.user_id).where(
        ApiToken.token_hash == hash_api_token(raw), ApiToken.kind == kind,
        ApiToken.revoked_at.is_(None), User.disabled.is_(False),
    )
    token = session.exec(statement).first()
    now = utcnow()
    if token is None or is_expired(token, now):
        return None
    last_used = token.last_used_at
    if last_used is not None and last_used.tzinfo is None:  # SQLite returns naive UTC
        last_used = last_used.replace(tzinfo=now.tzinfo)
    if last_used is None or now - last_used > LAST_USED_RESOLUTION:
        token.last_used_at = now
        session.add(token)
        session.commit()
        session.refresh(token)
    return token


def owner_id_filter(session: Session, user: User, owner: str | None) -> int | None:
    """A list's `?owner=`: "me" is the caller, a username that user; None, "" or "all":
    everyone's (None). An unknown username matches nobody (-1)."""
    if not owner or owner == "all":
        return None
    if owner == "me":
        return user.id
    named = get_user_by_name(session, owner)
    return named.id if named is not None else -1


def owned_by(rows: list[Any], owner_id: int | None) -> list[Any]:
    """The rows of a list that `owner_id` created (all of them for None)."""
    return rows if owner_id is None else [row for row in rows if row.owner_id == owner_id]
