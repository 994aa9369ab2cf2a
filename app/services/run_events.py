"""Live run events for SSE subscribers.

Events are written (as RunEvent rows) by sync endpoints on the threadpool; `notify(run_id)` then
wakes the asyncio subscribers thread-safely. Every watched run has one channel that fetches new
rows once per wake-up and shares them, serialised once, with all its subscribers: a hundred
dashboards on one run cost one query per batch, not a hundred. A subscriber whose cursor is
older than the channel's buffer replays from the database first, so nothing is missed.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from sqlalchemy import and_, func
from sqlmodel import Session, select

from app.db import get_engine
from app.models.run import RunEvent, RunMetric
from app.wire import MetricPoint

log = logging.getLogger(__name__)

# Events kept in memory per watched run; older cursors replay from the database.
BUFFER_SIZE = 2000
REPLAY_PAGE = 1000
# A metric event's point, as RunMetric holds it (step first: None where no point matched).
POINT_FIELDS = tuple(MetricPoint.model_fields)
POINT_COLUMNS = tuple(getattr(RunMetric, name) for name in POINT_FIELDS)


@dataclass(frozen=True, slots=True)
class StreamedEvent:
    id: int
    kind: str
    data: str  # JSON, serialised once for every subscriber


def fetch_events(run_id: int, after: int, limit: int = REPLAY_PAGE) -> list[StreamedEvent]:
    """A metric event names its step and carries the point as RunMetric holds it now (the one
    record of a run's metrics; a step merged since is sent merged). A point deleted by a retry
    from scratch leaves its step alone: the retry's `reset` status event follows it."""
    with Session(get_engine()) as session:
        rows = session.exec(
            select(RunEvent.id, RunEvent.kind, RunEvent.data, *POINT_COLUMNS)
            .outerjoin(RunMetric, and_(
                RunEvent.kind == "metric", RunMetric.run_id == RunEvent.run_id,
                RunMetric.step == RunEvent.data["step"].as_integer(),
            ))
            .where(RunEvent.run_id == run_id, RunEvent.id > after)
            .order_by(RunEvent.id)
            .limit(limit)
        ).all()
    return [StreamedEvent(event_id, kind, json.dumps(data if point[0] is None else dict(zip(POINT_FIELDS, point))))
            for event_id, kind, data, *point in rows]


def latest_event_id(run_id: int) -> int:
    with Session(get_engine()) as session:
        return session.exec(select(func.max(RunEvent.id)).where(RunEvent.run_id == run_id)).one() or 0


class RunChannel:
    """The subscribers of one run, on the event loop that serves them."""

    def __init__(self, run_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.run_id = run_id
        self.loop = loop
        self.subscribers = 0
        self._wake = asyncio.Event()
        self._stale = True
        self._lock = asyncio.Lock()
        self._buffer: list[StreamedEvent] = []
        self._buffer_ids: list[int] = []
        # The buffer holds every event with floor < id <= last_id.
        self._floor: int | None = None
        self._last_id = 0

    def waiter(self) -> asyncio.Event:
        """Take this before reading, then wait on it: a wake-up in between is never lost."""
        return self._wake

    def wake(self) -> None:
        self._stale = True
        woken, self._wake = self._wake, asyncio.Event()
        woken.set()

    async def read_after(self, cursor: int) -> list[StreamedEvent]:
        async with self._lock:
            if self._floor is None:
                self._floor = self._last_id = await anyio.to_thread.run_sync(latest_event_id, self.run_id)
                self._stale = False
            elif self._stale:
                self._stale = False
                self._refill()
        if cursor < self._floor:  # an old cursor: a replay, possibly long, off the event loop
            return await anyio.to_thread.run_sync(fetch_events, self.run_id, cursor)
        return self._buffer[bisect.bisect_right(self._buffer_ids, cursor):]

    def _refill(self) -> None:
        """Fetch the events committed since the last wake-up. On the event loop itself: an indexed
        read of a few new rows (WAL readers never wait for the writer) costs far less than two
        thread hops, which is what a line's latency is made of on a busy machine."""
        while True:
            new = fetch_events(self.run_id, self._last_id)
            if not new:
                return
            self._buffer.extend(new)
            self._buffer_ids.extend(event.id for event in new)
            self._last_id = new[-1].id
            overflow = len(self._buffer) - BUFFER_SIZE
            if overflow > 0:
                self._floor = self._buffer_ids[overflow - 1]
                del self._buffer[:overflow], self._buffer_ids[:overflow]
            if len(new) < REPLAY_PAGE:
                return


class RunEventHub:
    def __init__(self) -> None:
        self._channels: dict[int, RunChannel] = {}
        self._lock = threading.Lock()

    @asynccontextmanager
    async def subscribe(self, run_id: int) -> AsyncIterator[RunChannel]:
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.get(run_id)
            if channel is None or channel.loop is not loop:
                channel = self._channels[run_id] = RunChannel(run_id, loop)
            channel.subscribers += 1
        try:
            yield channel
        finally:
            with self._lock:
                channel.subscribers -= 1
                if channel.subscribers == 0 and self._channels.get(run_id) is channel:
                    del self._channels[run_id]

    def notify(self, run_id: int) -> None:
        """Called from any thread after RunEvent rows of `run_id` were committed."""
        with self._lock:
            channel = self._channels.get(run_id)
        if channel is None:
            return
        try:
            channel.loop.call_soon_threadsafe(channel.wake)
        except RuntimeError:  # its loop has closed (a test client went away)
            log.debug("run %s: channel loop closed", run_id)


hub = RunEventHub()
