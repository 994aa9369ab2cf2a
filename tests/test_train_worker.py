"""The training worker end to end: the real app (uvicorn), a real Celery worker (Redis, and the
embedded SQLite transport), real `llamafactory-cli train` on the tiny model.

Each test trains for real, so the configs are tiny (cutoff 128, ~40 rows, logging every step)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import Run, RunMetric
from app.settings import Settings
from tests.factories import run_config_factory
from tests.live import LivePanel, live_panel, run_of, start_run  # noqa: F401  (the fixture)
from app.wire import TRAIN_TASK, CheckpointReport, worker_queue
from workers.celery_app import make_celery
from workers.training import list_checkpoints, render_train_yaml

REDIS_URL = "redis://127.0.0.1:6379/12"  # this file's own database, flushed per test
HEARTBEAT_TIMEOUT_S = 6.0
PANEL_ENV = {"TUNEBOARD_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "TUNEBOARD_CANCEL_GRACE_S": "60"}
ON_REDIS = {"broker_url": REDIS_URL, "env": PANEL_ENV}
EMBEDDED = {"broker_url": None, "env": PANEL_ENV}
on_redis = pytest.mark.parametrize("live_panel", [ON_REDIS], indirect=True, ids=["redis"])
# The machine may be busy (2 cores shared with other suites): generous waits, tight assertions.
TRAINING_TIMEOUT_S = 300.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}
# ~9 optimizer steps per epoch: 40 rows, 10 % held out for eval, batch 4.
TINY = {"val_size": 0.1, "save_steps": 3, "eval_steps": 3, "num_train_epochs": 1.0,
        "include_num_input_tokens_seen": True}


@dataclass
class Panel:
    """The runs-app helper's live panel (tests/live.py) plus what these tests ask of it."""

    live: LivePanel
    session: Session
    tiny_model: Path

    @property
    def api(self) -> httpx.Client:
        return self.live.api

    @property
    def data_dir(self) -> Path:
        return self.live.data_dir

    @property
    def worker(self) -> subprocess.Popen:
        return self.live.processes["worker"]

    @property
    def worker_log(self) -> Path:
        return self.live.log_dir / "worker.log"

    def config(self, **params: Any) -> int:
        return run_config_factory(self.session, str(self.tiny_model), rows=40, params={**TINY, **params}).id

    def start(self, config_id: int) -> int:
        return start_run(self.api, config_id)

    def run(self, run_id: int) -> dict[str, Any]:
        return run_of(self.api, run_id)

    def wait(self, run_id: int, statuses: set[str], timeout_s: float = TRAINING_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (run := self.run(run_id))["status"] not in statuses:
            assert time.monotonic() < deadline, f"run stayed {run['status']}: {run['status_reason']}\n{self.log()}"
            time.sleep(0.1)
        return run

    def wait_for(self, condition, what: str, timeout_s: float = TRAINING_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (result := condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.log()}"
            time.sleep(0.1)
        return result

    def metrics(self, run_id: int) -> list[dict[str, Any]]:
        return self.api.get(f"/api/v1/runs/{run_id}/metrics").raise_for_status().json()

    def cancel(self, run_id: int) -> None:
        self.api.post(f"/api/v1/runs/{run_id}/cancel").raise_for_status()

    def run_dir(self, run_id: int) -> Path:
        return self.data_dir / "runs" / str(run_id)

    def log(self) -> str:
        return self.live.log("worker")

    def timings(self, run_id: int) -> str:
        return "; ".join(re.findall(rf"run {run_id} attempt \d+: .*timings: .*", self.worker_log.read_text()))


def trainer_processes(data_dir: Path) -> list[psutil.Process]:
    """llamafactory-cli (and its guard) processes working in this test's data dir."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if process.info["cwd"] and process.info["cwd"].startswith(str(data_dir)) and \
                    any("llamafactory-cli" in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def panel(live_panel: LivePanel, tiny_model: Path) -> Iterator[Panel]:
    with Session(get_engine()) as session:
        yield Panel(live_panel, session, tiny_model)
    if "worker" in live_panel.processes:
        live_panel.stop("worker")
    leftovers = trainer_processes(live_panel.data_dir)
    for process in leftovers:
        process.kill()
    assert not leftovers, "a trainer outlived its worker"


def test_the_train_yaml_gets_this_workers_paths(tmp_path: Path) -> None:
    text = "model_name_or_path: /m\noutput_dir: {OUTPUT_DIR}\ndataset_dir: '{DATASET_DIR}'\nlr: 1.0e-4\n"
    config = render_train_yaml(text, output_dir=tmp_path / "a: b #c", dataset_dir=tmp_path)
    assert config == {"model_name_or_path": "/m", "output_dir": str(tmp_path / "a: b #c"),
                      "dataset_dir": str(tmp_path), "lr": 1.0e-4}


def test_checkpoints_are_complete_once_their_trainer_state_is_written(tmp_path: Path) -> None:
    for step, complete in ((10, True), (2, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert list_checkpoints(tmp_path) == [
        CheckpointReport(name="checkpoint-2", step=2, complete=True),
        CheckpointReport(name="checkpoint-10", step=10, complete=True),
        CheckpointReport(name="checkpoint-12", step=12, complete=False),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [ON_REDIS, EMBEDDED], indirect=True, ids=["redis", "embedded"])
def test_a_run_trains_to_success_with_its_metrics_logs_and_artifacts(panel: Panel) -> None:
    run_id = panel.start(panel.config())
    run = panel.wait(run_id, FINISHED)
    assert run["status"] == "succeeded", run["status_reason"]
    assert run["exit_code"] == 0 and run["percentage"] == 100
    metrics = panel.metrics(run_id)
    steps = [point["step"] for point in metrics if point["loss"] is not None]
    assert steps == list(range(1, run["total_steps"] + 1))
    assert any(point["eval_loss"] is not None for point in metrics)
    assert all(point["tokens_per_s"] and point["elapsed_s"] is not None for point in metrics if point["loss"])
    logs = panel.api.get(f"/api/v1/runs/{run_id}/logs").json()
    assert {line["source"] for line in logs} == {"stdout"}  # running_log.txt repeats stdout's lines
    assert {"all_results.json", "training_loss.png", "trainer_log.jsonl"} <= set(
        panel.api.get(f"/api/v1/runs/{run_id}/artifacts").json()
    )
    assert run["results"]["epoch"] == 1.0
    assert [c["complete"] for c in run["checkpoints"]] == [True] * len(run["checkpoints"]) != []
    # The adapter and every checkpoint travelled to the panel's artifact store.
    assert run["has_adapter"] is True
    stored = panel.api.get(f"/api/v1/runs/{run_id}/checkpoints").json()
    assert [c["name"] for c in stored if c["stored"]] == [c["name"] for c in run["checkpoints"]]
    download = panel.api.get(f"/api/v1/runs/{run_id}/download")
    assert download.status_code == 200 and b"adapter_model.safetensors" in download.content
    assert set(run["lineage"]["versions"]) == {"llamafactory", "transformers", "peft", "torch"}
    assert run["lineage"]["versions"]["llamafactory"] == "0.9.5"
    print(f"\n[{panel.live.env.get('TUNEBOARD_BROKER_URL', 'embedded')}] {panel.timings(run_id)}")


@pytest.mark.slow
@on_redis
def test_cancel_mid_run_saves_the_adapter(panel: Panel) -> None:
    run_id = panel.start(panel.config(num_train_epochs=6.0))
    panel.wait_for(lambda: panel.metrics(run_id), "the first metric point")
    panel.cancel(run_id)
    run = panel.wait(run_id, FINISHED)
    assert run["status"] == "cancelled" and run["exit_code"] == 0, run["status_reason"]
    assert run["current_step"] < run["total_steps"]
    assert (panel.run_dir(run_id) / "output" / "adapter_model.safetensors").is_file()
    assert run["has_adapter"] is True
    print(f"\n{panel.timings(run_id)}")


@pytest.mark.slow
@on_redis
def test_cancel_while_the_model_loads(panel: Panel) -> None:
    run_id = panel.start(panel.config())
    panel.wait(run_id, {"running"})  # the process has just started: LLaMA-Factory is importing
    panel.cancel(run_id)
    run = panel.wait(run_id, FINISHED)
    assert run["status"] == "cancelled", run["status_reason"]
    assert run["exit_code"] in (134, 0)  # killed by SIGABRT before LLaMA-Factory's handler, or saved
    assert not panel.metrics(run_id) or run["exit_code"] == 0
    print(f"\nexit {run['exit_code']}; {panel.timings(run_id)}")


@pytest.mark.slow
@on_redis
def test_resume_continues_from_the_checkpoint_and_reports_the_later_steps_again(panel: Panel) -> None:
    run_id = panel.start(panel.config(num_train_epochs=4.0, save_steps=2))
    output = panel.run_dir(run_id) / "output"
    panel.wait_for(lambda: (output / "checkpoint-4" / "trainer_state.json").is_file(), "checkpoint-4")
    panel.cancel(run_id)
    first = panel.wait(run_id, FINISHED)
    assert first["status"] == "cancelled"
    last_checkpoint = max(c["step"] for c in first["checkpoints"] if c["complete"])

    response = panel.api.post(f"/api/v1/runs/{run_id}/resume")
    assert response.status_code == 200, response.text
    resumed = panel.wait(run_id, FINISHED)
    assert resumed["status"] == "succeeded" and resumed["attempt"] == 2, resumed["status_reason"]
    assert f"resume_from_checkpoint: {output}/checkpoint-{last_checkpoint}" in (
        panel.run_dir(run_id) / "train.yaml").read_text()
    panel.session.expire_all()
    points = panel.session.exec(select(RunMetric).where(RunMetric.run_id == run_id)).all()
    by_step = {point.step: point for point in points}
    assert sorted(step for step, point in by_step.items() if point.loss is not None) == \
        list(range(1, resumed["total_steps"] + 1))
    # The steps after the checkpoint were trained (and reported) again by attempt 2; the ones
    # before it are attempt 1's.
    assert all(by_step[step].attempt == 2 for step in range(last_checkpoint + 1, resumed["total_steps"] + 1))
    assert all(by_step[step].attempt == 1 for step in range(1, last_checkpoint + 1))


@pytest.mark.slow
@on_redis
def test_a_task_delivered_twice_starts_one_process(panel: Panel) -> None:
    run_id = panel.start(panel.config())
    dispatched = panel.wait_for(lambda: panel.run(run_id)["dispatched_worker_id"], "the dispatch")
    panel.session.expire_all()
    dispatch_id = panel.session.get(Run, run_id).dispatch_id
    # The same message again, as Redis redelivers it after visibility_timeout.
    sender = make_celery(Settings(broker_url=REDIS_URL, data_dir=panel.data_dir))
    task = {"run_id": run_id, "attempt": 1, "dispatch_id": dispatch_id, "gpu_ids": []}
    sender.send_task(TRAIN_TASK, kwargs={"task": task}, queue=worker_queue(dispatched))
    run = panel.wait(run_id, FINISHED)
    assert run["status"] == "succeeded", run["status_reason"]
    log = panel.worker_log.read_text()
    assert log.count(f"run {run_id} attempt 1: started") == 1
    panel.wait_for(lambda: f"run {run_id} attempt 1 not claimed" in panel.worker_log.read_text(),
                   "the second delivery", timeout_s=30)


@pytest.mark.slow
@on_redis
def test_a_killed_worker_leaves_no_trainer_and_its_run_is_lost(panel: Panel) -> None:
    run_id = panel.start(panel.config(num_train_epochs=6.0))
    panel.wait_for(lambda: panel.metrics(run_id), "the first metric point")
    assert trainer_processes(panel.data_dir)
    killed_at = time.monotonic()
    os.kill(panel.worker.pid, signal.SIGKILL)
    panel.wait_for(lambda: not trainer_processes(panel.data_dir), "the trainer to die with its worker", timeout_s=5)
    run = panel.wait(run_id, {"lost"}, timeout_s=HEARTBEAT_TIMEOUT_S + 10)
    assert "silent" in run["status_reason"]
    print(f"\nlost after {time.monotonic() - killed_at:.1f}s (timeout {HEARTBEAT_TIMEOUT_S}s)")


@pytest.mark.slow
@on_redis
def test_a_worker_shutdown_stops_its_trainer_and_reports_the_run_cancelled(panel: Panel) -> None:
    run_id = panel.start(panel.config(num_train_epochs=6.0))
    panel.wait_for(lambda: panel.metrics(run_id), "the first metric point")
    stopped_at = time.monotonic()
    panel.worker.send_signal(signal.SIGTERM)  # what `tuneboard up` sends on Ctrl-C
    assert panel.worker.wait(timeout=30) == 0
    run = panel.run(run_id)
    assert run["status"] == "cancelled" and run["status_reason"] == "worker shut down"
    assert not trainer_processes(panel.data_dir)
    print(f"\nworker stopped in {time.monotonic() - stopped_at:.1f}s")
