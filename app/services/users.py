"""Users, passwords and API tokens (personal tokens, kind "api", and gateway keys, kind "gateway")."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, select

from app.models.base import as_utc, utcnow
from app.models.user import ApiToken, User
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


class UserError(ValueError):
    """A refused user change; `field` names the form field it belongs to."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def user_count(session: Session) -> int:
    return session.exec(select(func.count()).select_from(User)).one()


def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def get_user_by_name(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username)).first()


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError("password", f"Use at least {MIN_PASSWORD_LENGTH} characters.")


def create_user(session: Session, username: str, password: str, *, is_admin: bool = False) -> User:
    username = username.strip()
    if not USERNAME_PATTERN.match(username):
        raise UserError("username", "Use 1–100 letters, digits or . _ @ - (no spaces).")
    if get_user_by_name(session, username) is not None:
        raise UserError("username", f"User {username} already exists.")
    check_password(password)
    user = User(username=username, password_hash=hash_password(password), is_admin=is_admin)
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def set_password(session: Session, user: User, password: str) -> None:
    check_password(password)
    user.password_hash = hash_password(password)
    session.add(user)
    session.commit()


def change_password(session: Session, user: User, current: str, new: str, new_again: str) -> None:
    """The account page's change: the current password first. Every session of the user that
    holds the old password's fingerprint stops working (app.auth checks it)."""
    if not verify_password(user.password_hash, current):
        raise UserError("current_password", "That is not your current password.")
    if new != new_again:
        raise UserError("new_password_again", "The two new passwords differ.")
    if new == current:
        raise UserError("new_password", "Choose a password other than the current one.")
    check_password(new)
    set_password(session, user, new)


# Verified against when the username is unknown, so both failures take the same time.
_UNKNOWN_USER_HASH: dict[str, str] = {}


def authenticate(session: Session, username: str, password: str) -> User | None:
    user = get_user_by_name(session, username.strip())
    if user is None:
        dummy = _UNKNOWN_USER_HASH.setdefault("hash", hash_password("no such user"))
        verify_password(dummy, password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if password_needs_rehash(user.password_hash):
        set_password(session, user, password)
    return user


def create_token(
    session: Session, user: User, name: str, kind: str = "api", *, expires_in_days: int | None = None,
) -> tuple[ApiToken, str]:
    """A new token for `user`, valid for `expires_in_days` (None: until revoked); returns the row
    and the raw token, which is never stored."""
    raw = new_api_token()
    token = ApiToken(
        user_id=user.id, kind=kind, name=name.strip(), prefix=token_display_prefix(raw),
        token_hash=hash_api_token(raw),
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


def is_expired(token: ApiToken, now: datetime | None = None) -> bool:
    return token.expires_at is not None and as_utc(token.expires_at) <= (now or utcnow())


def find_token(session: Session, raw: str, kind: str = "api") -> ApiToken | None:
    """The live (not revoked, not expired) token whose hash matches `raw`; records its use."""
    statement = select(ApiToken).where(
        ApiToken.token_hash == hash_api_token(raw), ApiToken.kind == kind,
        ApiToken.revoked_at.is_(None),
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
