"""The panel's scheduler at scale, and submit → claim latency with real workers.

1. A scheduling pass with 100 simulated workers (heartbeats only: 4 GPUs and one CPU slot each,
   all holding the model) and 1,000 queued runs: the panel CPU time of the pass that dispatches
   what fits (tasks really published to Redis), and of the next pass, which only explains why
   the rest waits. Target: < 1 s of panel CPU for the whole pass.
2. Submit → claim with 1 and with 10 real Celery workers (Redis broker, uvicorn panel): the time
   from POST /api/v1/runs until the worker's claim is recorded, over sequential submissions. The
   workers' training command is `true`, so nothing trains: this measures the panel, the broker
   and the worker's start of the task.

    .venv/bin/python bench/bench_scheduler.py [--runs 1000 --workers 100] [--submissions 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from app.db import get_engine, migrate  # noqa: E402
from app.settings import get_settings  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/13"
TIMEOUT_S = 120.0


def scheduling_pass(workers: int, runs: int) -> None:
    from app.models import ModelEntry, Run
    from app.services import runs as run_service
    from app.services import scheduler
    from app.services.workers import record_heartbeat
    from app.wire import GpuInfo, Heartbeat
    from tests.factories import run_config_factory

    with tempfile.TemporaryDirectory() as root:
        os.environ.update({"TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": f"{root}/data",
                           "TUNEBOARD_BROKER_URL": REDIS_URL})
        get_settings.cache_clear()
        get_engine.cache_clear()
        redis.Redis.from_url(REDIS_URL).flushdb()
        migrate()
        with Session(get_engine()) as session:
            config = run_config_factory(session, "/models/bench")
            model = session.get(ModelEntry, config.model_id)
            model.fingerprint = "b" * 64
            session.add(model)
            session.commit()
            heartbeats = [Heartbeat(
                worker_id=f"sim-{index:03d}", hostname=f"sim-{index:03d}", instance_id="1", cpu_train_slots=1,
                gpus=[GpuInfo(index=g, name="H200") for g in range(4)], models={model.path: model.fingerprint},
            ) for index in range(workers)]
            for heartbeat in heartbeats:
                record_heartbeat(session, heartbeat)
            for index in range(runs):  # a mix of sizes, as a shared cluster queues them
                run_service.start_run(session, config.id, gpus=(0, 1, 1, 2, 4)[index % 5])
            for heartbeat in heartbeats:  # seeding took a while: every worker is online now
                record_heartbeat(session, heartbeat)
            timings = []
            for label in ("dispatching pass", "explaining pass"):
                cpu, wall = time.process_time(), time.perf_counter()
                dispatched = scheduler.schedule(session)
                timings.append((label, time.process_time() - cpu, time.perf_counter() - wall, dispatched))
            waiting = len(session.exec(select(Run.id).where(Run.status == "queued", Run.dispatch_id.is_(None))).all())
    print(f"scheduling: {workers} workers (4 GPUs + 1 CPU slot each), {runs} queued runs")
    for label, cpu, wall, dispatched in timings:
        print(f"  {label:17} panel CPU {cpu:6.3f} s  wall {wall:6.3f} s  dispatched {dispatched:4d}"
              f"  ({cpu / 1.0:.2f}x of the 1 s target)")
    print(f"  left waiting with a reason: {waiting}")


def claim_latency(worker_counts: list[int], submissions: int) -> None:
    from tests.factories import run_config_factory
    from tests.live import standalone_panel

    results = {}
    for count in worker_counts:
        with tempfile.TemporaryDirectory() as root:
            env = {"TUNEBOARD_LLAMAFACTORY_CLI": "/bin/true", "TUNEBOARD_HEARTBEAT_INTERVAL_S": "1"}
            with standalone_panel(Path(root), broker_url=REDIS_URL, worker=False, env=env) as panel:
                model_dir = Path(root) / "models" / "bench"
                model_dir.mkdir(parents=True)
                (model_dir / "config.json").write_text('{"model_type": "qwen2"}')
                (model_dir / "model.safetensors").write_bytes(b"\0" * 16)
                with Session(get_engine()) as session:
                    config_id = run_config_factory(session, str(model_dir)).id
                for index in range(count):
                    panel.start_worker(f"w{index}")
                deadline = time.monotonic() + TIMEOUT_S
                # Online, holding the model, and past their start-up doctor run (it loads both envs).
                while sum(w["online"] and bool(w["models"]) and bool(w["doctor"])
                          for w in panel.api.get("/api/v1/workers").json()) < count:
                    assert time.monotonic() < deadline, panel.log("w0")
                    time.sleep(0.2)
                latencies = []
                for _ in range(submissions):
                    sent = time.time()
                    run_id = panel.api.post("/api/v1/runs", json={"config_id": config_id}).json()["id"]
                    while not (run := panel.api.get(f"/api/v1/runs/{run_id}").json())["started_at"]:
                        assert time.monotonic() < deadline + TIMEOUT_S, panel.log("w0")
                        time.sleep(0.005)
                    latencies.append(datetime.fromisoformat(run["started_at"]).timestamp() - sent)
                    while panel.api.get(f"/api/v1/runs/{run_id}").json()["status"] in ("queued", "starting", "running"):
                        time.sleep(0.02)
                results[count] = latencies
    print(f"submit → claim over {submissions} sequential submissions ({socket.gethostname()}):")
    for count, latencies in results.items():
        ordered = sorted(latencies)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        print(f"  {count:3d} worker(s): p50 {statistics.median(latencies) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms")
    if len(results) == 2:
        one, many = (statistics.median(results[c]) for c in worker_counts)
        print(f"  ratio p50 {worker_counts[1]} workers / 1 worker: {many / one:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--submissions", type=int, default=20)
    args = parser.parse_args()
    scheduling_pass(args.workers, args.runs)
    claim_latency([1, 10], args.submissions)


if __name__ == "__main__":
    main()
