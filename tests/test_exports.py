"""Exports through the API without a worker: what is refused (a clear 4xx, nothing created), the
worker channel from claim to a registered merged model, and the zip download. The merge itself
(real `llamafactory-cli export`, a full disk) is in tests/test_exports_live.py and
tests/test_evaluations_live.py."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from sqlmodel import select

from app.models import ModelEntry, ModelExport, Run
from tests.factories import store_folder
from tests.test_deploy import worker_headers
from tests.test_evaluations import _online, _trained_run, run  # noqa: F401  (the fixture)

INTERNAL = "/internal/v1"


def _exports(session) -> list[ModelExport]:
    return list(session.exec(select(ModelExport)).all())


def test_refusals_change_nothing(client, session, run, trained_adapter, tiny_model):  # noqa: F811
    missing = client.post(f"/api/v1/runs/{run.id}/exports", json={"checkpoint": "checkpoint-6"})
    assert missing.status_code == 404 and "no stored checkpoint 'checkpoint-6'" in missing.json()["detail"]
    failed = _trained_run(session, trained_adapter, tiny_model, status="failed", checkpoints=[], name="noadapter")
    assert client.post(f"/api/v1/runs/{failed.id}/exports", json={}).status_code == 409
    assert client.post("/api/v1/runs/4242/exports", json={}).status_code == 404
    assert client.post(f"/api/v1/runs/{run.id}/exports", json={"export_size": 0}).status_code == 422
    assert _exports(session) == []


def test_a_deleted_checkpoint_cannot_be_exported(client, session, run):  # noqa: F811
    from sqlmodel import delete

    from app.models import RunArtifact

    session.exec(delete(RunArtifact).where(RunArtifact.run_id == run.id, RunArtifact.name == "checkpoint-2"))
    session.commit()
    response = client.post(f"/api/v1/runs/{run.id}/exports", json={"checkpoint": "checkpoint-2"})
    assert response.status_code == 404 and "no stored checkpoint 'checkpoint-2'" in response.json()["detail"]
    assert _exports(session) == []


def test_the_same_export_twice_is_refused_while_it_runs(client, session, run):  # noqa: F811
    first = client.post(f"/api/v1/runs/{run.id}/exports", json={"checkpoint": "checkpoint-4"})
    assert first.status_code == 201, first.text
    again = client.post(f"/api/v1/runs/{run.id}/exports", json={"checkpoint": "checkpoint-4"})
    assert again.status_code == 409 and f"export {first.json()['id']}" in again.json()["detail"]
    other = client.post(f"/api/v1/runs/{run.id}/exports", json={})  # another adapter: fine
    assert other.status_code == 201
    assert len(_exports(session)) == 2
    cancelled = client.post(f"/api/v1/exports/{first.json()['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert client.post(f"/api/v1/runs/{run.id}/exports", json={"checkpoint": "checkpoint-4"}).status_code == 201


def test_claim_upload_finish_registers_the_merged_model(client, session, run, tiny_model, data_dir):  # noqa: F811
    created = client.post(f"/api/v1/runs/{run.id}/exports", json={"export_size": 2}).json()
    assert created["status"] == "queued" and created["model_id"] is None
    _online(client, tiny_model, cpu_slots=1)
    from app.services.scheduler import schedule

    schedule(session)
    export = session.get(ModelExport, created["id"])
    session.refresh(export)
    claimed = client.post(f"{INTERNAL}/exports/{export.id}/claim", headers=worker_headers(),
                          json={"dispatch_id": export.dispatch_id, "worker_id": "w1"})
    assert claimed.status_code == 200, claimed.text
    spec = claimed.json()
    assert (spec["artifact_name"], spec["export_size"], spec["template"]) == (f"export-{export.id}", 2, "qwen")
    assert spec["adapter"]["name"] == "adapter"
    # Claiming the same dispatch again (a redelivered task) does nothing.
    assert client.post(f"{INTERNAL}/exports/{export.id}/claim", headers=worker_headers(),
                       json={"dispatch_id": export.dispatch_id, "worker_id": "w1"}).status_code == 409
    # What the worker uploads: a merged model folder (here the tiny model's own files).
    store_folder(session, run.id, session.get(Run, run.id).attempt, tiny_model, f"export-{export.id}")
    finished = client.post(f"{INTERNAL}/exports/{export.id}/finish", headers=worker_headers(),
                           json={"worker_id": "w1", "outcome": "succeeded", "uploaded": True, "elapsed_s": 3.0})
    assert finished.status_code == 200, finished.text
    done = client.get(f"/api/v1/exports/{export.id}").json()
    assert done["status"] == "succeeded" and done["model_id"] is not None
    model = session.get(ModelEntry, done["model_id"])
    folder = Path(model.path)
    assert folder.is_dir() and folder.is_relative_to(data_dir.parent / "models")
    assert (folder / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert client.get("/api/v1/models").status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/exports/{export.id}/download").content))
    assert "model.safetensors" in archive.namelist() and "config.json" in archive.namelist()
    # The export artifact is not a checkpoint: retention and the checkpoint table leave it alone.
    names = [c["name"] for c in client.get(f"/api/v1/runs/{run.id}/checkpoints").json()]
    assert names == ["checkpoint-2", "checkpoint-4"]


def test_a_failed_export_registers_nothing(client, session, run, tiny_model):  # noqa: F811
    created = client.post(f"/api/v1/runs/{run.id}/exports", json={}).json()
    _online(client, tiny_model, cpu_slots=1)
    from app.services.scheduler import schedule

    schedule(session)
    export = session.get(ModelExport, created["id"])
    session.refresh(export)
    client.post(f"{INTERNAL}/exports/{export.id}/claim", headers=worker_headers(),
                json={"dispatch_id": export.dispatch_id, "worker_id": "w1"})
    # Success claimed without the upload: refused as a failure.
    client.post(f"{INTERNAL}/exports/{export.id}/finish", headers=worker_headers(),
                json={"worker_id": "w1", "outcome": "succeeded", "uploaded": False})
    done = client.get(f"/api/v1/exports/{export.id}").json()
    assert done["status"] == "failed" and "did not upload" in done["status_reason"] and done["model_id"] is None
    assert client.get(f"/api/v1/exports/{export.id}/download").status_code == 409


def test_a_model_served_alone_starts_with_no_adapter(client, session, tiny_model):
    from app.models import ModelEntry as Entry
    from tests.factories import model_factory
    from tests.test_deploy import dispatch

    model = model_factory(session, str(tiny_model), "merged")
    assert client.post("/api/v1/models/4242/serve", json={}).status_code == 404
    assert client.post(f"/api/v1/models/{model.id}/serve", json={"name": "no spaces"}).status_code == 400
    served = client.post(f"/api/v1/models/{model.id}/serve", json={"name": "merged-chat"})
    assert served.status_code == 201 and served.json()["status"] == "pending"
    assert client.post(f"/api/v1/models/{model.id}/serve", json={"name": "merged-chat"}).status_code == 409
    server_id = served.json()["id"]
    dispatch_id = dispatch(client, server_id, "w1")
    claimed = client.post(f"{INTERNAL}/servers/{server_id}/claim", headers=worker_headers(),
                          json={"worker_id": "w1", "dispatch_id": dispatch_id, "instance_id": "i1"})
    assert claimed.status_code == 200, claimed.text
    spec = claimed.json()
    assert spec["adapters"] == [] and spec["base_name"] == "merged-chat" and spec["base_model_path"] == str(tiny_model)
    stopped = client.post(f"/api/v1/model-servers/{server_id}/stop").json()
    assert stopped["status"] in ("starting", "stopped")
    assert session.get(Entry, model.id) is not None


def test_the_preflight_says_when_only_a_merge_lets_vllm_serve_it(tmp_path):
    import json as json_

    from app.services.deployments import preflight_adapter
    from tests.test_deploy import write_adapter

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json_.dumps({"model_type": "qwen2", "vocab_size": 1000}))
    for name, kwargs, words in (
            ("dora", {}, "DoRA"), ("mts", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
            ("vocab", {"extra_tensors": ("base_model.model.model.embed_tokens.weight",)},
             "resizes the vocabulary (embed_tokens has 8 rows, the base model 1000)"),
            ("plain", {}, None)):
        adapter = write_adapter(tmp_path / name, str(base), **kwargs)
        if name == "dora":
            config = json_.loads((adapter / "adapter_config.json").read_text())
            (adapter / "adapter_config.json").write_text(json_.dumps({**config, "use_dora": True}))
        info = preflight_adapter(adapter, str(base), backend="vllm", max_lora_rank=64)
        assert (info.merge_reason is None) if words is None else (words in info.merge_reason), (name, info)
        # LLaMA-Factory's own server loads them as they are.
        assert preflight_adapter(adapter, str(base), backend="llamafactory", max_lora_rank=64).merge_reason is None
