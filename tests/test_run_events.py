"""The live event hub (app/services/run_events.py) on a real database: what a subscriber reads after
a cursor is every event committed after it, in order, once, whether it comes from the shared
in-memory buffer or, for an old cursor, from a replay; a wake-up is never lost; channels go away
with their last subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlmodel import Session

from app.db import get_engine, migrate
from app.models import Run, RunEvent
from app.services import run_events
from app.services.run_events import RunEventHub
from tests.factories import run_config_factory


@pytest.fixture
def run_id(data_dir) -> Iterator[int]:
    migrate()
    with Session(get_engine()) as session:
        config = run_config_factory(session)
        run = Run(name="watched", config_id=config.id)
        session.add(run)
        session.commit()
        yield run.id


def commit_events(run_id: int, count: int, kind: str = "log") -> list[int]:
    with Session(get_engine()) as session:
        rows = [RunEvent(run_id=run_id, kind=kind, data={"n": n}) for n in range(count)]
        session.add_all(rows)
        session.commit()
        return [row.id for row in rows]


def test_subscribers_read_what_came_after_their_cursor_in_order_once(run_id: int) -> None:
    before = commit_events(run_id, 3)
    hub = RunEventHub()

    async def scenario() -> tuple[list[int], list[int], list[int], bool]:
        async with hub.subscribe(run_id) as first, hub.subscribe(run_id) as second:
            assert first is second  # one channel, one query per batch, for every dashboard
            assert await first.read_after(before[-1]) == []  # nothing new yet
            waiter = first.waiter()
            new = commit_events(run_id, 4)
            hub.notify(run_id)  # from the writer's side
            await asyncio.wait_for(waiter.wait(), 5)
            after_first = [e.id for e in await first.read_after(before[-1])]
            after_second = [e.id for e in await second.read_after(new[1])]
            replayed = [e.id for e in await second.read_after(0)]  # older than the buffer: the database
            return new, after_first, after_second, replayed == before + new

    new, after_first, after_second, complete = asyncio.run(scenario())
    assert after_first == new
    assert after_second == new[2:]
    assert complete


def test_a_wake_up_between_reading_and_waiting_is_not_lost(run_id: int) -> None:
    hub = RunEventHub()

    async def scenario() -> bool:
        async with hub.subscribe(run_id) as channel:
            await channel.read_after(0)
            waiter = channel.waiter()  # taken before the notification, as the SSE loop does
            hub.notify(run_id)
            await asyncio.sleep(0)  # the loop runs the thread-safe callback
            return waiter.is_set()

    assert asyncio.run(scenario())


def test_an_old_cursor_past_the_buffer_replays_everything_in_pages(run_id: int, monkeypatch) -> None:
    monkeypatch.setattr(run_events, "BUFFER_SIZE", 5)
    monkeypatch.setattr(run_events, "REPLAY_PAGE", 4)
    hub = RunEventHub()

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        async with hub.subscribe(run_id) as channel:
            start = await channel.read_after(0)
            assert start == []
            ids = commit_events(run_id, 11)  # more than a page, more than the buffer holds
            hub.notify(run_id)
            await asyncio.sleep(0)
            recent = [e.id for e in await channel.read_after(ids[-3])]  # inside the buffer
            pages, cursor = [], 0
            while batch := await channel.read_after(cursor):  # a reconnecting dashboard's replay
                pages += [e.id for e in batch]
                cursor = batch[-1].id
            return ids, recent, pages

    ids, recent, pages = asyncio.run(scenario())
    assert recent == ids[-2:]
    assert pages == ids


def test_a_channel_goes_with_its_last_subscriber(run_id: int) -> None:
    hub = RunEventHub()

    async def scenario() -> tuple[int, int]:
        async with hub.subscribe(run_id):
            async with hub.subscribe(run_id):
                pass
            still = len(hub._channels)
        return still, len(hub._channels)

    assert asyncio.run(scenario()) == (1, 0)
    hub.notify(run_id)  # nobody listens: nothing to wake, no error
