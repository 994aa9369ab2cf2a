"""Webhooks: a run's or a deployment's outcome told to the URLs of the users who asked for it.

An event becomes one `WebhookDelivery` row per matching webhook in the same transaction as the
status change that caused it (the caller commits both), so no event is lost to a crash or a
restart between the two. The panel's background loop (`delivering`, started in its lifespan)
sends them: the exact stored bytes, signed with the webhook's secret in
`X-Tuneboard-Signature: sha256=<hex HMAC-SHA256 of the body>`. A 2xx answer delivers it; anything
else is tried again after `webhook_retry_base_s`, doubling each time, up to MAX_ATTEMPTS. Each
webhook gets its deliveries in the order of their events: a later one waits while an earlier one
is being retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from sqlalchemy import event as sa_event
from sqlmodel import Session, col, or_, select

from app.db import get_engine
from app.errors import Invalid, NotFound
from app.models import Deployment, Run, User
from app.models.base import as_utc, utcnow
from app.models.webhook import (
    DeliveryStatus,
    Webhook,
    WebhookCreate,
    WebhookDelivery,
    WebhookEvent,
    WebhookScope,
)
from app.settings import get_settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tuneboard-Signature"
TEST_EVENT = "test"
MAX_ATTEMPTS = 6
REQUEST_TIMEOUT_S = 10.0
# Deliveries are woken by each commit that adds one; this is the fallback poll.
IDLE_POLL_S = 60.0
LOG_LENGTH = 20


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- the user's webhooks
def _checked_url(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("Give an http:// or https:// URL with a host.", field="url")
    return url


def create_webhook(session: Session, user: User, data: WebhookCreate) -> Webhook:
    """A new webhook of `user`'s; its secret is returned to them this once."""
    webhook = Webhook(
        user_id=user.id, url=_checked_url(data.url), events=sorted({e.value for e in data.events}),
        scope=data.scope, slack=data.slack, secret=secrets.token_urlsafe(32),
    )
    session.add(webhook)
    session.commit()
    session.refresh(webhook)
    return webhook


def list_webhooks(session: Session, user: User) -> list[Webhook]:
    return list(session.exec(select(Webhook).where(Webhook.user_id == user.id).order_by(col(Webhook.id))))


def get_webhook(session: Session, user: User, webhook_id: int) -> Webhook:
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or webhook.user_id != user.id:
        raise NotFound(f"you have no webhook {webhook_id}")
    return webhook


def delete_webhook(session: Session, user: User, webhook_id: int) -> None:
    session.delete(get_webhook(session, user, webhook_id))
    session.commit()


def delivery_log(session: Session, webhook_id: int, limit: int = LOG_LENGTH) -> list[WebhookDelivery]:
    return list(session.exec(
        select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(col(WebhookDelivery.id).desc()).limit(limit)
    ))


def send_test(session: Session, user: User, webhook_id: int) -> WebhookDelivery:
    """The "send test" button: a delivery of a test event to this webhook alone."""
    webhook = get_webhook(session, user, webhook_id)
    payload = {"event": TEST_EVENT, "created_at": utcnow().isoformat(),
               "message": f"a test of webhook {webhook.id} from {user.username}"}
    delivery = _add_delivery(session, webhook, TEST_EVENT, payload, f"Tuneboard: {payload['message']}")
    session.commit()
    session.refresh(delivery)
    return delivery


# --------------------------------------------------------------------------- events
def enqueue_run_event(session: Session, run_id: int, status: str) -> None:
    """Queue the deliveries of a run's new status (one of WebhookEvent's), in the caller's
    transaction: the caller commits them with the status change."""
    event = f"run.{status}"
    if event not in set(WebhookEvent):
        return
    run = session.exec(select(Run).where(Run.id == run_id).execution_options(populate_existing=True)).one()
    owner = session.get(User, run.owner_id) if run.owner_id else None
    subject = {"id": run.id, "name": run.name, "status": str(status), "status_reason": run.status_reason,
               "attempt": run.attempt, "owner": owner.username if owner else None,
               "url": f"{get_settings().app_url.rstrip('/')}/runs/{run.id}"}
    reason = f": {run.status_reason}" if run.status_reason else ""
    text = f"Tuneboard: run {run.id} ({run.name}) {status}{reason} {subject['url']}"
    _enqueue(session, event, run.owner_id, {"run": subject}, text)


def enqueue_deployment_events(session: Session, deployment_ids: list[int], status: str) -> None:
    """Queue the deliveries of deployments' new status (ready or failed), in the caller's
    transaction."""
    event = f"deployment.{status}"
    if event not in set(WebhookEvent) or not deployment_ids:
        return
    deployments = session.exec(
        select(Deployment).where(col(Deployment.id).in_(deployment_ids)).execution_options(populate_existing=True)
    ).all()
    for deployment in deployments:
        owner = session.get(User, deployment.owner_id) if deployment.owner_id else None
        subject = {"id": deployment.id, "name": deployment.name, "run_id": deployment.run_id,
                   "status": str(status), "status_reason": deployment.status_reason,
                   "owner": owner.username if owner else None,
                   "url": f"{get_settings().app_url.rstrip('/')}/deployments"}
        reason = f": {deployment.status_reason}" if deployment.status_reason else ""
        text = f"Tuneboard: deployment {deployment.name} {status}{reason}"
        _enqueue(session, event, deployment.owner_id, {"deployment": subject}, text)


def _enqueue(session: Session, event: str, owner_id: int | None, subject: dict[str, Any], text: str) -> None:
    audience = or_(Webhook.scope == WebhookScope.everyone, Webhook.user_id == owner_id) if owner_id \
        else Webhook.scope == WebhookScope.everyone
    payload = {"event": event, "created_at": utcnow().isoformat(), **subject}
    for webhook in session.exec(select(Webhook).where(audience).order_by(col(Webhook.id))).all():
        if event in webhook.events:
            _add_delivery(session, webhook, event, payload, text)


def _add_delivery(session: Session, webhook: Webhook, event: str, payload: dict[str, Any], text: str) -> WebhookDelivery:
    body = {"text": text} if webhook.slack else payload
    delivery = WebhookDelivery(webhook_id=webhook.id, event=event, body=json.dumps(body, ensure_ascii=False),
                               next_attempt_at=utcnow())
    session.add(delivery)
    sa_event.listen(session, "after_commit", lambda _session: wake(), once=True)
    return delivery


# --------------------------------------------------------------------------- delivery
@dataclass(frozen=True)
class _Due:
    delivery_id: int
    event: str
    url: str
    secret: str
    body: bytes


def _due(now: datetime) -> tuple[list[_Due], datetime | None]:
    """Each webhook's oldest pending delivery when its time has come, and when the next one
    not yet due will be."""
    with Session(get_engine()) as session:
        rows = session.exec(
            select(WebhookDelivery, Webhook).join(Webhook)
            .where(WebhookDelivery.status == DeliveryStatus.pending).order_by(col(WebhookDelivery.id))
        ).all()
    heads: dict[int, tuple[WebhookDelivery, Webhook]] = {}
    for delivery, webhook in rows:
        heads.setdefault(webhook.id, (delivery, webhook))
    due, later = [], []
    for delivery, webhook in heads.values():
        at = as_utc(delivery.next_attempt_at) or now
        if at <= now:
            due.append(_Due(delivery.id, delivery.event, webhook.url, webhook.secret, delivery.body.encode()))
        else:
            later.append(at)
    return due, min(later, default=None)


async def _attempt(client: httpx.AsyncClient, due: _Due) -> tuple[int, str]:
    """(HTTP status, error): status 0 when nothing answered."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(due.secret, due.body),
               "X-Tuneboard-Event": due.event, "X-Tuneboard-Delivery": str(due.delivery_id),
               "User-Agent": "Tuneboard-Webhooks"}
    try:
        response = await client.post(due.url, content=due.body, headers=headers)
    except httpx.HTTPError as error:
        return 0, f"{type(error).__name__}: {error}"[:500]
    return response.status_code, "" if response.is_success else response.text[:500]


def _record(delivery_id: int, status_code: int, error: str) -> None:
    """Write one attempt's outcome: delivered, failed for good, or its next attempt's time."""
    with Session(get_engine()) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:  # its webhook was deleted meanwhile
            return
        now = utcnow()
        delivery.attempts += 1
        delivery.response_codes = [*delivery.response_codes, status_code]
        delivery.last_error = error
        delivered = 200 <= status_code < 300
        if delivered or delivery.attempts >= MAX_ATTEMPTS:
            delivery.status = DeliveryStatus.delivered if delivered else DeliveryStatus.failed
            delivery.finished_at = now
            delivery.next_attempt_at = None
        else:
            backoff = get_settings().webhook_retry_base_s * 2 ** (delivery.attempts - 1)
            delivery.next_attempt_at = now + timedelta(seconds=backoff)
        session.add(delivery)
        session.commit()


# Deliveries being sent by a loop of this process: another app's loop leaves them alone.
_sending: set[int] = set()
_sending_lock = threading.Lock()


async def _deliver(client: httpx.AsyncClient, due: _Due) -> bool:
    """One attempt at `due`; False when another loop is already sending it."""
    with _sending_lock:
        if due.delivery_id in _sending:
            return False
        _sending.add(due.delivery_id)
    try:
        status_code, error = await _attempt(client, due)
        if error:
            log.info("webhook delivery %s (%s) to %s: %s %s", due.delivery_id, due.event, due.url, status_code, error)
        await anyio.to_thread.run_sync(_record, due.delivery_id, status_code, error)
        return True
    finally:
        with _sending_lock:
            _sending.discard(due.delivery_id)


# The running delivery loops' wake-up events (one per app: tests run two side by side).
_woken: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}


def wake() -> None:
    """Wake the delivery loops from any thread (a transition commits in FastAPI's thread pool)."""
    for event, loop in list(_woken.items()):
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


@asynccontextmanager
async def delivering() -> AsyncIterator[None]:
    """The panel's delivery loop (started in its lifespan): what is due, a webhook at a time in
    order and the webhooks side by side; pending deliveries left by a previous process go first."""
    woken = asyncio.Event()
    _woken[woken] = asyncio.get_running_loop()

    async def loop() -> None:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, follow_redirects=False) as client:
            while True:
                woken.clear()
                attempted, next_at = False, None
                try:
                    due, next_at = await anyio.to_thread.run_sync(_due, utcnow())
                    attempted = any(await asyncio.gather(*(_deliver(client, d) for d in due)))
                except Exception:
                    log.exception("webhook delivery pass failed")  # and wait before trying again
                if attempted:
                    continue  # the next of those webhooks' deliveries may be due now
                wait = IDLE_POLL_S if next_at is None else max(0.0, (next_at - utcnow()).total_seconds())
                try:
                    await asyncio.wait_for(woken.wait(), timeout=min(wait, IDLE_POLL_S))
                except TimeoutError:
                    pass

    task = asyncio.create_task(loop(), name="webhooks")
    try:
        yield
    finally:
        task.cancel()
        _woken.pop(woken, None)
