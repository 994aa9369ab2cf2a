"""Gateway keys: what each may call (one deployment or all), its rate limits, and its usage.

Limits are sliding windows of one minute, kept in the panel's memory (the panel is the only
gateway): requests are counted when a request is let through, tokens when the model's server
reports them (its `usage`), so a key over its tokens per minute is refused from its next request
on. Usage per key per UTC day is counted in memory too and flushed to `gateway_key_usage` every
FLUSH_INTERVAL_S (and at shutdown) in one upsert per key and day: no database write per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import anyio
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from app.db import get_engine
from app.errors import DomainError, Forbidden, NotFound
from app.models.base import utcnow
from app.models.gateway_key import GatewayKeyCreate, GatewayKeyLimit, GatewayKeyPublic, GatewayKeyUsage, GatewayKeyUsagePublic
from app.models.user import ApiToken, ApiTokenPublic, User
from app.services.users import create_token, list_tokens

log = logging.getLogger(__name__)

GATEWAY_KEY = "gateway"
WINDOW_S = 60.0
FLUSH_INTERVAL_S = 10.0
USAGE_DAYS_SHOWN = 7


class RateLimited(DomainError):
    """A key over its requests or tokens per minute; `retry_after` in whole seconds."""

    status_code = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class KeyNotForModel(Forbidden):
    pass


# --------------------------------------------------------------------------- the windows
class SlidingWindows:
    """Requests and tokens of each key over the last WINDOW_S, on a monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[int, deque[float]] = defaultdict(deque)
        self._tokens: dict[int, deque[tuple[float, int]]] = defaultdict(deque)

    def _expire(self, key_id: int, now: float) -> None:
        requests, tokens = self._requests[key_id], self._tokens[key_id]
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW_S:
            tokens.popleft()

    def admit(self, key_id: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Count one request of `key_id`, or raise RateLimited (and count nothing)."""
        with self._lock:
            now = self._clock()
            self._expire(key_id, now)
            requests, tokens = self._requests[key_id], self._tokens[key_id]
            if requests_per_minute is not None and len(requests) >= requests_per_minute:
                wait = requests[len(requests) - requests_per_minute] + WINDOW_S - now
                raise RateLimited(f"this key is limited to {requests_per_minute} requests per minute",
                                  _whole_seconds(wait))
            used = sum(count for _at, count in tokens)
            if tokens_per_minute is not None and used >= tokens_per_minute:
                # Until enough of the window's tokens have aged out to go below the limit.
                for at, count in tokens:
                    used -= count
                    if used < tokens_per_minute:
                        break
                raise RateLimited(f"this key is limited to {tokens_per_minute} tokens per minute",
                                  _whole_seconds(at + WINDOW_S - now))
            requests.append(now)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._tokens.clear()

    def add_tokens(self, key_id: int, count: int) -> None:
        if count > 0:
            with self._lock:
                self._tokens[key_id].append((self._clock(), count))


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


# --------------------------------------------------------------------------- usage per day
class UsageCounter:
    """Requests and tokens per key per UTC day not yet written to the database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, date], list[int]] = defaultdict(lambda: [0, 0, 0])

    def count(self, key_id: int, day: date, *, requests: int = 0, prompt_tokens: int = 0,
              completion_tokens: int = 0) -> None:
        with self._lock:
            counts = self._pending[key_id, day]
            counts[0] += requests
            counts[1] += prompt_tokens
            counts[2] += completion_tokens

    def pending(self, key_ids: Iterable[int]) -> dict[tuple[int, date], list[int]]:
        wanted = set(key_ids)
        with self._lock:
            return {k: list(v) for k, v in self._pending.items() if k[0] in wanted}

    def flush(self, session: Session) -> int:
        """Add what was counted to the rows; returns how many rows it wrote."""
        with self._lock:
            taken, self._pending = self._pending, defaultdict(lambda: [0, 0, 0])
        try:
            self._write(session, taken)
        except Exception:
            for (key_id, day), (requests, prompt, completion) in taken.items():  # kept for the next flush
                self.count(key_id, day, requests=requests, prompt_tokens=prompt, completion_tokens=completion)
            raise
        return len(taken)

    @staticmethod
    def _write(session: Session, taken: dict[tuple[int, date], list[int]]) -> None:
        live = set(session.exec(select(ApiToken.id).where(col(ApiToken.id).in_({k for k, _ in taken})))) if taken else set()
        for (key_id, day), (requests, prompt, completion) in taken.items():
            if key_id not in live:  # deleted with its user: nothing to count against
                continue
            statement = sqlite_insert(GatewayKeyUsage).values(
                token_id=key_id, day=day, requests=requests, prompt_tokens=prompt, completion_tokens=completion,
            )
            session.exec(statement.on_conflict_do_update(
                index_elements=["token_id", "day"],
                set_={"requests": GatewayKeyUsage.requests + statement.excluded.requests,
                      "prompt_tokens": GatewayKeyUsage.prompt_tokens + statement.excluded.prompt_tokens,
                      "completion_tokens": GatewayKeyUsage.completion_tokens + statement.excluded.completion_tokens},
            ))
        session.commit()


windows = SlidingWindows()
usage = UsageCounter()


# --------------------------------------------------------------------------- the gateway's calls
@dataclass(frozen=True)
class Admitted:
    """A request let through: what to count its tokens against when its answer ends."""

    key_id: int
    day: date


def admit(session: Session, key_id: int, model: str) -> Admitted:
    """Let one request of gateway key `key_id` for `model` through, or raise KeyNotForModel or
    RateLimited."""
    limit = session.get(GatewayKeyLimit, key_id)
    if limit is not None and limit.deployment_name is not None and limit.deployment_name != model:
        raise KeyNotForModel(f"this key may call only the model {limit.deployment_name}")
    if limit is not None:
        windows.admit(key_id, limit.requests_per_minute, limit.tokens_per_minute)
    admitted = Admitted(key_id, utcnow().date())
    usage.count(key_id, admitted.day, requests=1)
    return admitted


def record_tokens(admitted: Admitted, reported: dict[str, Any] | None) -> None:
    """The model server's `usage` of an admitted request's answer."""
    prompt, completion = (_count(reported, "prompt_tokens"), _count(reported, "completion_tokens"))
    windows.add_tokens(admitted.key_id, prompt + completion)
    usage.count(admitted.key_id, admitted.day, prompt_tokens=prompt, completion_tokens=completion)


def _count(reported: dict[str, Any] | None, kind: str) -> int:
    value = (reported or {}).get(kind)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def allowed_models(session: Session, key_id: int | None) -> str | None:
    """The one model a key may call (for /v1/models), None: any."""
    limit = session.get(GatewayKeyLimit, key_id) if key_id is not None else None
    return limit.deployment_name if limit is not None else None


# --------------------------------------------------------------------------- the keys
def create_key(session: Session, user: User, data: GatewayKeyCreate) -> tuple[GatewayKeyPublic, str]:
    name = data.deployment_name.strip() if data.deployment_name else None
    token, raw = create_token(session, user, data.name, kind=GATEWAY_KEY, expires_in_days=data.expires_in_days)
    if name or data.requests_per_minute or data.tokens_per_minute:
        session.add(GatewayKeyLimit(token_id=token.id, deployment_name=name or None,
                                    requests_per_minute=data.requests_per_minute,
                                    tokens_per_minute=data.tokens_per_minute))
        session.commit()
    return key_public(session, [token])[0], raw


def list_keys(session: Session, user: User) -> list[GatewayKeyPublic]:
    return key_public(session, list_tokens(session, user, kind=GATEWAY_KEY))


def get_key(session: Session, user: User, key_id: int) -> GatewayKeyPublic:
    for key in list_keys(session, user):
        if key.id == key_id:
            return key
    raise NotFound(f"no live gateway key {key_id}")


def key_public(session: Session, tokens: list[ApiToken]) -> list[GatewayKeyPublic]:
    """Keys with their limits and their usage of the last USAGE_DAYS_SHOWN days (stored and not
    yet flushed), newest day first."""
    ids = [t.id for t in tokens]
    limits = {row.token_id: row for row in session.exec(
        select(GatewayKeyLimit).where(col(GatewayKeyLimit.token_id).in_(ids)))} if ids else {}
    since = utcnow().date() - timedelta(days=USAGE_DAYS_SHOWN - 1)
    days: dict[tuple[int, date], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in session.exec(select(GatewayKeyUsage).where(col(GatewayKeyUsage.token_id).in_(ids),
                                                          GatewayKeyUsage.day >= since)) if ids else ():
        days[row.token_id, row.day] = [row.requests, row.prompt_tokens, row.completion_tokens]
    for (key_id, day), counts in usage.pending(ids).items():
        if day >= since:
            days[key_id, day] = [a + b for a, b in zip(days[key_id, day], counts, strict=True)]
    keys = []
    for token in tokens:
        limit = limits.get(token.id)
        used = sorted(((day, counts) for (key_id, day), counts in days.items() if key_id == token.id), reverse=True)
        keys.append(GatewayKeyPublic(
            **ApiTokenPublic.model_validate(token).model_dump(),
            deployment_name=limit.deployment_name if limit else None,
            requests_per_minute=limit.requests_per_minute if limit else None,
            tokens_per_minute=limit.tokens_per_minute if limit else None,
            usage=[GatewayKeyUsagePublic(day=day, requests=c[0], prompt_tokens=c[1], completion_tokens=c[2])
                   for day, c in used],
        ))
    return keys


# --------------------------------------------------------------------------- the flush
def flush_usage() -> int:
    with Session(get_engine()) as session:
        return usage.flush(session)


@asynccontextmanager
async def flushing() -> AsyncIterator[None]:
    """The panel's usage flush (started in its lifespan): every FLUSH_INTERVAL_S, and once more
    when the panel stops. The windows start empty with the app (a new database numbers its keys
    anew)."""
    windows.clear()

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await anyio.to_thread.run_sync(flush_usage)
            except Exception:
                log.exception("gateway usage flush failed")

    task = asyncio.create_task(loop(), name="gateway-usage-flush")
    try:
        yield
    finally:
        task.cancel()
        await anyio.to_thread.run_sync(flush_usage)
