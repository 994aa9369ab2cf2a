"""People who log in, their personal API tokens and the gateway's API keys."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, timestamp_field


class User(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, unique=True, max_length=100)
    password_hash: str
    is_admin: bool = False
    created_at: datetime = created_at_field()


class ApiToken(SQLModel, table=True):
    """A personal token for /api/v1 and the CLI (kind "api") or a gateway key (kind "gateway");
    only its hash is stored."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    kind: str = "api"
    name: str = Field(max_length=100)
    prefix: str
    token_hash: str = Field(unique=True)
    created_at: datetime = created_at_field()
    last_used_at: datetime | None = timestamp_field()
    revoked_at: datetime | None = timestamp_field()
    # None: it never expires; past it the token is refused like a revoked one.
    expires_at: datetime | None = timestamp_field()


class ApiTokenCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    # None: the token never expires.
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiTokenPublic(SQLModel):
    id: int
    kind: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None


class ApiTokenCreated(ApiTokenPublic):
    """The only time the raw token is ever shown."""

    token: str
