"""Workers for real: Celery workers register through their heartbeat, appear on the Workers page
within seconds, carry their doctor report, and turn grey when they die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT_ROOT
from tests.live import live_panel  # noqa: F401  (the fixture)

REDIS_URL = "redis://127.0.0.1:6379/10"
FAST_HEARTBEAT = {"TUNEBOARD_HEARTBEAT_INTERVAL_S": "1", "TUNEBOARD_HEARTBEAT_TIMEOUT_S": "4"}


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _worker(panel, prefix: str) -> dict | None:
    return next((w for w in panel.api.get("/api/v1/workers").json() if w["id"].startswith(prefix)), None)


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"env": FAST_HEARTBEAT}], indirect=True)
def test_the_embedded_worker_shows_its_cpu_only_doctor_report(live_panel) -> None:
    worker = _wait_for(lambda: (w := _worker(live_panel, "worker@")) and w["doctor"] and w,
                       240, "the embedded worker's doctor report")
    assert worker["online"] and worker["gpus"] == []
    assert sorted(worker["queues"]) == ["default", f"worker.{worker['id']}"]  # the default and its own
    assert (worker["cpu_train_slots"], worker["serve_slots"], worker["advertise_host"]) == (1, 1, "127.0.0.1")
    checks = {check["name"]: check for check in worker["doctor"]["checks"]}
    assert checks["gpus"]["status"] == "warning" and "CPU only" in checks["gpus"]["detail"]
    assert checks["training env"]["status"] == "ok" and "llamafactory 0.9.5" in checks["training env"]["detail"]
    assert checks["serving env"]["status"] == "ok" and "vLLM" in checks["serving env"]["detail"]
    page = live_panel.api.get("/workers").text
    assert worker["id"] in page and "CPU-only" in page and "no NVIDIA GPU found" in page


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"broker_url": REDIS_URL, "worker": False, "env": FAST_HEARTBEAT}],
                         indirect=True)
def test_a_remote_worker_appears_within_seconds_and_greys_out_when_killed(live_panel) -> None:
    env = {**live_panel.env, "TUNEBOARD_BROKER_URL": "redis://unused:1/0"}  # --broker must win
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--broker", REDIS_URL, "--gpus", "none",
         "--serve-slots", "0", "--name", "remote@gpubox"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        online = _wait_for(lambda: (w := _worker(live_panel, "remote@")) and w["online"] and w, 20,
                           "the remote worker to check in within seconds")
        assert online["queues"] == ["default", "worker.remote@gpubox"] and online["hostname"]
        assert (online["cpu_train_slots"], online["serve_slots"]) == (1, 0)
        assert 'data-worker="remote@gpubox"' in live_panel.api.get("/workers").text
        os.killpg(worker.pid, signal.SIGKILL)  # no goodbye: it just goes silent
        worker.wait()
        killed = time.monotonic()
        offline = _wait_for(lambda: (w := _worker(live_panel, "remote@")) and not w["online"] and w, 30,
                            "the killed worker to go offline")
        assert offline["stopped_at"] is None  # silent, not a clean stop
        print(f"\noffline {time.monotonic() - killed:.1f} s after the kill (heartbeat timeout 4 s)")
        page = live_panel.api.get("/workers").text
        assert 'worker-card offline" data-worker="remote@gpubox"' in page
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
