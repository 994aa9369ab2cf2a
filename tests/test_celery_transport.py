"""A Celery task round-trips through both transports: the embedded SQLite one (no server) and Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from app.settings import get_settings
from tests.conftest import PROJECT_ROOT
from workers.celery_app import DEFAULT_QUEUE, make_celery

REDIS_URL = "redis://127.0.0.1:6379/9"


@pytest.mark.slow
@pytest.mark.parametrize("broker_url", [None, REDIS_URL], ids=["embedded", "redis"])
def test_ping_round_trips(data_dir, monkeypatch, broker_url) -> None:
    if broker_url:
        redis.Redis.from_url(broker_url).flushdb()
        monkeypatch.setenv("TUNEBOARD_BROKER_URL", broker_url)
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.uses_embedded_broker is (broker_url is None)
    celery = make_celery(settings)
    env = {**os.environ, "TUNEBOARD_WORKER_GPUS": "none"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", DEFAULT_QUEUE,
         "--pool", "threads", "--concurrency", "1", "--without-gossip", "--without-mingle", "-n", "ping@%h"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        result = celery.send_task("tuneboard.ping", args=["hello"], queue=DEFAULT_QUEUE)
        assert result.get(timeout=120) == "pong:hello"
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    if broker_url is None:
        assert (data_dir / "broker.db").exists()  # the embedded transport's own SQLite file
