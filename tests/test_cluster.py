"""The panel and its workers on separate hosts: each host a network namespace of its own (the
panel with its Redis, each worker with its own data dir and the panel's hidden under a tmpfs), so
nothing can work through a shared filesystem or loopback. Real uvicorn, real Celery workers over
a password-protected Redis, real `llamafactory-cli train` and vLLM (CPU) on the tiny model."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import RunEvent, RunMetric
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, PROJECT_ROOT, log_in
from tests.factories import run_config_factory
from tests.live import _admin_token, run_of, start_run, worker_command
from tests.netns import Cluster, Host, netns_cluster, wait_for_port

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 6.0
DISPATCH_TIMEOUT_S = 8.0
WAIT_S = 300.0  # every wait is bounded; generous, the machine's 2 cores are shared
TINY = {"val_size": 0.1, "save_steps": 2, "eval_steps": 4, "num_train_epochs": 1.0,
        "include_num_input_tokens_seen": True}
FINISHED = {"succeeded", "failed", "cancelled", "lost"}


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S, logs: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.2)
    return result


@dataclass
class ClusterPanel:
    cluster: Cluster
    url: str
    api: httpx.Client
    data_dir: Path
    log_dir: Path
    worker_env: dict[str, str]
    tiny_model: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self, host: Host, *, cpu_slots: int, serve_slots: int) -> str:
        """A worker on `host` with its own data dir; the panel's is hidden from it."""
        name = f"{host.name}@{host.name}"
        own_data = self.log_dir.parent / f"{host.name}-data"
        env = {**self.worker_env, "TUNEBOARD_DATA_DIR": str(own_data),
               "TUNEBOARD_WORKER_CPU_SLOTS": str(cpu_slots), "TUNEBOARD_WORKER_SERVE_SLOTS": str(serve_slots)}
        self.workers[host.name] = host.popen(worker_command(name), env=env, cwd=PROJECT_ROOT,
                                             log_path=self.log_dir / f"{host.name}.log", hide=[self.data_dir])
        wait_for(lambda: self.worker_online(name), f"worker {name} online", 120, self.logs)
        return name

    def worker_online(self, name: str) -> bool:
        workers = self.api.get("/api/v1/workers").json()
        return any(w["id"] == name and w["online"] for w in workers)

    def start(self, config_id: int) -> int:
        return start_run(self.api, config_id)

    def run(self, run_id: int) -> dict[str, Any]:
        return run_of(self.api, run_id)

    def wait(self, run_id: int, statuses: set[str], timeout_s: float = WAIT_S) -> dict[str, Any]:
        return wait_for(lambda: (run := self.run(run_id))["status"] in statuses and run,
                        f"run {run_id} to become {statuses}", timeout_s, self.logs)

    def stored_checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        return [c for c in self.api.get(f"/api/v1/runs/{run_id}/checkpoints").json() if c["stored"]]

    def config(self, **params: Any) -> int:
        with Session(get_engine()) as session:
            return run_config_factory(session, str(self.tiny_model), name=f"c{secrets.token_hex(3)}", rows=40,
                                      params={**TINY, **params}).id

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
def cluster_panel(data_dir: Path, tmp_path: Path, tiny_model: Path) -> Iterator[ClusterPanel]:
    """The panel (uvicorn + Redis with a password) on host "panel"; hosts "a" and "b" for workers."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    _admin_token()
    with netns_cluster(["panel", "a", "b"]) as cluster:
        panel_host = cluster.host("panel")
        broker = cluster.start_redis(panel_host, password=secrets.token_hex(16))
        port = 8000
        url = f"http://{panel_host.address}:{port}"
        common = {
            "TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_BROKER_URL": broker, "TUNEBOARD_APP_URL": url,
            "TUNEBOARD_INTERNAL_TOKEN": secrets.token_hex(32), "TUNEBOARD_WORKER_GPUS": "none",
            "TUNEBOARD_HEARTBEAT_INTERVAL_S": "1", "TUNEBOARD_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "TUNEBOARD_DISPATCH_TIMEOUT_S": str(DISPATCH_TIMEOUT_S), "TUNEBOARD_CANCEL_GRACE_S": "60",
            "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
        }
        panel_env = {**common, "TUNEBOARD_DATA_DIR": str(data_dir),
                     "TUNEBOARD_MODEL_ROOTS": f'["{tiny_model.parent}"]'}
        panel_host.popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", panel_host.address,
             "--port", str(port), "--log-level", "warning"],
            env=panel_env, cwd=PROJECT_ROOT, log_path=log_dir / "web.log",
        )
        wait_for_port(panel_host.address, port, timeout=60)
        api = httpx.Client(base_url=url, timeout=30, trust_env=False)
        log_in(api, ADMIN_USERNAME, ADMIN_PASSWORD)
        panel = ClusterPanel(cluster, url, api, data_dir, log_dir, common, tiny_model)
        try:
            yield panel
        finally:
            api.close()


def test_train_on_one_host_then_serve_on_another_and_chat_through_the_gateway(cluster_panel: ClusterPanel) -> None:
    panel = cluster_panel
    trainer = panel.start_worker(panel.cluster.host("a"), cpu_slots=1, serve_slots=0)
    server_host = panel.cluster.host("b")
    serving = panel.start_worker(server_host, cpu_slots=0, serve_slots=1)

    run_id = panel.start(panel.config())
    run = panel.wait(run_id, FINISHED)
    assert run["status"] == "succeeded", run["status_reason"] + panel.logs()
    assert run["worker_id"] == trainer and run["has_adapter"]

    # A second, long run keeps the only training slot busy: serving must not wait for it.
    busy_id = panel.start(panel.config(num_train_epochs=30.0))
    panel.wait(busy_id, {"running"})
    deployed = panel.api.post("/api/v1/deployments", json={"run_id": run_id, "name": "across"})
    assert deployed.status_code == 201, deployed.text
    deployment_id = deployed.json()["id"]
    ready = wait_for(lambda: (d := panel.api.get(f"/api/v1/deployments/{deployment_id}").json())["status"]
                     in ("ready", "failed") and d, "the deployment", 240, panel.logs)
    assert ready["status"] == "ready", ready["status_reason"] + panel.logs()
    assert panel.run(busy_id)["status"] == "running"  # it did not wait for the training slot
    server = ready["server"]
    assert server["worker_id"] == serving and server["url"].startswith(f"http://{server_host.address}:")

    # The server is behind a secret only the gateway holds.
    with httpx.Client(trust_env=False, timeout=10) as direct:
        assert direct.get(f"{server['url']}/v1/models").status_code == 401
    key = panel.api.post("/api/v1/gateway-keys", json={"name": "cluster"}).json()["token"]
    client = openai.OpenAI(base_url=f"{panel.url}/v1", api_key=key, http_client=httpx.Client(trust_env=False))
    reply = client.chat.completions.create(model="across", max_tokens=8,
                                           messages=[{"role": "user", "content": "你是谁？"}])
    assert reply.choices[0].message.content and reply.model == "across"
    panel.api.post(f"/api/v1/runs/{busy_id}/cancel")
    panel.wait(busy_id, FINISHED)
    assert panel.api.delete(f"/api/v1/deployments/{deployment_id}").status_code == 200


def test_a_run_whose_worker_dies_resumes_on_another_host_from_the_stored_checkpoint(cluster_panel: ClusterPanel) -> None:
    panel = cluster_panel
    host_a, host_b = panel.cluster.host("a"), panel.cluster.host("b")
    first = panel.start_worker(host_a, cpu_slots=1, serve_slots=0)
    run_id = panel.start(panel.config(num_train_epochs=4.0))
    wait_for(lambda: panel.stored_checkpoints(run_id), "a checkpoint in the panel's store", logs=panel.logs)
    second = panel.start_worker(host_b, cpu_slots=1, serve_slots=0)

    host_a.kill_all()  # the machine dies: worker and trainer
    lost = panel.wait(run_id, {"lost"}, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
    assert lost["worker_id"] == first and "silent" in lost["status_reason"]
    checkpoint = max(panel.stored_checkpoints(run_id), key=lambda c: c["step"])

    resumed = panel.api.post(f"/api/v1/runs/{run_id}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["resume_from"] == checkpoint["name"]
    done = panel.wait(run_id, FINISHED)
    assert done["status"] == "succeeded", done["status_reason"] + panel.logs()
    assert done["worker_id"] == second and done["attempt"] == 2
    # Host b fetched the checkpoint from the panel: it never saw host a's disk.
    fetched = panel.log_dir.parent / "b-data" / "runs" / str(run_id) / "output" / checkpoint["name"]
    assert (fetched / "trainer_state.json").is_file()
    # The curve continues: every step once, those after the checkpoint from attempt 2.
    with Session(get_engine()) as session:
        points = session.exec(select(RunMetric).where(RunMetric.run_id == run_id)).all()
    by_step = {p.step: p for p in points if p.loss is not None}
    assert sorted(by_step) == list(range(1, done["total_steps"] + 1))
    assert all(by_step[s].attempt == 2 for s in by_step if s > checkpoint["step"])
    assert all(by_step[s].attempt == 1 for s in by_step if s <= checkpoint["step"])

    # Deleting the run deletes its artifacts everywhere: the panel's store, then host b's run
    # folder and cached copies, at b's next heartbeats.
    b_data = panel.log_dir.parent / "b-data"
    assert list((b_data / "cache" / "blobs").iterdir())
    assert panel.api.delete(f"/api/v1/runs/{run_id}").status_code == 204
    wait_for(lambda: not (b_data / "runs" / str(run_id)).exists() and not any((b_data / "cache" / "blobs").iterdir()),
             "host b to forget the deleted run", 60, panel.logs)
    assert not any((b_data / "cache" / "artifacts").iterdir())


def test_three_runs_on_two_one_slot_workers_never_wait_while_a_worker_is_idle(cluster_panel: ClusterPanel) -> None:
    panel = cluster_panel
    names = {panel.start_worker(panel.cluster.host(h), cpu_slots=1, serve_slots=0) for h in ("a", "b")}
    config_id = panel.config()
    run_ids = [panel.start(config_id) for _ in range(3)]
    wait_for(lambda: all(panel.run(run_id)["dispatched_worker_id"] for run_id in run_ids[:2]), "two dispatches")
    third = panel.run(run_ids[2])
    assert third["status"] == "queued" and third["dispatched_worker_id"] is None
    assert third["queue_position"] == 1
    assert "CPU training slot" in third["wait_reason"] and "busy with run" in third["wait_reason"]
    runs = [panel.wait(run_id, FINISHED) for run_id in run_ids]
    assert [r["status"] for r in runs] == ["succeeded"] * 3, panel.logs()
    first, second, last = runs
    # The first two ran at once, one on each worker; the third started only once one of them
    # had finished, on the worker that freed up first.
    assert {first["worker_id"], second["worker_id"]} == names
    assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]
    freed_first = min((first, second), key=lambda r: r["finished_at"])
    assert last["started_at"] >= freed_first["finished_at"]
    assert last["worker_id"] == freed_first["worker_id"]


def test_a_worker_that_dies_between_dispatch_and_claim_loses_nothing(cluster_panel: ClusterPanel) -> None:
    panel = cluster_panel
    # "a-ghost" sends heartbeats (online, one free slot, the model) but never reads its queue. It
    # takes the dispatch (best fit: a tie with the real worker goes to the first name) and dies
    # before it claims: once it has the dispatch, its heartbeats stop.
    ghost = {"worker_id": "a-ghost", "hostname": "ghost", "cpu_train_slots": 1, "serve_slots": 0,
             "instance_id": "ghost-1", "queues": ["default", "worker.a-ghost"]}
    internal = httpx.Client(base_url=f"{panel.url}/internal/v1", trust_env=False, timeout=10,
                            headers={"Authorization": f"Bearer {panel.worker_env['TUNEBOARD_INTERNAL_TOKEN']}"})
    config_id = panel.config()
    reply = internal.post("/workers/heartbeat", json=ghost).json()
    ghost["models"] = {m["path"]: m["fingerprint"] for m in reply["models"]}
    real = panel.start_worker(panel.cluster.host("b"), cpu_slots=1, serve_slots=0)
    dispatched_to_ghost = threading.Event()

    def ghost_heartbeats() -> None:
        deadline = time.monotonic() + WAIT_S
        while not dispatched_to_ghost.is_set() and time.monotonic() < deadline:
            internal.post("/workers/heartbeat", json=ghost).raise_for_status()
            dispatched_to_ghost.wait(1.0)

    beating = threading.Thread(target=ghost_heartbeats, daemon=True)
    beating.start()
    internal.post("/workers/heartbeat", json=ghost).raise_for_status()
    run_id = panel.start(config_id)
    try:
        wait_for(lambda: "a-ghost" in _dispatches(run_id), "the dispatch to the ghost", logs=panel.logs)
    finally:
        dispatched_to_ghost.set()  # it dies now: no claim, no more heartbeats
        beating.join(timeout=15)
    done = panel.wait(run_id, FINISHED)
    assert done["status"] == "succeeded" and done["worker_id"] == real, done["status_reason"]
    events = _status_events(run_id)
    assert _dispatches(run_id) == ["a-ghost", real]
    assert any("went offline before claiming it" in e.get("redispatch", "") for e in events)
    assert sum(e.get("status") == "starting" for e in events) == 1  # claimed once
    internal.close()


def _status_events(run_id: int) -> list[dict]:
    with Session(get_engine()) as session:
        return [e.data for e in session.exec(select(RunEvent).where(RunEvent.run_id == run_id,
                                                                    RunEvent.kind == "status"))]


def _dispatches(run_id: int) -> list[str]:
    return [e["dispatched_to"] for e in _status_events(run_id) if "dispatched_to" in e]


def test_tuneboard_up_restarts_a_killed_worker_and_the_panel_stays_up(data_dir: Path, tmp_path: Path,
                                                                      tiny_model: Path) -> None:
    """The all-in-one mode: `kill -9` of its embedded worker, as the OOM killer would do it."""
    from tests.live import free_port

    port = free_port()
    env = {"TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": str(data_dir), "TUNEBOARD_WORKER_GPUS": "none",
           "TUNEBOARD_HEARTBEAT_INTERVAL_S": "1", "TUNEBOARD_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
           "TUNEBOARD_MODEL_ROOTS": f'["{tiny_model.parent}"]', "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    _admin_token()
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params={**TINY, "num_train_epochs": 4.0}).id
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)], env=env, cwd=PROJECT_ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        api = httpx.Client(base_url=url, timeout=30, trust_env=False)
        wait_for(lambda: _answers(api), "the panel", 120)
        log_in(api, ADMIN_USERNAME, ADMIN_PASSWORD)
        logs = lambda: (tmp_path / "up.log").read_text(errors="replace")[-4000:]  # noqa: E731
        run_id = api.post("/api/v1/runs", json={"config_id": config_id}).json()["id"]
        wait_for(lambda: [c for c in api.get(f"/api/v1/runs/{run_id}/checkpoints").json() if c["stored"]],
                 "a stored checkpoint", logs=logs)
        [worker] = _celery_children(up.pid)
        killed_at = time.monotonic()
        worker.kill()

        back = wait_for(lambda: [p for p in _celery_children(up.pid) if p.pid != worker.pid],
                        "the worker to be started again", 30, logs)
        assert up.poll() is None and api.get("/healthz").status_code == 200
        # Its heartbeat (a new instance) tells the panel the old one died with the run.
        lost = wait_for(lambda: (r := api.get(f"/api/v1/runs/{run_id}").json())["status"] in FINISHED and r,
                        "the run to be lost", 60, logs)
        assert lost["status"] == "lost" and "restarted" in lost["status_reason"], lost["status_reason"]
        online_again = time.monotonic() - killed_at
        assert back
        assert api.post(f"/api/v1/runs/{run_id}/resume").status_code == 200
        done = wait_for(lambda: (r := api.get(f"/api/v1/runs/{run_id}").json())["status"] in FINISHED and r,
                        "the resumed run", logs=logs)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done["status_reason"] + logs()
        steps = [m["step"] for m in api.get(f"/api/v1/runs/{run_id}/metrics").json() if m["loss"] is not None]
        assert steps == list(range(1, done["total_steps"] + 1))
        print(f"\nworker back and the run declared lost {online_again:.1f}s after the kill")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=40)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


def _celery_children(pid: int) -> list:
    import psutil

    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "celery" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # it just exited
            continue
    return found


def _answers(api: httpx.Client) -> bool:
    try:
        return api.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
