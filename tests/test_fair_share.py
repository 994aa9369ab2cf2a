"""Quotas and fair share in the scheduler, with simulated users on a real database: within a
priority the user with fewer GPU-hours in the last 24 h goes first, an admin's per-user cap holds
runs back (and the wait reason says so), and the queue view shows each user's usage."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session

from app.models import Run, User
from app.models.base import utcnow
from app.services import quotas, scheduler
from app.services.users import create_user
from tests.conftest import log_in
from tests.test_scheduler import config_id, heartbeat, runs_by_id, session, start  # noqa: F401

PASSWORD = "a long enough password"


@pytest.fixture
def users(session: Session) -> dict[str, User]:  # noqa: F811
    return {name: create_user(session, name, PASSWORD) for name in ("alice", "bob", "carol")}


def queued_by(session: Session, config_id: int, owner: User, *, gpus: int = 0, priority: str = "normal") -> Run:  # noqa: F811
    run = start(session, config_id, gpus=gpus, priority=priority)
    run.owner_id = owner.id
    session.add(run)
    session.commit()
    return run


def scheduled(session: Session, worker: str, **capacity) -> int:  # noqa: F811
    """A pass right after the worker's heartbeat: starting runs is slow on a busy machine, and a
    heartbeat from before them could already count as silent."""
    heartbeat(session, worker, **capacity)
    return scheduler.schedule(session)


def trained(session: Session, config_id: int, owner: User, *, gpus: int, hours_ago: float, hours: float) -> Run:  # noqa: F811
    """A finished run of `owner`'s that held `gpus` GPUs for `hours`, ending `hours_ago` ago."""
    end = utcnow() - timedelta(hours=hours_ago)
    run = Run(name="past", config_id=config_id, status="succeeded", owner_id=owner.id, gpus_requested=gpus,
              gpu_ids=list(range(gpus)), started_at=end - timedelta(hours=hours), finished_at=end)
    session.add(run)
    session.commit()
    return run


def test_gpu_hours_count_only_the_last_24_hours(session, config_id, users) -> None:  # noqa: F811
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    trained(session, config_id, alice, gpus=2, hours_ago=1, hours=3)  # 6 GPU-hours
    trained(session, config_id, bob, gpus=1, hours_ago=20, hours=10)  # 4 of its 10 hours are inside
    trained(session, config_id, carol, gpus=8, hours_ago=30, hours=5)  # all before the window
    trained(session, config_id, carol, gpus=0, hours_ago=0, hours=2)  # a CPU run counts as 1
    used = quotas.gpu_hours(session)
    assert round(used[alice.id], 3) == 6.0
    assert round(used[bob.id], 3) == 4.0
    assert round(used[carol.id], 3) == 2.0


def test_within_a_priority_fewer_gpu_hours_go_first(session, config_id, users) -> None:  # noqa: F811
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    trained(session, config_id, alice, gpus=1, hours_ago=1, hours=3)
    trained(session, config_id, bob, gpus=1, hours_ago=1, hours=1)
    # Queued in the order alice, bob, carol: carol (no GPU-hours) starts, then bob, then alice.
    alices, bobs, carols = (queued_by(session, config_id, user) for user in (alice, bob, carol))
    assert scheduled(session, "box", cpu_slots=1) == 1
    runs = runs_by_id(session)
    assert runs[carols.id].dispatched_worker_id == "box"
    assert [scheduler.queue_spot(r.id).position for r in (bobs, alices)] == [1, 2]
    # Priority still comes first: alice's high-priority run goes before bob's normal one.
    urgent = queued_by(session, config_id, alice, priority="high")
    scheduled(session, "box", cpu_slots=1)
    assert [scheduler.queue_spot(r.id).position for r in (urgent, bobs, alices)] == [1, 2, 3]


def test_a_per_user_cap_holds_runs_back_and_says_so(session, config_id, users) -> None:  # noqa: F811
    alice, bob = users["alice"], users["bob"]
    running = Run(name="alices-first", config_id=config_id, status="running", owner_id=alice.id, worker_id="box",
                  started_at=utcnow())
    session.add(running)
    session.commit()
    assert quotas.user_gpu_cap(session) is None  # none by default
    quotas.set_user_gpu_cap(session, 1)
    waiting = queued_by(session, config_id, alice)
    bobs = queued_by(session, config_id, bob)
    assert scheduled(session, "box", cpu_slots=3) == 1
    runs = runs_by_id(session)
    assert runs[bobs.id].dispatched_worker_id == "box" and runs[waiting.id].dispatch_id is None
    reason = scheduler.queue_spot(waiting.id).reason
    assert reason.startswith("waits for alice's quota: at most 1 GPU(s) at once per user")
    assert reason.endswith(f"alice's runs hold 1 (run {running.id}), this one needs 1")
    quotas.set_user_gpu_cap(session, 2)
    assert scheduled(session, "box", cpu_slots=3) == 1
    assert runs_by_id(session)[waiting.id].dispatched_worker_id == "box"
    quotas.set_user_gpu_cap(session, None)
    assert quotas.user_gpu_cap(session) is None


def test_the_cap_counts_what_one_pass_dispatches(session, config_id, users) -> None:  # noqa: F811
    alice = users["alice"]
    quotas.set_user_gpu_cap(session, 1)
    first, second = queued_by(session, config_id, alice), queued_by(session, config_id, alice)
    assert scheduled(session, "cpu-box", cpu_slots=2) == 1
    runs = runs_by_id(session)
    assert runs[first.id].dispatched_worker_id == "cpu-box" and runs[second.id].dispatch_id is None
    assert "waits for alice's quota" in scheduler.queue_spot(second.id).reason


def test_the_queue_view_shows_each_users_usage_and_admins_set_the_cap(client, anon_client, session, config_id,  # noqa: F811
                                                                        users) -> None:
    alice = users["alice"]
    trained(session, config_id, alice, gpus=2, hours_ago=1, hours=1.5)
    queued_by(session, config_id, alice)
    scheduled(session, "box-without-the-model", cpu_slots=1, models={})
    page = client.get("/runs").text
    assert 'data-user="alice"' in page and "3.00" in page
    assert client.get("/api/v1/quotas").json() == {
        "user_gpu_cap": None, "users": [{"username": "alice", "gpus_in_use": 0, "gpu_hours_24h": 3.0, "queued": 1}]}
    assert client.put("/api/v1/quotas", json={"user_gpu_cap": 4}).json()["user_gpu_cap"] == 4
    fragment = client.post("/runs/quota", headers={"HX-Request": "true"}, data={"user_gpu_cap": "6"})
    assert "at most <strong>6</strong> GPU(s)" in fragment.text
    assert client.put("/api/v1/quotas", json={"user_gpu_cap": 0}).status_code == 422
    log_in(anon_client, "alice", PASSWORD)
    assert anon_client.put("/api/v1/quotas", json={"user_gpu_cap": None}).status_code == 403
    assert anon_client.get("/api/v1/quotas").json()["user_gpu_cap"] == 6
