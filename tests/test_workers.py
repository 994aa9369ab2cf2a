"""Workers: heartbeats, online/offline, the page, capacity checks and the doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

from app.models import Worker
from app.models.base import utcnow
from app.services.workers import gpu_capacity_problem
from app.settings import get_settings
from workers.gpus import parse_nvidia_smi_csv

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559.0,
        "memory_used_mib": 20480.0, "utilization": 87.0}


def _beat(client, worker_id="gpu@box", **extra):
    payload = {"worker_id": worker_id, "hostname": "box", "queues": ["default", f"worker.{worker_id}"], **extra}
    return client.post(
        "/internal/v1/workers/heartbeat", json=payload,
        headers={"Authorization": f"Bearer {get_settings().worker_token}"},
    )


def test_heartbeat_needs_the_worker_token(client) -> None:
    response = client.post("/internal/v1/workers/heartbeat", json={"worker_id": "x", "hostname": "h"},
                           headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


def test_a_heartbeat_registers_the_worker_and_shows_its_gpus(client) -> None:
    doctor = {"checks": [{"name": "bf16", "status": "warning", "detail": "bf16 unsupported on this GPU",
                          "fix": "the form will default to fp16"}], "facts": {}, "worst": "warning",
              "created_at": utcnow().isoformat()}
    assert _beat(client, gpus=[H100], doctor=doctor).json()["doctor_requested"] is False
    workers = client.get("/api/v1/workers").json()
    assert [(w["id"], w["online"], w["gpus"][0]["name"]) for w in workers] == [
        ("gpu@box", True, "NVIDIA H100 80GB HBM3")]
    page = client.get("/workers").text
    assert "gpu@box" in page and "NVIDIA H100" in page and "bf16 unsupported on this GPU" in page
    assert "badge ready\">online" in page and "width: 87" in page


def test_a_clean_stop_greys_the_worker_and_keeps_it_listed(client) -> None:
    _beat(client)
    _beat(client, offline=True)
    (worker,) = client.get("/api/v1/workers").json()
    assert worker["online"] is False and worker["stopped_at"] is not None
    assert 'worker-card offline' in client.get("/workers").text


def test_a_silent_worker_goes_offline_after_the_timeout(client, session) -> None:
    _beat(client)
    worker = session.get(Worker, "gpu@box")
    worker.last_seen_at = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout_s + 1)
    session.add(worker)
    session.commit()
    assert client.get("/api/v1/workers/gpu@box").json()["online"] is False


def test_a_doctor_request_reaches_the_worker_once(client) -> None:
    _beat(client)
    assert client.post("/api/v1/workers/gpu@box/doctor").status_code == 202
    assert _beat(client).json()["doctor_requested"] is True
    report = {"checks": [], "facts": {}, "worst": "ok", "created_at": utcnow().isoformat()}
    assert _beat(client, doctor=report).json()["doctor_requested"] is False
    assert _beat(client).json()["doctor_requested"] is False
    assert client.post("/api/v1/workers/nobody/doctor").status_code == 404


def test_capacity_checks_name_the_largest_worker(client, session) -> None:
    assert "no online worker has a GPU" in gpu_capacity_problem(session, 1)
    assert gpu_capacity_problem(session, 0) is None
    _beat(client, gpus=[H100])
    assert gpu_capacity_problem(session, 1) is None
    assert gpu_capacity_problem(session, 2) == "asks for 2 GPU(s) but the largest online worker has 1"


def test_empty_workers_page_says_what_to_do(client) -> None:
    assert "tuneboard worker --gpus" in client.get("/workers").text


def test_nvidia_smi_output_is_parsed() -> None:
    output = "0, NVIDIA H100 80GB HBM3, 81559, 4, 0\n1, NVIDIA H100 80GB HBM3, 81559, [N/A], 35\n"
    gpus = parse_nvidia_smi_csv(output)
    assert [(g.index, g.memory_total_mib, g.memory_used_mib, g.utilization) for g in gpus] == [
        (0, 81559.0, 4.0, 0.0), (1, 81559.0, 0.0, 35.0)]


def test_doctor_cli_reports_this_machine(data_dir) -> None:
    """`tuneboard doctor --json`, for real: every check has a status, and a fix when not ok."""
    result = subprocess.run([sys.executable, "-m", "app.cli", "doctor", "--json"],
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == (1 if report["worst"] == "error" else 0)
    checks = {check["name"]: check for check in report["checks"]}
    assert {"os", "python", "gpus", "gcc", "cuda toolkit", "training env", "serving env", "disk"} <= set(checks)
    assert all(check["status"] in ("ok", "warning", "error") for check in checks.values())
    assert all(check["fix"] for check in checks.values() if check["status"] != "ok")
    assert report["facts"]["arch"] and report["facts"]["free_disk_gib"] > 0
    assert report["facts"]["cpu_count"] == os.cpu_count()
    assert "llamafactory" in report["facts"]["training_env"]["packages"]


def test_a_heartbeat_tells_the_worker_what_to_forget(client, session, tmp_path) -> None:
    """Folders of deleted runs, and cached blobs and artifact folders no stored artifact has any more."""
    from app.models import ArtifactFile, RunArtifact
    from tests.factories import run_config_factory
    from workers.artifacts import cached_content, forget_cached

    config = run_config_factory(session)
    run_id = client.post("/api/v1/runs", json={"config_id": config.id}).json()["id"]
    kept_blob, gone_blob, kept_folder, gone_folder = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    artifact = RunArtifact(run_id=run_id, name="adapter", attempt=1, digest=kept_folder, size=1)
    session.add(artifact)
    session.flush()
    session.add(ArtifactFile(artifact_id=artifact.id, path="adapter_model.safetensors", sha256=kept_blob, size=1))
    session.commit()
    reply = _beat(client, local_runs=[run_id, 424242], cached_blobs=[kept_blob, gone_blob],
                  cached_folders=[kept_folder, gone_folder]).json()
    assert (reply["forget_runs"], reply["forget_blobs"], reply["forget_folders"]) == ([424242], [gone_blob], [gone_folder])

    cache = tmp_path / "cache"
    for name in (kept_blob, gone_blob, "not-a-digest"):
        (cache / "blobs").mkdir(parents=True, exist_ok=True)
        (cache / "blobs" / name).write_bytes(b"x")
    for name in (kept_folder, gone_folder):
        (cache / "artifacts" / name).mkdir(parents=True)
    assert cached_content(cache) == ([kept_blob, gone_blob], [kept_folder, gone_folder])
    forget_cached(cache, reply["forget_blobs"] + ["../../etc"], reply["forget_folders"])
    assert cached_content(cache) == ([kept_blob], [kept_folder])
    assert (cache / "blobs" / "not-a-digest").exists()
