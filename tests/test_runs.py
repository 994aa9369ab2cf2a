"""Runs through the real app (TestClient, real SQLite): start, the worker channel, cancel, resume,
retry, delete, the event stream's replay, artifacts and the pages. Bad input is a clear 4xx that
changes nothing."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from app.db import get_engine
from app.models import Run, RunEvent, RunMetric, TrainConfig, Worker
from app.models.base import utcnow
from app.services import runs as service
from app.settings import get_settings
from tests.factories import run_config_factory, store_folder


@pytest.fixture
def worker_headers(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().worker_token}"}


@pytest.fixture
def config(session: Session) -> TrainConfig:
    return run_config_factory(session)


def start(client: TestClient, config_id: int, **body) -> dict:
    response = client.post("/api/v1/runs", json={"config_id": config_id, **body})
    assert response.status_code == 201, response.text
    return response.json()


def claim(client, headers, run_id, attempt=1, worker_id="w1"):
    """The worker's claim of the attempt the panel dispatched to it (dispatched here first, as
    the scheduler would, when it is still waiting). The worker is online: a dispatch to an
    offline one is taken back."""
    client.post("/internal/v1/workers/heartbeat", headers=headers,
                json={"worker_id": worker_id, "hostname": "h", "cpu_train_slots": 1})
    with Session(get_engine()) as db:
        run = db.get(Run, run_id)
        if run.status == "queued" and run.dispatch_id is None:
            service.dispatch_runs(db, [service.Dispatch(run.id, run.attempt, worker_id, [])])
        db.refresh(run)
        dispatch_id = run.dispatch_id or "none"
    return client.post(
        f"/internal/v1/runs/{run_id}/claim", headers=headers,
        json={"attempt": attempt, "dispatch_id": dispatch_id, "worker_id": worker_id, "task_id": "t",
              "hostname": "h"},
    )


def report(client, headers, run_id, attempt=1, **body):
    return client.post(
        f"/internal/v1/runs/{run_id}/events", headers=headers,
        json={"attempt": attempt, "worker_id": "w1", **body},
    )


def finish(client, headers, run_id, attempt=1, outcome="succeeded", **body):
    return client.post(
        f"/internal/v1/runs/{run_id}/finish", headers=headers,
        json={"attempt": attempt, "worker_id": "w1", "outcome": outcome, "exit_code": 0, **body},
    )


def counts(session: Session, run_id: int) -> tuple[int, int, int]:
    """The run's events (log lines included), metric points and log lines."""
    session.expire_all()
    count = lambda model, *where: session.exec(  # noqa: E731
        select(func.count()).select_from(model).where(model.run_id == run_id, *where)).one()
    return count(RunEvent), count(RunMetric), count(RunEvent, RunEvent.kind == "log")


def run_row(session: Session, run_id: int) -> Run:
    session.expire_all()
    return session.get(Run, run_id)


def sse_events(client: TestClient, url: str, **headers) -> list[dict]:
    """The events of a finished run's stream (it ends with `end`)."""
    events, current = [], {}
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                current[key] = value
    return events


# --------------------------------------------------------------------------- start
def test_start_freezes_the_config_and_records_the_lineage(client, session, config) -> None:
    run = start(client, config.id, name="first")
    assert run["status"] == "queued" and run["attempt"] == 1 and run["name"] == "first"
    session.refresh(config)
    assert config.frozen
    row = run_row(session, run["id"])
    assert "output_dir: '{OUTPUT_DIR}'" in row.train_yaml or "output_dir: {OUTPUT_DIR}" in row.train_yaml
    assert "{DATASET_DIR}" in row.train_yaml and "dataset: tiny-data" in row.train_yaml
    [dataset] = row.lineage["datasets"]
    assert len(dataset["sha256"]) == 64 and dataset["name"] == "tiny-data"
    assert row.lineage["model"]["path"] == "/models/tiny"
    assert client.get(f"/api/v1/runs/{row.id}/yaml").text == row.train_yaml
    assert [e.kind for e in session.exec(select(RunEvent).where(RunEvent.run_id == row.id))] == ["status"]


def test_start_with_a_missing_model_or_dataset_is_refused(client, session, config) -> None:
    no_model = TrainConfig(name="no-model", dataset_ids=config.dataset_ids, params={})
    gone_dataset = TrainConfig(name="gone", model_id=config.model_id, dataset_ids=[config.dataset_ids[0], 999])
    # An imported YAML named a dataset besides the registered one, and it was never registered.
    half_resolved = TrainConfig(name="half", model_id=config.model_id, dataset_ids=config.dataset_ids,
                                params={"dataset": "alpaca_clue_train"})
    session.add_all([no_model, gone_dataset, half_resolved])
    session.commit()
    cases = [
        (no_model.id, 400, "has no base model"),
        (gone_dataset.id, 404, "dataset 999"),
        (half_resolved.id, 400, "names datasets that are not registered (alpaca_clue_train)"),
        (12345, 404, "config 12345 not found"),
    ]
    for config_id, status_code, message in cases:
        response = client.post("/api/v1/runs", json={"config_id": config_id})
        assert response.status_code == status_code and message in response.json()["detail"]
    assert session.exec(select(func.count()).select_from(Run)).one() == 0
    session.refresh(gone_dataset)
    assert not gone_dataset.frozen


def test_a_double_clicked_start_creates_one_run(client, session, config) -> None:
    key = {"Idempotency-Key": "click-1"}
    first = client.post("/api/v1/runs", json={"config_id": config.id}, headers=key)
    again = client.post("/api/v1/runs", json={"config_id": config.id}, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]

    # Two at the same instant (the form's hidden token): still one run.
    barrier, answers = threading.Barrier(2), []

    def submit() -> None:
        barrier.wait()
        answers.append(client.post("/runs", data={"config_id": config.id, "idempotency_key": "form-1"},
                                   follow_redirects=False))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [a.status_code for a in answers] == [303, 303]
    assert answers[0].headers["location"] == answers[1].headers["location"]
    assert session.exec(select(func.count()).select_from(Run)).one() == 2


def test_more_gpus_than_any_worker_has_is_refused(client, session, config) -> None:
    response = client.post("/api/v1/runs", json={"config_id": config.id, "gpus": 2})
    assert response.status_code == 400 and "no online worker has a GPU" in response.json()["detail"]
    session.add(Worker(id="box", hostname="box", gpus=[{"index": 0}], last_seen_at=utcnow()))
    session.add(Worker(id="old", hostname="old", gpus=[{"index": i} for i in range(8)],
                       last_seen_at=utcnow() - timedelta(hours=1)))
    session.commit()
    response = client.post("/api/v1/runs", json={"config_id": config.id, "gpus": 2})
    assert response.status_code == 400 and "largest online worker has 1" in response.json()["detail"]
    page = client.post("/runs", data={"config_id": config.id, "gpus": "2"}, headers={"HX-Request": "true"})
    assert page.status_code == 200 and "largest online worker has 1" in page.text
    assert session.exec(select(func.count()).select_from(Run)).one() == 0
    assert start(client, config.id, gpus=1)["gpus_requested"] == 1
    assert start(client, config.id, gpus=0)["gpus_requested"] == 0


# --------------------------------------------------------------------------- the worker channel
def test_claim_events_and_finish_are_idempotent(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    assert client.post(f"/internal/v1/runs/{run_id}/claim", json={}).status_code == 401
    answer = claim(client, worker_headers, run_id)
    assert answer.status_code == 200
    body = answer.json()
    assert body["attempt"] == 1 and body["resume_from_checkpoint"] is None and body["gpus"] == 0
    assert body["dataset_info"]["tiny-data"]["file_name"] == body["datasets"][0]["file_name"]
    assert body["datasets"][0]["url"].startswith("/internal/v1/datasets/")
    assert claim(client, worker_headers, run_id).status_code == 409  # a redelivered task
    assert claim(client, worker_headers, run_id, worker_id="w2").status_code == 409  # not dispatched to it

    batch = {
        "status": "running",
        "progress": {"current_steps": 2, "total_steps": 10, "percentage": 20.0, "epoch": 0.4,
                     "elapsed_time": 3, "remaining_time": 12},
        "metrics": [{"step": 1, "loss": 2.5, "learning_rate": 1e-3}, {"step": 2, "loss": 2.4}],
        "logs": [{"source": "running_log", "offset": 0, "line": "step 1"},
                 {"source": "running_log", "offset": 7, "line": "step 2"}],
    }
    assert report(client, worker_headers, run_id, **batch).json() == {"cancel": False}
    row = run_row(session, run_id)
    assert row.status == "running" and row.current_step == 2 and row.total_steps == 10
    before = counts(session, run_id)
    assert before == (4 + 1 + 2 + 2, 2, 2)  # queued/dispatched/starting/running, progress, 2 metrics, 2 logs
    # The same batch again (a timeout, an app restart): nothing changes.
    assert report(client, worker_headers, run_id, **batch).status_code == 200
    assert counts(session, run_id) == before
    # An eval line of step 2 merges into that step's point.
    report(client, worker_headers, run_id, metrics=[{"step": 2, "eval_loss": 2.6}])
    step_two = service.metrics_of(session, run_id)[1]
    assert (step_two["step"], step_two["loss"], step_two["eval_loss"]) == (2, 2.4, 2.6)
    assert counts(session, run_id)[:2] == (before[0] + 1, 2)

    versions = {"llamafactory": "0.9.5", "transformers": "5.6.0", "peft": "0.18.1", "torch": "2.13.0"}
    done = finish(client, worker_headers, run_id, results={"train_loss": 2.4}, versions=versions,
                  checkpoints=[{"name": "checkpoint-2", "step": 2, "complete": True}])
    assert done.status_code == 200
    assert finish(client, worker_headers, run_id, versions=versions).status_code == 200  # re-sent
    assert finish(client, worker_headers, run_id, outcome="failed").status_code == 409
    row = run_row(session, run_id)
    assert row.status == "succeeded" and row.results == {"train_loss": 2.4}
    assert row.lineage["versions"] == versions and row.finished_at is not None
    assert report(client, worker_headers, run_id).status_code == 409  # the process must stop


def test_cancel_a_queued_run_then_its_task_claims_nothing(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    assert client.post(f"/api/v1/runs/{run_id}/cancel").json()["status"] == "cancelled"
    assert claim(client, worker_headers, run_id).status_code == 409


def test_cancel_a_running_run_goes_through_the_worker(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running")
    cancelled = client.post(f"/api/v1/runs/{run_id}/cancel").json()
    assert cancelled["status"] == "running" and cancelled["cancel_requested"] is True
    assert report(client, worker_headers, run_id).json() == {"cancel": True}
    # A non-zero exit after the user's cancel is still a cancel.
    assert finish(client, worker_headers, run_id, outcome="failed", exit_code=143).status_code == 200
    assert run_row(session, run_id).status == "cancelled"


def test_cancel_a_finished_run_is_refused(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    finish(client, worker_headers, run_id)
    events_before = counts(session, run_id)
    response = client.post(f"/api/v1/runs/{run_id}/cancel")
    assert response.status_code == 409 and "already succeeded" in response.json()["detail"]
    assert run_row(session, run_id).status == "succeeded" and counts(session, run_id) == events_before


def test_resume_without_a_checkpoint_is_refused(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    finish(client, worker_headers, run_id, outcome="failed", exit_code=1, reason="boom")
    response = client.post(f"/api/v1/runs/{run_id}/resume")
    assert response.status_code == 409 and "no complete checkpoint" in response.json()["detail"]
    row = run_row(session, run_id)
    assert (row.status, row.attempt) == ("failed", 1)


def test_resume_continues_from_the_latest_complete_checkpoint(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running",
           metrics=[{"step": s, "loss": 3.0 - s / 10} for s in range(1, 7)])
    output = service.run_dir(run_id) / "output"
    for step in (2, 4):  # uploaded by the worker once complete; checkpoint-6 never completed
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"step": {step}}}')
        store_folder(session, run_id, 1, output / f"checkpoint-{step}", f"checkpoint-{step}", step)
    client.post(f"/api/v1/runs/{run_id}/cancel")
    finish(client, worker_headers, run_id, outcome="cancelled",
           checkpoints=[{"name": f"checkpoint-{s}", "step": s, "complete": s < 6} for s in (2, 4, 6)])

    resumed = client.post(f"/api/v1/runs/{run_id}/resume").json()
    assert (resumed["status"], resumed["attempt"], resumed["resume_from"]) == ("queued", 2, "checkpoint-4")
    assert client.post(f"/api/v1/runs/{run_id}/resume").status_code == 409  # one new attempt only
    assert claim(client, worker_headers, run_id, attempt=1).status_code == 409  # the old task
    resumed_claim = claim(client, worker_headers, run_id, attempt=2).json()
    assert resumed_claim["resume_from_checkpoint"] == "checkpoint-4"
    # Another machine can fetch it: the claim carries the stored checkpoint's manifest.
    assert [f["path"] for f in resumed_claim["resume_manifest"]["files"]] == ["trainer_state.json"]
    # Steps after the checkpoint are logged again: the new values replace the old points.
    report(client, worker_headers, run_id, attempt=2, status="running", metrics=[{"step": 5, "loss": 1.0}])
    points = {m["step"]: m["loss"] for m in service.metrics_of(session, run_id)}
    assert points == {1: 2.9, 2: 2.8, 3: 2.7, 4: 2.6, 5: 1.0, 6: 2.4}
    assert report(client, worker_headers, run_id, attempt=1).status_code == 409


def test_retry_a_running_run_is_refused_and_a_failed_one_starts_over(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running", metrics=[{"step": 1, "loss": 2.0}])
    response = client.post(f"/api/v1/runs/{run_id}/retry")
    assert response.status_code == 409 and "is running" in response.json()["detail"]
    assert run_row(session, run_id).attempt == 1
    finish(client, worker_headers, run_id, outcome="failed", exit_code=1)
    retried = client.post(f"/api/v1/runs/{run_id}/retry").json()
    assert (retried["status"], retried["attempt"], retried["resume_from"]) == ("queued", 2, None)
    assert service.metrics_of(session, run_id) == []  # the curve starts over


def test_a_silent_worker_makes_its_run_lost(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id, worker_id="gpu-box")
    report(client, worker_headers, run_id, status="running")
    assert service.mark_lost_runs(session) == []
    later = utcnow() + timedelta(seconds=get_settings().heartbeat_timeout_s + 1)
    assert service.mark_lost_runs(session, now=later) == [run_id]
    row = run_row(session, run_id)
    assert row.status == "lost" and row.status_reason.startswith("worker gpu-box silent since")
    assert report(client, worker_headers, run_id).status_code == 409  # its process must stop
    assert client.post(f"/api/v1/runs/{run_id}/retry").json()["attempt"] == 2


# --------------------------------------------------------------------------- the event stream
def test_the_event_stream_replays_from_a_cursor(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running",
           metrics=[{"step": 1, "loss": 2.0}], logs=[{"source": "stdout", "offset": 0, "line": "hello"}])
    finish(client, worker_headers, run_id)
    events = sse_events(client, f"/runs/{run_id}/events")
    # queued, dispatched, starting, running, the metric, the log line, succeeded
    assert [e["event"] for e in events] == ["status", "status", "status", "status", "metric", "log", "status", "end"]
    assert json.loads(events[1]["data"])["dispatched_to"] == "w1"
    ids = [int(e["id"]) for e in events[:-1]]
    assert ids == sorted(ids)
    assert json.loads(events[4]["data"])["loss"] == 2.0
    # A reload (?after=) or a reconnect (Last-Event-ID) gets exactly what came after.
    after = sse_events(client, f"/api/v1/runs/{run_id}/events?after={ids[4]}")
    assert [int(e["id"]) for e in after[:-1]] == ids[5:]
    resumed = sse_events(client, f"/runs/{run_id}/events?after={ids[0]}", **{"Last-Event-ID": str(ids[5])})
    assert [int(e["id"]) for e in resumed[:-1]] == ids[6:]
    assert client.get("/runs/999/events").status_code == 404


def test_each_log_line_is_stored_once_and_a_metric_streams_as_merged(client, session, config, worker_headers) -> None:
    """One record per log line: the stream, the log API and the download read the same events;
    a metric event sends the step's point as it stands (train and eval lines merged)."""
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    batch = {"status": "running", "metrics": [{"step": 1, "loss": 2.0}],
             "logs": [{"source": "stdout", "offset": 0, "line": "hello"}]}
    report(client, worker_headers, run_id, **batch)
    report(client, worker_headers, run_id, **batch)  # re-sent: nothing new
    report(client, worker_headers, run_id, metrics=[{"step": 1, "eval_loss": 1.5}],
           logs=[{"source": "stdout", "offset": 6, "line": "world"}])
    finish(client, worker_headers, run_id)
    events = sse_events(client, f"/api/v1/runs/{run_id}/events")
    logs = [(int(e["id"]), json.loads(e["data"])) for e in events if e["event"] == "log"]
    assert [data["line"] for _, data in logs] == ["hello", "world"]
    metrics = [json.loads(e["data"]) for e in events if e["event"] == "metric"]
    assert len(metrics) == 2 and all((m["step"], m["loss"], m["eval_loss"]) == (1, 2.0, 1.5) for m in metrics)
    assert client.get(f"/api/v1/runs/{run_id}/logs").json() == [
        {"id": event_id, "run_id": run_id, "attempt": 1, "source": "stdout", "offset": offset, "line": line}
        for (event_id, _), offset, line in zip(logs, (0, 6), ("hello", "world"), strict=True)
    ]
    assert client.get(f"/api/v1/runs/{run_id}/logs?after_id={logs[0][0]}").json()[0]["line"] == "world"
    assert client.get(f"/runs/{run_id}/log.txt").text == "hello\nworld\n"


def test_the_dashboard_embeds_the_points_up_to_its_cursor(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running", metrics=[{"step": 1, "loss": 2.0}],
           logs=[{"source": "stdout", "offset": 0, "line": "first line"}])
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200
    raw = page.text.split('<script type="application/json" id="run-data">')[1].split("</script>")[0]
    data = json.loads(raw)
    assert data["cursor"] == service.event_cursor(session, run_id)
    assert data["metrics"][0]["loss"] == 2.0 and data["logs"][0]["line"] == "first line"
    assert "runs.js" in page.text and 'hx-post="/runs/%d/cancel"' % run_id in page.text


# --------------------------------------------------------------------------- artifacts, delete, pages
def test_artifacts_and_the_adapter_download(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    output = service.run_dir(run_id) / "output"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (output / "adapter_config.json").write_text('{"r": 8}')
    (output / "adapter_model.safetensors").write_bytes(b"\0" * 300_000)
    store_folder(session, run_id, 1, output / "checkpoint-2", "checkpoint-2", 2)
    store_folder(session, run_id, 1, output, "adapter")
    for name, status_code in (("training_loss.png", 200), ("../../etc/passwd", 400), ("notes.txt", 400)):
        answer = client.post(
            f"/internal/v1/runs/{run_id}/results", headers=worker_headers,
            data={"attempt": "1", "name": name}, files={"file": ("x", b"\x89PNG fake", "image/png")},
        )
        assert answer.status_code == status_code, name
    report(client, worker_headers, run_id, status="running", metrics=[{"step": 2, "eval_loss": 1.5}])
    finish(client, worker_headers, run_id, has_adapter=True)

    assert client.get(f"/api/v1/runs/{run_id}/artifacts").json() == ["training_loss.png"]
    assert client.get(f"/runs/{run_id}/artifacts/training_loss.png").content == b"\x89PNG fake"
    [checkpoint] = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()
    assert (checkpoint["name"], checkpoint["step"], checkpoint["eval_loss"]) == ("checkpoint-2", 2, 1.5)
    download = client.get(f"/api/v1/runs/{run_id}/download")
    assert download.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert archive.read("adapter_model.safetensors") == b"\0" * 300_000
    zipped = zipfile.ZipFile(io.BytesIO(client.get(f"/runs/{run_id}/download?checkpoint=checkpoint-2").content))
    assert zipped.namelist() == ["trainer_state.json"]
    assert client.get(f"/runs/{run_id}/download?checkpoint=../output").status_code == 404
    page = client.get(f"/runs/{run_id}").text
    assert "training_loss.png" in page and "checkpoint-2" in page and "train.yaml" in page


def test_delete_refuses_an_active_run_and_removes_a_finished_one(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 409
    claim(client, worker_headers, run_id)
    (service.run_dir(run_id) / "output").mkdir(parents=True)
    finish(client, worker_headers, run_id)
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 204
    assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
    assert not service.run_dir(run_id).exists() and counts(session, run_id) == (0, 0, 0)


def test_run_again_and_compare(client, session, config, worker_headers) -> None:
    first = start(client, config.id)["id"]
    claim(client, worker_headers, first)
    report(client, worker_headers, first, status="running", metrics=[{"step": 1, "loss": 2.0}])
    finish(client, worker_headers, first)
    again = client.post(f"/api/v1/runs/{first}/again")
    assert again.status_code == 201
    second = again.json()
    assert second["config_id"] == config.id and second["lineage"]["rerun_of"] == first
    compared = client.get(f"/api/v1/runs/compare?ids={first}&ids={second['id']}").json()
    assert compared["metrics"][str(first)][0]["loss"] == 2.0 and compared["diff"] == []
    page = client.get(f"/runs/compare?ids={first}&ids={second['id']}")
    assert page.status_code == 200 and "same settings" in page.text and "compare-data" in page.text


def test_the_runs_pages(client, session, config) -> None:
    empty = client.get("/runs")
    assert empty.status_code == 200 and "No run yet" in empty.text and "Start run" in empty.text
    form = client.post("/runs", data={"config_id": config.id, "name": "from the form"}, headers={"HX-Request": "true"})
    assert form.status_code == 204 and form.headers["HX-Redirect"].startswith("/runs/")
    listing = client.get("/runs")
    assert "from the form" in listing.text and 'hx-trigger="every 2s"' in listing.text
    # The poller asks for what changed since the page's cursor: nothing yet (tests/test_pages_runs.py
    # covers the changed rows).
    poll = re.search(r'hx-get="(/runs/rows\?[^"]+)"', listing.text).group(1).replace("&amp;", "&")
    assert client.get(poll, headers={"HX-Request": "true"}).status_code == 204
    assert client.get("/runs/compare").status_code == 200
