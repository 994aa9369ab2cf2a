"""Webhooks: a user's URL told about run and deployment outcomes, and each delivery to it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


class WebhookEvent(StrEnum):
    run_succeeded = "run.succeeded"
    run_failed = "run.failed"
    run_lost = "run.lost"
    run_cancelled = "run.cancelled"
    deployment_ready = "deployment.ready"
    deployment_failed = "deployment.failed"


class WebhookScope(StrEnum):
    """Whose runs and deployments a webhook hears about."""

    mine = "mine"
    everyone = "everyone"


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting for its next attempt (also after a panel restart)
    delivered = "delivered"
    failed = "failed"  # every attempt was refused


class Webhook(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True, ondelete="CASCADE")
    url: str = Field(max_length=2000)
    events: list[str] = json_field(list)
    scope: WebhookScope = WebhookScope.mine
    # Send Slack's incoming-webhook body, {"text": ...}, instead of the event's JSON.
    slack: bool = False
    # The HMAC-SHA256 key of X-Tuneboard-Signature: shown once, kept to sign with.
    secret: str
    created_at: datetime = created_at_field()


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_delivery"

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(foreign_key="webhook.id", index=True, ondelete="CASCADE")
    event: str
    # The exact bytes signed and sent, so that every retry sends the same body and signature.
    body: str = Field(sa_column=Column(Text, nullable=False))
    status: DeliveryStatus = Field(default=DeliveryStatus.pending, index=True)
    attempts: int = 0
    # The HTTP status of each attempt in order (0: no answer, see last_error).
    response_codes: list[int] = json_field(list)
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False))
    next_attempt_at: datetime | None = timestamp_field()
    created_at: datetime = created_at_field()
    finished_at: datetime | None = timestamp_field()


class WebhookCreate(SQLModel):
    url: str = Field(min_length=1, max_length=2000)
    events: list[WebhookEvent] = Field(min_length=1)
    scope: WebhookScope = WebhookScope.mine
    slack: bool = False


class WebhookPublic(SQLModel):
    id: int
    url: str
    events: list[str]
    scope: WebhookScope
    slack: bool
    created_at: datetime


class WebhookCreated(WebhookPublic):
    """The only time the signing secret is shown."""

    secret: str


class WebhookDeliveryPublic(SQLModel):
    id: int
    webhook_id: int
    event: str
    status: DeliveryStatus
    attempts: int
    response_codes: list[int]
    last_error: str
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
