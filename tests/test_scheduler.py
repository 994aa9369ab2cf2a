"""The panel's scheduler on a real database: which worker a queued run or a pending server goes to,
in what order, why the others wait, and what happens to dispatches nobody claims. Workers are
registered through their heartbeat, as real ones are; tasks go to the embedded broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from app.db import get_engine, migrate
from app.models import InferenceServer, Run, RunEvent, Worker
from app.models.base import utcnow
from app.models.deployment import DeploymentStatus
from app.models.run import RunPriority
from app.services import runs as run_service
from app.services import scheduler
from app.services.workers import record_heartbeat
from app.settings import get_settings
from app.wire import ClaimRequest, GpuInfo, Heartbeat
from tests.factories import run_config_factory

MODEL = "/models/tiny"


@pytest.fixture
def session(data_dir) -> Session:
    migrate()
    with Session(get_engine()) as db_session:
        yield db_session


def heartbeat(session: Session, worker_id: str, *, gpus: int = 0, cpu_slots: int = 0, serve_slots: int = 0,
              models: dict[str, str] | None = None, instance: str = "1") -> None:
    fingerprints = models if models is not None else held(session)
    record_heartbeat(session, Heartbeat(
        worker_id=worker_id, hostname=worker_id, instance_id=instance, cpu_train_slots=cpu_slots,
        serve_slots=serve_slots, gpus=[GpuInfo(index=i, name="H200") for i in range(gpus)], models=fingerprints,
    ))


def held(session: Session) -> dict[str, str]:
    from app.models import ModelEntry

    return {m.path: m.fingerprint for m in session.exec(select(ModelEntry))}


@pytest.fixture
def config_id(session: Session) -> int:
    config = run_config_factory(session, MODEL)
    # A registered model with a fingerprint (the folder does not exist here).
    from app.models import ModelEntry

    model = session.get(ModelEntry, config.model_id)
    model.fingerprint = "f" * 64
    session.add(model)
    session.commit()
    return config.id


def start(session: Session, config_id: int, *, gpus: int = 0, priority: str = "normal") -> Run:
    run, _ = run_service.start_run(session, config_id, gpus=gpus, priority=RunPriority(priority))
    return run


def runs_by_id(session: Session) -> dict[int, Run]:
    session.expire_all()
    return {run.id: run for run in session.exec(select(Run))}


def test_a_run_goes_to_the_worker_it_leaves_with_the_least_room(session, config_id) -> None:
    heartbeat(session, "big", gpus=4)
    heartbeat(session, "small", gpus=2)
    first = start(session, config_id, gpus=2)
    second = start(session, config_id, gpus=2)
    third = start(session, config_id, gpus=2)
    assert scheduler.schedule(session) == 3
    runs = runs_by_id(session)
    assert runs[first.id].dispatched_worker_id == "small" and runs[first.id].gpu_ids == [0, 1]
    assert runs[second.id].dispatched_worker_id == "big" and runs[second.id].gpu_ids == [0, 1]
    assert runs[third.id].dispatched_worker_id == "big" and runs[third.id].gpu_ids == [2, 3]
    assert scheduler.schedule(session) == 0  # nothing is dispatched twice


def test_priority_first_then_first_come_first_served_and_small_runs_fill_the_gaps(session, config_id) -> None:
    heartbeat(session, "box", gpus=2)
    low = start(session, config_id, gpus=1, priority="low")
    normal = start(session, config_id, gpus=1)
    high = start(session, config_id, gpus=2, priority="high")
    later_normal = start(session, config_id, gpus=1)
    assert scheduler.schedule(session) == 1
    runs = runs_by_id(session)
    assert runs[high.id].dispatched_worker_id == "box"
    assert [runs[r.id].dispatch_id for r in (normal, later_normal, low)] == [None, None, None]
    assert [scheduler.queue_spot(r.id).position for r in (normal, later_normal, low)] == [1, 2, 3]
    reason = scheduler.queue_spot(normal.id).reason
    assert reason.startswith("needs 1 GPU(s); box has 0 of 2 free") and f"run {high.id}" in reason


def test_why_a_run_waits(session, config_id) -> None:
    cpu_run = start(session, config_id)
    scheduler.schedule(session)
    assert scheduler.queue_spot(cpu_run.id).reason.startswith("no worker is online")
    heartbeat(session, "big-but-without-the-model", gpus=4, models={})
    gpu_run = start(session, config_id, gpus=3)
    heartbeat(session, "elsewhere", cpu_slots=1, gpus=2, models={})
    scheduler.schedule(session)
    assert "no online worker holds model tiny-model" in scheduler.queue_spot(cpu_run.id).reason
    heartbeat(session, "elsewhere", cpu_slots=0, gpus=2)
    scheduler.schedule(session)
    assert "no online worker holding tiny-model trains on the CPU" in scheduler.queue_spot(cpu_run.id).reason
    assert "the largest online worker holding tiny-model has 2" in scheduler.queue_spot(gpu_run.id).reason
    assert run_service.get_run(session, cpu_run.id).dispatch_id is None


def test_a_dispatch_nobody_claims_is_dispatched_again_and_the_claim_guards_it(session, config_id) -> None:
    heartbeat(session, "a", cpu_slots=1)
    run = start(session, config_id)
    scheduler.schedule(session)
    first_dispatch = runs_by_id(session)[run.id].dispatch_id
    assert first_dispatch is not None
    later = utcnow() + timedelta(seconds=get_settings().dispatch_timeout_s + 1)
    heartbeat(session, "b", cpu_slots=1)
    # Worker a still looks online at that moment, but never claimed: both may take it next.
    session.exec(select(Worker)).all()
    for worker in session.exec(select(Worker)).all():
        worker.last_seen_at = later
        session.add(worker)
    session.commit()
    scheduler.schedule(session, now=later)
    again = runs_by_id(session)[run.id]
    assert again.dispatch_id not in (None, first_dispatch)
    events = [e.data for e in session.exec(select(RunEvent).where(RunEvent.run_id == run.id))]
    assert any("did not claim it within" in e.get("redispatch", "") for e in events)
    # The first task arrives late: its claim is refused; the current one is taken, once.
    stale = ClaimRequest(attempt=1, dispatch_id=first_dispatch, worker_id="a")
    with pytest.raises(run_service.RunConflict):
        run_service.claim_run(session, run.id, stale)
    current = ClaimRequest(attempt=1, dispatch_id=again.dispatch_id, worker_id=again.dispatched_worker_id)
    assert run_service.claim_run(session, run.id, current).run_id == run.id
    with pytest.raises(run_service.RunConflict):
        run_service.claim_run(session, run.id, current)


def test_an_offline_worker_loses_its_unclaimed_dispatch(session, config_id) -> None:
    heartbeat(session, "a", cpu_slots=1)
    run = start(session, config_id)
    scheduler.schedule(session)
    assert runs_by_id(session)[run.id].dispatched_worker_id == "a"
    later = utcnow() + timedelta(seconds=get_settings().heartbeat_timeout_s + 1)
    scheduler.schedule(session, now=later)
    assert runs_by_id(session)[run.id].dispatch_id is None
    assert scheduler.queue_spot(run.id).reason.startswith("no worker is online")


def test_serving_has_its_own_slots_and_never_waits_for_training(session, config_id) -> None:
    heartbeat(session, "box", cpu_slots=1, serve_slots=1)
    training = start(session, config_id)
    waiting = start(session, config_id)
    server = InferenceServer(base_model_path=MODEL, api_key="secret")
    session.add(server)
    session.commit()
    assert scheduler.schedule(session) == 2  # the server and one run
    session.refresh(server)
    assert server.dispatched_worker_id == "box"
    assert runs_by_id(session)[training.id].dispatched_worker_id == "box"
    assert runs_by_id(session)[waiting.id].dispatch_id is None
    second_server = InferenceServer(base_model_path=MODEL, api_key="other")
    session.add(second_server)
    session.commit()
    scheduler.schedule(session)
    assert scheduler.server_wait_reason(second_server.id).startswith("box's serving slots are busy with server")


def test_a_restarted_worker_loses_what_its_previous_process_ran(session, config_id) -> None:
    heartbeat(session, "a", cpu_slots=2, serve_slots=1, instance="first")
    claimed = start(session, config_id)
    unclaimed = start(session, config_id)
    scheduler.schedule(session)
    runs = runs_by_id(session)
    run_service.claim_run(session, claimed.id, ClaimRequest(
        attempt=1, dispatch_id=runs[claimed.id].dispatch_id, worker_id="a", instance_id="first"))
    server = InferenceServer(base_model_path=MODEL, api_key="k", status=DeploymentStatus.ready, worker_id="a",
                             worker_instance="first")
    session.add(server)
    session.commit()
    heartbeat(session, "a", cpu_slots=2, serve_slots=1, instance="second")
    runs = runs_by_id(session)
    assert runs[claimed.id].status == "lost" and "restarted" in runs[claimed.id].status_reason
    assert runs[unclaimed.id].status == "queued" and runs[unclaimed.id].dispatch_id is None
    session.refresh(server)
    assert server.status == "failed" and "restarted" in server.status_reason


def test_the_run_pages_and_the_api_say_where_a_queued_run_stands(client, config_id) -> None:
    run_id = client.post("/api/v1/runs", json={"config_id": config_id, "priority": "high"}).json()["id"]
    with Session(get_engine()) as db:
        scheduler.schedule(db)
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["priority"], run["queue_position"]) == ("high", 1)
    assert run["wait_reason"].startswith("no worker is online")
    for page in (f"/runs/{run_id}", "/runs"):
        assert "#1 in the queue (high priority): no worker is online" in client.get(page).text
    assert client.post("/api/v1/runs", json={"config_id": config_id, "priority": "urgent"}).status_code == 422
