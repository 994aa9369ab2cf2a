"""The automatic micro-batch end to end on the tiny model (CPU): the real app, a real Celery worker,
the real probe (workers/envscripts/batch_probe.py, forced on a CPU run by TUNEBOARD_PROBE_CPU) and real
`llamafactory-cli train`. A first run probes and trains with the split the panel chose from the
probe; a second run of the same config takes it from the panel's cache without probing. And an
out-of-memory exit in the first steps (fault-injected: tests/faults/oom_at_micro.py) makes the
worker train again one size smaller, once, and say so."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlmodel import Session, select

from app.db import get_engine
from app.models import BatchProbe, Run
from app.services import batching
from tests.factories import run_config_factory
from tests.live import LivePanel, live_panel  # noqa: F401  (the fixture)

TIMEOUT_S = 300.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}
# One optimizer step of 4 sequences written as 1 × 4: 40 rows, 20 % held out, 8 steps in one epoch.
STEP_4 = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "num_train_epochs": 1.0,
          "save_steps": 100, "eval_steps": 100, "include_num_input_tokens_seen": True}
FAULT_CLI = str(Path(__file__).parent / "faults" / "oom_at_micro.py")
PROBING_CPU = {"TUNEBOARD_PROBE_CPU": "1", "TUNEBOARD_HEARTBEAT_TIMEOUT_S": "60"}


def wait(panel: LivePanel, run_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while (run := panel.api.get(f"/api/v1/runs/{run_id}").json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"run {run_id} stayed {run['status']}\n{panel.log('worker')}"
        time.sleep(0.2)
    return run


def split_of(panel: LivePanel, run_id: int) -> tuple[int, int]:
    config = yaml.safe_load((panel.data_dir / "runs" / str(run_id) / "train.yaml").read_text())
    return config["per_device_train_batch_size"], config["gradient_accumulation_steps"]


def log_lines(panel: LivePanel, run_id: int) -> list[str]:
    return [line["line"] for line in panel.api.get(f"/api/v1/runs/{run_id}/logs").json()]


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"env": PROBING_CPU}], indirect=True)
def test_the_probe_chooses_the_split_a_run_trains_with_and_the_next_run_takes_it_from_the_cache(
        live_panel: LivePanel, tiny_model: Path) -> None:
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params=STEP_4).id
    first = live_panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]
    run = wait(live_panel, first)
    assert run["status"] == "succeeded", run["status_reason"]
    choice = run["batch_plan"]["choice"]["batch"]
    assert choice["source"] == "probe" and "probed in" in choice["reason"]
    micro, accumulation = choice["per_device_train_batch_size"], choice["gradient_accumulation_steps"]
    assert micro * accumulation == 4  # the sequences per optimizer step are the config's
    assert split_of(live_panel, first) == (micro, accumulation)  # what the trainer read
    steps = [p["step"] for p in live_panel.api.get(f"/api/v1/runs/{first}/metrics").json() if p["loss"] is not None]
    assert steps == list(range(1, 9))  # 32 training rows ÷ 4 per step, whatever the split
    assert any(line.startswith("probe [") and "micro-batch 4:" in line for line in log_lines(live_panel, first))
    [probe] = live_panel.api.get("/api/v1/batch-probes").json()
    assert [m["micro"] for m in probe["measurements"]] == [1, 2, 4] and probe["run_id"] == first
    assert probe["gpu_name"] == "CPU" and probe["probe_s"] > 0
    assert run["batch_plan"]["measured"]["micro"] == micro

    second = live_panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]
    run = wait(live_panel, second)
    assert run["status"] == "succeeded", run["status_reason"]
    choice = run["batch_plan"]["choice"]["batch"]
    assert choice["source"] == "cache" and (choice["per_device_train_batch_size"], choice[
        "gradient_accumulation_steps"]) == (micro, accumulation)
    assert split_of(live_panel, second) == (micro, accumulation)
    assert not (live_panel.data_dir / "runs" / str(second) / "probe-result.json").exists()
    assert not any(line.startswith("probe [") for line in log_lines(live_panel, second))
    assert len(live_panel.api.get("/api/v1/batch-probes").json()) == 1
    # Before it started, the second run was shown an estimate from the first one.
    assert run["batch_plan"]["estimate"]["source"] == f"past run {first}"
    page = live_panel.api.get(f"/runs/{second}").text
    assert f"{micro} × {accumulation}" in page and "(cache)" in page


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"env": {**PROBING_CPU, "TUNEBOARD_LLAMAFACTORY_CLI": FAULT_CLI},
                                         "worker": False}], indirect=True)
def test_an_out_of_memory_exit_in_the_first_steps_trains_again_one_size_smaller(
        live_panel: LivePanel, tiny_model: Path) -> None:
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params=STEP_4).id
    run_id = live_panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]
    # The panel's cache says 4 × 1 is the fastest split of this key (as a probe on a larger device would).
    with Session(get_engine()) as session:
        run = session.get(Run, run_id)
        fields = batching.key_fields(batching.run_args(run.train_yaml), batching.shape_digest(str(tiny_model)), "cpu")
        measured = [{"micro": m, "ok": True, "peak_reserved_mib": 500.0 + m, "peak_allocated_mib": 500.0 + m,
                     "fb_s": 0.1, "opt_s": 0.01} for m in (1, 2, 4)]
        session.add(BatchProbe(key=batching.probe_key(fields), key_fields=fields, gpu_name="CPU", total_mib=16_000.0,
                               base_mib=480.0, seq_len=128, measurements=measured))
        session.commit()
    live_panel.start_worker(env={"FAULT_OOM_AT_MICRO": "4"})  # this worker's trainer cannot fit 4 sequences
    run = wait(live_panel, run_id)
    assert run["status"] == "succeeded", run["status_reason"]
    plan = run["batch_plan"]
    assert plan["fallback"]["failed_micro"] == 4
    assert (plan["fallback"]["micro"], plan["fallback"]["accumulation"]) == (2, 2)
    assert plan["choice"]["batch"]["source"] == "fallback"
    assert split_of(live_panel, run_id) == (2, 2)
    lines = log_lines(live_panel, run_id)
    assert any("torch.OutOfMemoryError: CUDA out of memory" in line for line in lines)
    steps = [p["step"] for p in live_panel.api.get(f"/api/v1/runs/{run_id}/metrics").json() if p["loss"] is not None]
    assert steps == list(range(1, 9))
    assert "ran out of memory after 0 logged step(s): training again at 2 × 2" in live_panel.log("worker", chars=10**7)
    with Session(get_engine()) as session:
        [probe] = session.exec(select(BatchProbe)).all()
        assert {"micro": 4, "ok": False, "error": f"out of memory in run {run_id}"} in probe.measurements
    assert "Out of memory:" in live_panel.api.get(f"/runs/{run_id}").text
