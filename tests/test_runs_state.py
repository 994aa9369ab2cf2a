"""A run's lifecycle as its users and workers see it, through the API and the worker channel (real
app, real SQLite): a finished run never runs again, a failed, cancelled or lost run can be started
again as a new attempt, a move the lifecycle does not allow answers 409 and changes nothing, a
superseded attempt can no longer report, and two racing claims of one attempt have one winner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from app.models import Run, RunEvent, RunStatus
from app.models.base import utcnow
from app.services import runs as service
from app.settings import get_settings
from tests.factories import run_config_factory, store_folder
from tests.test_runs import claim, config, finish, report, run_row, start, worker_headers  # noqa: F401  (fixtures)


def snapshot(session: Session, run_id: int) -> tuple:
    """What an illegal move must leave as it was: the run's state and its event stream."""
    row = run_row(session, run_id)
    events = session.exec(select(func.count()).select_from(RunEvent).where(RunEvent.run_id == run_id)).one()
    return row.status, row.attempt, row.status_reason, row.cancel_requested, events


def queued_run(client, session, config, headers) -> int:  # noqa: ARG001  (one signature for all)
    return start(client, config.id)["id"]


def running_run(client, session, config, headers) -> int:
    run_id = start(client, config.id)["id"]
    claim(client, headers, run_id)
    report(client, headers, run_id, status="running")
    return run_id


def succeeded_run(client, session, config, headers) -> int:
    run_id = running_run(client, session, config, headers)
    assert finish(client, headers, run_id).status_code == 200
    return run_id


def failed_run(client, session, config, headers) -> int:
    run_id = running_run(client, session, config, headers)
    assert finish(client, headers, run_id, outcome="failed", exit_code=1, reason="boom").status_code == 200
    return run_id


def cancelled_run(client, session, config, headers) -> int:
    run_id = start(client, config.id)["id"]
    assert client.post(f"/api/v1/runs/{run_id}/cancel").json()["status"] == "cancelled"
    return run_id


def lost_run(client, session, config, headers) -> int:
    run_id = running_run(client, session, config, headers)
    later = utcnow() + timedelta(seconds=get_settings().heartbeat_timeout_s + 1)
    assert service.mark_lost_runs(session, now=later) == [run_id]
    return run_id


def with_a_checkpoint(session: Session, run_id: int) -> None:
    folder = service.run_dir(run_id) / "output" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"step": 2}')
    store_folder(session, run_id, 1, folder, "checkpoint-2", 2)


Actor = Callable[[TestClient, dict, int], object]
ACTIONS: dict[str, Actor] = {
    "cancel": lambda client, headers, run_id: client.post(f"/api/v1/runs/{run_id}/cancel"),
    "resume": lambda client, headers, run_id: client.post(f"/api/v1/runs/{run_id}/resume"),
    "retry": lambda client, headers, run_id: client.post(f"/api/v1/runs/{run_id}/retry"),
    "claim": lambda client, headers, run_id: claim(client, headers, run_id),
    "report running": lambda client, headers, run_id: report(client, headers, run_id, status="running"),
    "finish succeeded": lambda client, headers, run_id: finish(client, headers, run_id),
    "finish failed": lambda client, headers, run_id: finish(client, headers, run_id, outcome="failed"),
}


@pytest.mark.parametrize("action", ["report running", "claim", "resume", "retry", "cancel", "finish failed"])
def test_a_succeeded_run_never_runs_again(client, session, config, worker_headers, action) -> None:
    run_id = succeeded_run(client, session, config, worker_headers)
    with_a_checkpoint(session, run_id)  # even with something to resume from
    before = snapshot(session, run_id)
    assert ACTIONS[action](client, worker_headers, run_id).status_code == 409
    assert snapshot(session, run_id) == before and before[0] == RunStatus.succeeded


@pytest.mark.parametrize(("setup", "action"), [
    (queued_run, "finish succeeded"),  # a worker cannot finish what it never claimed
    (queued_run, "report running"),
    (queued_run, "retry"),
    (queued_run, "resume"),
    (running_run, "claim"),  # a redelivered task of a running attempt
    (running_run, "retry"),
    (running_run, "resume"),
    (cancelled_run, "cancel"),
    (cancelled_run, "claim"),
    (failed_run, "report running"),
    (failed_run, "finish succeeded"),
    (lost_run, "finish succeeded"),  # its silent worker comes back too late
], ids=lambda value: getattr(value, "__name__", value))
def test_an_illegal_move_answers_409_and_changes_nothing(client, session, config, worker_headers, setup, action) -> None:
    run_id = setup(client, session, config, worker_headers)
    with_a_checkpoint(session, run_id)
    before = snapshot(session, run_id)
    response = ACTIONS[action](client, worker_headers, run_id)
    assert response.status_code == 409, response.text
    assert response.json()["detail"]
    assert snapshot(session, run_id) == before


@pytest.mark.parametrize("setup", [failed_run, cancelled_run, lost_run], ids=lambda f: f.__name__)
@pytest.mark.parametrize("action", ["retry", "resume"])
def test_a_failed_cancelled_or_lost_run_starts_again_as_a_new_attempt(
    client, session, config, worker_headers, setup, action,
) -> None:
    run_id = setup(client, session, config, worker_headers)
    with_a_checkpoint(session, run_id)
    again = ACTIONS[action](client, worker_headers, run_id)
    assert again.status_code == 200, again.text
    body = again.json()
    assert (body["status"], body["attempt"]) == ("queued", 2)
    assert body["resume_from"] == ("checkpoint-2" if action == "resume" else None)
    assert body["status_reason"] == "" and body["finished_at"] is None
    # The new attempt runs to the end; the old one can no longer claim, report or finish.
    assert claim(client, worker_headers, run_id, attempt=1).status_code == 409
    assert claim(client, worker_headers, run_id, attempt=2).status_code == 200
    assert report(client, worker_headers, run_id, attempt=1, status="running").status_code == 409
    assert finish(client, worker_headers, run_id, attempt=1).status_code == 409
    assert report(client, worker_headers, run_id, attempt=2, status="running").status_code == 200
    assert finish(client, worker_headers, run_id, attempt=2).status_code == 200
    assert run_row(session, run_id).status == RunStatus.succeeded


def test_every_change_of_status_is_one_event_in_order(client, session, config, worker_headers) -> None:
    run_id = failed_run(client, session, config, worker_headers)
    client.post(f"/api/v1/runs/{run_id}/retry")
    session.expire_all()
    statuses = [e.data["status"] for e in session.exec(
        select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.kind == "status").order_by(RunEvent.id))
        if "dispatched_to" not in e.data]
    assert statuses == ["queued", "starting", "running", "failed", "queued"]


def test_two_concurrent_claims_have_one_winner(client: TestClient, session: Session) -> None:
    config = run_config_factory(session)
    run = client.post("/api/v1/runs", json={"config_id": config.id}).json()
    headers = {"Authorization": f"Bearer {get_settings().worker_token}"}
    client.post("/internal/v1/workers/heartbeat", headers=headers, json={"worker_id": "w", "hostname": "h"})
    service.dispatch_runs(session, [service.Dispatch(run["id"], 1, "w", [])])
    session.expire_all()
    dispatch_id = session.get(Run, run["id"]).dispatch_id
    barrier, answers = threading.Barrier(2), []

    def claim_once(task_id: str) -> None:  # the same task delivered twice, to two threads of the worker
        barrier.wait()
        answers.append(client.post(
            f"/internal/v1/runs/{run['id']}/claim", headers=headers,
            json={"attempt": 1, "dispatch_id": dispatch_id, "worker_id": "w", "task_id": task_id, "hostname": "h"},
        ).status_code)

    threads = [threading.Thread(target=claim_once, args=(f"t{i}",)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(answers) == [200, 409]
    session.expire_all()
    assert session.get(Run, run["id"]).status == RunStatus.starting
