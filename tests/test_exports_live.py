"""A full disk during an export: the worker's exports folder is a 300 KB tmpfs of its own (a mount
namespace: `unshare --mount`), `llamafactory-cli export` fails writing the 1.2 MB merged model, the
export fails with the reason, its partial output is removed, and nothing is registered."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import ModelEntry, RunArtifact
from tests.live import LivePanel, _start, live_panel, worker_command  # noqa: F401  (the fixture)
from tests.test_evaluations import _trained_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)
def test_a_full_disk_fails_the_export_and_leaves_nothing_behind(live_panel: LivePanel, trained_adapter: Path,
                                                                 tiny_model: Path):
    panel = live_panel
    with Session(get_engine()) as session:
        run_id = _trained_run(session, trained_adapter, tiny_model).id
        models_before = len(session.exec(select(ModelEntry)).all())
    exports = panel.data_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    command = worker_command(f"worker@{socket.gethostname()}")
    worker = _start(["unshare", "--mount", "sh", "-c",
                     f'mount -t tmpfs -o size=300k tmpfs "{exports}" && exec "$@"', "sh", *command],
                    panel.env, panel.log_dir / "worker.log")
    panel.processes["worker"] = worker
    created = panel.api.post(f"/api/v1/runs/{run_id}/exports", json={})
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 300
    while (export := panel.api.get(f"/api/v1/exports/{created.json()['id']}").json())["status"] not in (
            "succeeded", "failed", "cancelled", "lost"):
        assert time.monotonic() < deadline and worker.poll() is None, panel.log()
        time.sleep(0.5)
    assert export["status"] == "failed", export
    assert "No space left on device" in export["status_reason"], export["status_reason"]
    # Inside the worker's namespace its exports folder (the tmpfs) is empty again.
    listing = subprocess.run(["nsenter", "--mount", "--target", str(worker.pid), "ls", "-A", str(exports)],
                             capture_output=True, text=True, check=True)
    assert listing.stdout.strip() == ""
    with Session(get_engine()) as session:
        assert len(session.exec(select(ModelEntry)).all()) == models_before
        assert not session.exec(select(RunArtifact).where(RunArtifact.name.like("export-%"))).all()
    assert export["model_id"] is None
