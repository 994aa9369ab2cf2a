"""What a gateway key (an ApiToken of kind "gateway") may use: one deployment or all, its rate
limits, and its usage per day."""

from __future__ import annotations

from datetime import date

from sqlmodel import Field, SQLModel

from app.models.user import ApiTokenCreate, ApiTokenPublic


class GatewayKeyLimit(SQLModel, table=True):
    __tablename__ = "gateway_key_limit"

    token_id: int = Field(foreign_key="apitoken.id", primary_key=True, ondelete="CASCADE")
    # The deployment's gateway `model` name (it survives a redeploy); None: every model.
    deployment_name: str | None = Field(default=None, max_length=200)
    # None: no limit.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class GatewayKeyUsage(SQLModel, table=True):
    """One row per key per UTC day, written by the gateway's batched flush."""

    __tablename__ = "gateway_key_usage"

    token_id: int = Field(foreign_key="apitoken.id", primary_key=True, ondelete="CASCADE")
    day: date = Field(primary_key=True)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GatewayKeyCreate(ApiTokenCreate):
    deployment_name: str | None = Field(default=None, max_length=200)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class GatewayKeyUsagePublic(SQLModel):
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int


class GatewayKeyPublic(ApiTokenPublic):
    deployment_name: str | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # The last days with traffic, newest first.
    usage: list[GatewayKeyUsagePublic] = []


class GatewayKeyCreated(GatewayKeyPublic):
    """The only time the raw key is ever shown."""

    token: str
