"""The run state machine: every legal transition succeeds, every other one is refused and changes
nothing, and two racing claims of one attempt have exactly one winner."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, func, select

from app.db import get_engine, migrate
from app.models import Run, RunEvent, RunStatus
from app.services import runs as service
from app.settings import get_settings
from tests.factories import run_config_factory

S = RunStatus
LEGAL = {
    (S.queued, S.starting), (S.queued, S.cancelled), (S.queued, S.failed),
    (S.starting, S.running), (S.starting, S.succeeded), (S.starting, S.failed),
    (S.starting, S.cancelled), (S.starting, S.lost),
    (S.running, S.succeeded), (S.running, S.failed), (S.running, S.cancelled), (S.running, S.lost),
    (S.failed, S.queued), (S.cancelled, S.queued), (S.lost, S.queued),
}


@pytest.fixture
def db(data_dir) -> Iterator[Session]:
    """The migrated database alone (no app, no login): these tests call the service."""
    migrate()
    with Session(get_engine()) as db_session:
        yield db_session


@pytest.fixture
def run_id(db: Session) -> int:
    config = run_config_factory(db)
    run = Run(name="r", config_id=config.id)
    db.add(run)
    db.commit()
    return run.id


def test_the_table_is_the_one_documented() -> None:
    table = {(a, b) for a, targets in service.TRANSITIONS.items() for b in targets}
    assert table == LEGAL


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)), ids=lambda s: s.value)
def test_every_transition(db: Session, run_id: int, source: RunStatus, target: RunStatus) -> None:
    db.exec(update(Run).where(Run.id == run_id).values(status=source))
    db.commit()
    legal = (source, target) in LEGAL
    assert service.transition(db, run_id, target) is legal
    db.expire_all()
    assert db.get(Run, run_id).status == (target if legal else source)
    events = db.exec(select(func.count()).select_from(RunEvent).where(RunEvent.run_id == run_id)).one()
    assert events == (1 if legal else 0)


def test_a_transition_of_another_attempt_is_refused(db: Session, run_id: int) -> None:
    assert not service.transition(db, run_id, S.starting, attempt=2)
    assert service.transition(db, run_id, S.starting, attempt=1)


def test_a_transition_the_caller_does_not_allow_is_refused(db: Session, run_id: int) -> None:
    with pytest.raises(service.IllegalTransition):
        service.transition(db, run_id, S.succeeded, allowed_from=[S.queued])


def test_two_concurrent_claims_have_one_winner(client: TestClient, session: Session) -> None:
    config = run_config_factory(session)
    run = client.post("/api/v1/runs", json={"config_id": config.id}).json()
    headers = {"Authorization": f"Bearer {get_settings().worker_token}"}
    client.post("/internal/v1/workers/heartbeat", headers=headers, json={"worker_id": "w", "hostname": "h"})
    service.dispatch_runs(session, [service.Dispatch(run["id"], 1, "w", [])])
    session.expire_all()
    dispatch_id = session.get(Run, run["id"]).dispatch_id
    barrier, answers = threading.Barrier(2), []

    def claim(task_id: str) -> None:  # the same task delivered twice, to two threads of the worker
        barrier.wait()
        answers.append(client.post(
            f"/internal/v1/runs/{run['id']}/claim", headers=headers,
            json={"attempt": 1, "dispatch_id": dispatch_id, "worker_id": "w", "task_id": task_id, "hostname": "h"},
        ).status_code)

    threads = [threading.Thread(target=claim, args=(f"t{i}",)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(answers) == [200, 409]
    session.expire_all()
    assert session.get(Run, run["id"]).status == S.starting
