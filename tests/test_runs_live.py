"""End to end through the panel: uvicorn + a Celery worker on real Redis, real `llamafactory-cli
train` on the tiny model; the dashboard's event stream watches the curve grow."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import RunMetric
from tests.factories import run_config_factory
from tests.live import REDIS_URL, LivePanel, live_panel, parse_sse  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

TRAINING_TIMEOUT_S = 300.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}


def read_stream(client: httpx.Client, url: str, events: list[dict[str, Any]], **headers: str) -> None:
    """Collect a run's server-sent events until the stream's `end`."""
    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=TRAINING_TIMEOUT_S)) as response:
        response.raise_for_status()
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            if event.get("event") == "end":
                return


@pytest.mark.parametrize("live_panel", [REDIS_URL], indirect=True)
def test_the_tiny_model_trains_through_the_panel_and_the_stream_follows(
    live_panel: LivePanel, tiny_model: Path
) -> None:
    panel = live_panel
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params={
            "val_size": 0.1, "save_steps": 3, "eval_steps": 3, "num_train_epochs": 1.0,
            "include_num_input_tokens_seen": True,
        }).id
    # The page's form, as the button sends it (htmx): the answer sends the browser to the dashboard.
    started = panel.api.post("/runs", data={"config_id": config_id, "idempotency_key": "e2e"},
                             headers={"HX-Request": "true"})
    assert started.status_code == 204, started.text
    run_id = int(started.headers["HX-Redirect"].rsplit("/", 1)[1])

    page = panel.api.get(f"/runs/{run_id}").text
    cursor = json.loads(page.split('id="run-data">')[1].split("</script>")[0])["cursor"]
    events: list[dict[str, Any]] = []
    watcher = threading.Thread(target=read_stream, args=(panel.api, f"/runs/{run_id}/events?after={cursor}", events))
    watcher.start()

    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while (run := panel.api.get(f"/api/v1/runs/{run_id}").json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"run stayed {run['status']}\n{panel.log()}"
        time.sleep(0.2)
    watcher.join(timeout=30)
    assert run["status"] == "succeeded", f"{run['status_reason']}\n{panel.log()}"

    kinds = [event["event"] for event in events]
    assert kinds[-1] == "end" and {"status", "progress", "metric", "log"} <= set(kinds)
    ids = [int(event["id"]) for event in events if "id" in event]
    assert ids == sorted(set(ids)) and ids[0] > cursor  # nothing missed, nothing twice
    statuses = [json.loads(e["data"])["status"] for e in events if e["event"] == "status"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    # Metric events streamed while the run ran (after "running", before "succeeded"), in step order.
    # Order, not timing: on a busy machine a short run's points may all arrive within a fraction of a second.
    status_at = {json.loads(e["data"])["status"]: i for i, e in enumerate(events) if e["event"] == "status"}
    metric_at = [i for i, e in enumerate(events) if e["event"] == "metric"]
    assert status_at["running"] < metric_at[0] and metric_at[-1] < status_at["succeeded"]
    metric_steps = [json.loads(events[i]["data"])["step"] for i in metric_at]
    assert metric_steps == sorted(metric_steps)

    with Session(get_engine()) as session:
        rows = session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
    train_steps = [row.step for row in rows if row.loss is not None]
    assert train_steps == list(range(1, run["total_steps"] + 1))
    assert any(row.eval_loss is not None for row in rows)
    streamed = {json.loads(e["data"])["step"] for e in events if e["event"] == "metric"}
    assert streamed == {row.step for row in rows}

    # A reload after the end replays from its cursor: exactly the events after it.
    replay: list[dict[str, Any]] = []
    read_stream(panel.api, f"/api/v1/runs/{run_id}/events?after={ids[len(ids) // 2]}", replay)
    assert [int(e["id"]) for e in replay if "id" in e] == ids[len(ids) // 2 + 1:]

    assert run["lineage"]["versions"]["llamafactory"].startswith("0.9")
    assert "training_loss.png" in panel.api.get(f"/api/v1/runs/{run_id}/artifacts").json()
    checkpoints = panel.api.get(f"/api/v1/runs/{run_id}/checkpoints").json()
    assert checkpoints and all(c["complete"] for c in checkpoints)
    adapter = zipfile.ZipFile(io.BytesIO(panel.api.get(f"/runs/{run_id}/download").content))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.namelist())


@pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)
def test_the_cli_starts_lists_cancels_and_follows_a_run(live_panel: LivePanel) -> None:
    panel = live_panel
    with Session(get_engine()) as session:
        config = run_config_factory(session, "/models/tiny")
    started = panel.cli("run", "start", config.name, "--name", "from the cli")
    assert started.returncode == 0, started.stderr
    run_id = int(started.stdout.split()[1])
    listed = panel.cli("run", "list")
    assert "queued" in listed.stdout and "from the cli" in listed.stdout
    assert panel.cli("run", "resume", str(run_id)).returncode == 1  # a queued run: 409
    cancelled = panel.cli("run", "cancel", str(run_id))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    refused = panel.cli("run", "cancel", str(run_id))
    assert refused.returncode == 1 and "already cancelled" in refused.stderr
    followed = panel.cli("run", "logs", "-f", str(run_id), timeout_s=30)
    assert followed.returncode == 1 and f"[run {run_id} cancelled" in followed.stderr
    retried = panel.cli("run", "retry", str(run_id))
    assert retried.returncode == 0 and "attempt 2" in retried.stdout
