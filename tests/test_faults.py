"""Fault injection with real processes: uvicorn, Celery workers, Redis and `llamafactory-cli train`
on the tiny model. Each fault is injected while a run trains; what must survive is checked in the
database the app writes.

The fifth fault of the issue, a write error (disk full) during an upload, is
tests/test_datasets.py::test_a_write_error_stores_nothing (507, nothing registered, no file left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import RunEvent, RunMetric, TrainConfig
from app.services.workers import worker_views
from app.settings import Settings
from tests.factories import run_config_factory
from tests.conftest import PROJECT_ROOT
from tests.live import START_TIMEOUT_S, LivePanel, _admin_token, free_port, live_panel, parse_sse  # noqa: F401

TRAINING_TIMEOUT_S = 300.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}
HEARTBEAT_TIMEOUT_S = 6.0
LOST_SWEEP_S = 2.0  # app.services.scheduler.LOST_SWEEP_INTERVAL_S
# Fast per-run heartbeats, so that a 6 s timeout never catches a live run on a busy machine.
FAULT_ENV = {"TUNEBOARD_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "TUNEBOARD_HEARTBEAT_INTERVAL_S": "1"}
# 32 training rows × 6 epochs / batch 4 = 48 steps: long enough to be hit mid-run.
LONG_RUN = {"num_train_epochs": 6.0, "save_steps": 8, "eval_steps": 8}


def start_run(panel: LivePanel, tiny_model: Path) -> int:
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params=LONG_RUN).id
    return panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]


def wait_run(panel: LivePanel, run_id: int, until, timeout_s: float = TRAINING_TIMEOUT_S, *,
             log: str = "worker") -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run = panel.api.get(f"/api/v1/runs/{run_id}").json()
            if until(run):
                return run
        except httpx.TransportError:
            pass  # the web app is being restarted
        assert time.monotonic() < deadline, f"run {run_id}: {run}\n{panel.log(log)}"
        time.sleep(0.2)


def training_mid_run(run: dict[str, Any]) -> bool:
    assert run["status"] not in FINISHED, run
    return run["status"] == "running" and run["current_step"] >= 2


def trainers(run_folder: Path) -> list[psutil.Process]:
    """Processes started for this run (llamafactory-cli and what it spawned): they run in the run
    folder (`llamafactory-cli train train.yaml`) or name it on their command line."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cwd, cmdline = process.info["cwd"] or "", " ".join(process.info["cmdline"] or ())
        if cwd.startswith(str(run_folder)) or str(run_folder) in cmdline:
            found.append(process)
    return found


def steps_in_trainer_log(run_folder: Path) -> list[int]:
    lines = (run_folder / "output" / "trainer_log.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["current_steps"] for line in lines if '"loss"' in line})


def assert_metrics_complete(run_id: int, run: dict[str, Any], run_folder: Path) -> None:
    """One metric row per training step, each with its loss, exactly as the trainer logged them;
    every log line stored once."""
    with Session(get_engine()) as session:
        rows = session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
        logs = [event.data for event in session.exec(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.kind == "log"))]
    trained = [row.step for row in rows if row.loss is not None]
    assert trained == list(range(1, run["total_steps"] + 1)) == steps_in_trainer_log(run_folder)
    keys = [(line["attempt"], line["source"], line["offset"]) for line in logs]
    assert logs and len(keys) == len(set(keys))


# --------------------------------------------------------------------------- kill -9 the worker
@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"broker_url": "redis://127.0.0.1:6379/13", "env": FAULT_ENV}],
                         indirect=True)
def test_a_killed_worker_loses_its_run_frees_its_slot_leaves_no_orphan_and_retry_trains(
    live_panel: LivePanel, tiny_model: Path
) -> None:
    panel = live_panel
    run_id = start_run(panel, tiny_model)
    run = wait_run(panel, run_id, training_mid_run)
    run_folder = panel.data_dir / "runs" / str(run_id)
    assert trainers(run_folder), "no trainer process found for the run"
    with Session(get_engine()) as session:
        [view] = [v for v in worker_views(session) if v.worker.id == run["worker_id"]]
        assert [r.id for r in view.runs] == [run_id]  # the worker's slot is held by the run

    killed_at = time.monotonic()
    panel.stop("worker", signal.SIGKILL)
    lost = wait_run(panel, run_id, lambda r: r["status"] in FINISHED, timeout_s=60)
    lost_after = time.monotonic() - killed_at
    assert lost["status"] == "lost" and "silent since" in lost["status_reason"], lost
    print(f"\nlost {lost_after:.1f} s after the kill (timeout {HEARTBEAT_TIMEOUT_S} s, sweep {LOST_SWEEP_S} s)")

    # No orphan: PR_SET_PDEATHSIG took the trainer down with the worker.
    deadline = time.monotonic() + 10
    while (left := trainers(run_folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [(p.pid, p.cmdline()) for p in left]
    with Session(get_engine()) as session:
        assert all(not view.runs for view in worker_views(session))  # the slot is free

    retried = panel.api.post(f"/api/v1/runs/{run_id}/retry").raise_for_status().json()
    assert retried["status"] == "queued" and retried["attempt"] == 2
    panel.start_worker("worker2")
    done = wait_run(panel, run_id, lambda r: r["status"] in FINISHED, log="worker2")
    assert done["status"] == "succeeded", f"{done['status_reason']}\n{panel.log('worker2')}"
    assert done["attempt"] == 2 and done["worker_id"].startswith("worker2@")
    assert_metrics_complete(run_id, done, run_folder)


# --------------------------------------------------------------------------- restart the web app
def follow_events(panel: LivePanel, run_id: int, after: int, restarts: list[float]) -> list[dict[str, Any]]:
    """A dashboard's event stream that reconnects (Last-Event-ID) whenever the connection drops,
    until the run's `end` event."""
    events: list[dict[str, Any]] = []
    last_id = str(after)
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with panel.api.stream("GET", f"/api/v1/runs/{run_id}/events", headers={"Last-Event-ID": last_id},
                                  timeout=httpx.Timeout(10, read=60)) as response:
                response.raise_for_status()
                for event in parse_sse(response.iter_lines()):
                    events.append(event)
                    last_id = event.get("id", last_id)
                    if event.get("event") == "end":
                        return events
        except (httpx.TransportError, httpx.HTTPStatusError):
            restarts.append(time.monotonic())
            time.sleep(0.3)
    raise AssertionError(f"no end event; {len(events)} events")


# The web app is down for longer than the heartbeat timeout (up to 5 s graceful stop + 3 s + its
# start): the run survives because the restarted app waits one timeout before its first lost-run
# sweep, and the worker's reporter retries at least every 5 s.
@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"broker_url": "redis://127.0.0.1:6379/14",
                                         "env": {**FAULT_ENV, "TUNEBOARD_HEARTBEAT_TIMEOUT_S": "8"}}],
                         indirect=True)
def test_restarting_the_web_app_mid_run_loses_nothing_and_the_dashboard_replays(
    live_panel: LivePanel, tiny_model: Path
) -> None:
    import threading

    panel = live_panel
    run_id = start_run(panel, tiny_model)
    wait_run(panel, run_id, lambda r: r["status"] != "queued")
    with Session(get_engine()) as session:
        cursor = session.exec(select(RunEvent.id).where(RunEvent.run_id == run_id).order_by(RunEvent.id)).first()
    events: list[dict[str, Any]] = []
    reconnects: list[float] = []
    watcher = threading.Thread(
        target=lambda: events.extend(follow_events(panel, run_id, cursor, reconnects)), daemon=True)
    watcher.start()
    wait_run(panel, run_id, training_mid_run)

    panel.stop("web")
    time.sleep(3)  # the worker keeps training; its reports wait and retry
    panel.start_web()
    done = wait_run(panel, run_id, lambda r: r["status"] in FINISHED)
    watcher.join(timeout=60)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done["status_reason"]
    assert reconnects, "the stream never dropped: the restart did not happen mid-stream"

    with Session(get_engine()) as session:
        stored = session.exec(
            select(RunEvent.id).where(RunEvent.run_id == run_id, RunEvent.id > cursor).order_by(RunEvent.id)
        ).all()
    received = [int(event["id"]) for event in events if "id" in event]
    assert received == list(stored)  # every event after the cursor, once, in order, across the restart
    run_folder = panel.data_dir / "runs" / str(run_id)
    assert_metrics_complete(run_id, done, run_folder)
    streamed_steps = {json.loads(e["data"])["step"] for e in events if e.get("event") == "metric"}
    assert set(range(1, done["total_steps"] + 1)) <= streamed_steps


# --------------------------------------------------------------------------- restart Redis
@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A private redis-server (never the machine's shared one on :6379), restartable on its port."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(tmp_path)]
    servers: list[subprocess.Popen] = []

    def start() -> None:
        servers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        import redis

        while True:
            try:
                redis.Redis(port=port).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def restart(down_s: float) -> None:
        servers[-1].send_signal(signal.SIGKILL)
        servers[-1].wait()
        time.sleep(down_s)
        start()

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()


@pytest.mark.slow
def test_restarting_redis_mid_run_loses_and_duplicates_no_metric(
    own_redis: tuple[str, Any], data_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from tests.live import running_panel

    broker_url, restart_redis = own_redis
    with running_panel(data_dir, tmp_path / "logs", broker_url=broker_url, env=FAULT_ENV) as panel:
        run_id = start_run(panel, tiny_model)
        wait_run(panel, run_id, training_mid_run)
        restart_redis(down_s=3)
        done = wait_run(panel, run_id, lambda r: r["status"] in FINISHED)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done["status_reason"]
        assert_metrics_complete(run_id, done, panel.data_dir / "runs" / str(run_id))

        # The worker reconnected: a run queued after the restart reaches it and trains.
        assert panel.processes["worker"].poll() is None, panel.log(chars=1500)
        with Session(get_engine()) as session:
            first = session.get(TrainConfig, done["config_id"])
            quick = TrainConfig(name="after-restart", model_id=first.model_id, dataset_ids=first.dataset_ids,
                                params={**first.params, "num_train_epochs": 1.0})
            session.add(quick)
            session.commit()
            quick_id = quick.id
        second = panel.api.post("/api/v1/runs", json={"config_id": quick_id}).raise_for_status().json()["id"]
        second_done = wait_run(panel, second, lambda r: r["status"] in FINISHED)
        assert second_done["status"] == "succeeded", f"{second_done['status_reason']}\n{panel.log()}"
        assert second_done["worker_id"] == done["worker_id"]


# --------------------------------------------------------------------------- SIGTERM `tuneboard up`
@pytest.mark.slow
def test_sigterm_to_tuneboard_up_stops_every_child_and_nothing_listens_beyond_loopback(
    data_dir: Path, tmp_path: Path, tiny_model: Path
) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("TUNEBOARD_")}
    env.update({"TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": str(data_dir),
                "TUNEBOARD_MODEL_ROOTS": os.environ["TUNEBOARD_MODEL_ROOTS"], "TUNEBOARD_WORKER_GPUS": "none",
                "TUNEBOARD_APP_URL": f"http://127.0.0.1:{port}", "TUNEBOARD_CANCEL_GRACE_S": "10"})
    token = _admin_token()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)], env=env, cwd=PROJECT_ROOT,
                          stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                       timeout=30)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        with Session(get_engine()) as session:
            config_id = run_config_factory(session, str(tiny_model), rows=40, params=LONG_RUN).id
        run_id = api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]
        deadline = time.monotonic() + TRAINING_TIMEOUT_S
        while not training_mid_run(api.get(f"/api/v1/runs/{run_id}").json()):
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-4000:]
            time.sleep(0.2)

        tree = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()[:4]) for p in tree)
        assert "uvicorn" in names and "celery" in names and "llamafactory-cli" in names, names
        listening = [c.laddr for p in [psutil.Process(up.pid), *tree] for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(address.ip in ("127.0.0.1", "::1") for address in listening), listening

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while (alive := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        api.close()
        if up.poll() is None:
            up.kill()
            up.wait()
        for process in psutil.Process().children(recursive=True):
            if process.pid != up.pid and str(data_dir) in " ".join(process.cmdline()):
                process.kill()
        log.close()


# --------------------------------------------------------------------------- loopback only
def test_nothing_binds_beyond_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The web app's default address, and the inference servers a worker starts (vLLM and
    LLaMA-Factory's api, whose own default is 0.0.0.0): with the panel on this machine they listen
    on loopback only; elsewhere on the address the worker advertises, behind the server's secret."""
    from pathlib import Path

    from app.wire import AdapterSpec, ArtifactManifest, ServerSpec
    from workers.heartbeat import advertise_host
    from workers.serving import server_command

    for name in ("TUNEBOARD_HOST", "TUNEBOARD_APP_URL", "TUNEBOARD_ADVERTISE_HOST"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.host == "127.0.0.1" and advertise_host(settings) == "127.0.0.1"
    assert advertise_host(Settings(_env_file=None, app_url="http://localhost:8000")) == "127.0.0.1"
    assert advertise_host(Settings(_env_file=None, advertise_host="10.0.0.7")) == "10.0.0.7"
    adapter = AdapterSpec(deployment_id=1, lora_name="a", run_id=1, manifest=ArtifactManifest(name="adapter", files=[]))
    spec = ServerSpec(server_id=1, backend="vllm", base_model_path="/m", base_name="m", api_key="s3cret",
                      max_lora_rank=8, max_model_len=256, kv_cache_bytes="64M", cpu_threads=2,
                      gpu_memory_utilization=0.5, ready_timeout_s=60, heartbeat_interval_s=2, adapters=[adapter],
                      template="qwen")
    host = advertise_host(settings)
    for backend, gpu_ids in (("vllm", []), ("vllm", [0]), ("llamafactory", [])):
        command, env = server_command(spec.model_copy(update={"backend": backend, "gpu_ids": gpu_ids}),
                                      {"a": Path("/cache/a")}, host, 8123, settings)
        assert "s3cret" not in " ".join(command)  # never on a command line others can read
        if backend == "vllm":
            assert command[command.index("--host") + 1] == "127.0.0.1" and env["VLLM_API_KEY"] == "s3cret"
        else:
            assert env["API_HOST"] == "127.0.0.1" and "--host" not in command and env["API_KEY"] == "s3cret"
