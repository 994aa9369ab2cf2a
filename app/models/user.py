"""People who log in, their personal API tokens and the gateway's API keys."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import column_property
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, timestamp_field


class UserRole(StrEnum):
    """admin: users, settings, everything; member: creates things, changes their own, reads
    everyone's; viewer: reads only (app/services/permissions.py enforces it)."""

    admin = "admin"
    member = "member"
    viewer = "viewer"


class UserBase(SQLModel):
    username: str = Field(index=True, unique=True, max_length=100)
    role: UserRole = UserRole.member
    # A disabled user's sessions and tokens are refused at their next request (app/auth.py).
    disabled: bool = False
    created_at: datetime = created_at_field()


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    password_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.admin


class UserPublic(UserBase):
    id: int


class UserCreate(SQLModel):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)
    role: UserRole = UserRole.member


class UserUpdate(SQLModel):
    """An admin's change of a user: only the fields sent are changed."""

    role: UserRole | None = None
    disabled: bool | None = None
    password: str | None = Field(default=None, min_length=1, max_length=1000)


def owner_id_field() -> Any:
    """Who created a row (None: made by the panel itself, e.g. the demo, or before owners existed)."""
    return Field(default=None, foreign_key="user.id", index=True, ondelete="SET NULL")


def expose_owner_name(model: type[SQLModel], column: str = "owner_id") -> None:
    """Give `model` an `owner` attribute, the owner's username, loaded with the row itself (a
    correlated subquery), so that public models and templates read it without another query."""
    owner_column = getattr(model, column)
    username = select(User.username).where(User.id == owner_column).correlate_except(User).scalar_subquery()
    model.__mapper__.add_property("owner", column_property(username))


class OwnedPublic(SQLModel):
    """The `owner` (username) every owned entity's public model shows."""

    owner: str | None = None


class ApiTokenBase(SQLModel):
    kind: str = "api"
    name: str = Field(max_length=100)
    prefix: str
    # Narrowed at creation: the token may read but never change anything, whatever its user's role.
    read_only: bool = False
    created_at: datetime = created_at_field()
    last_used_at: datetime | None = timestamp_field()
    # None: it never expires; past it the token is refused like a revoked one.
    expires_at: datetime | None = timestamp_field()


class ApiToken(ApiTokenBase, table=True):
    """A personal token for /api/v1 and the CLI (kind "api") or a gateway key (kind "gateway");
    only its hash is stored."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    token_hash: str = Field(unique=True)
    revoked_at: datetime | None = timestamp_field()


class ApiTokenCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    # None: the token never expires.
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class PersonalTokenCreate(ApiTokenCreate):
    # The token may read but never change anything, whatever its user's role.
    read_only: bool = False


class ApiTokenPublic(ApiTokenBase, OwnedPublic):
    id: int


class ApiTokenCreated(ApiTokenPublic):
    """The only time the raw token is ever shown."""

    token: str


expose_owner_name(ApiToken, "user_id")
