"""Deployments without a server process: preflight, the state machine, the worker channel and the
pages. (The real vLLM / LLaMA-Factory servers are in test_deploy_serving.py.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.models.deployment import Deployment, InferenceServer
from app.services.deployments import preflight_adapter, read_safetensors_header
from app.settings import get_settings
from tests.factories import finished_run_factory

INTERNAL = "/internal/v1"


def write_adapter(
    folder: Path, base_model: str, *, rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"),
    modules_to_save: list[str] | None = None, extra_tensors: tuple[str, ...] = (),
) -> Path:
    """A LoRA adapter folder as peft writes it: adapter_config.json and a safetensors file
    (zero weights: only the names and shapes matter to the preflight)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": list(modules),
              "base_model_name_or_path": base_model, "modules_to_save": modules_to_save}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    names = [f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight" for m in modules for ab in "AB"]
    for name in [*names, *extra_tensors]:
        size = rank * 128 * 4
        header[name] = {"dtype": "F32", "shape": [rank, 128], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return folder


@pytest.fixture
def base_model(tmp_path: Path) -> str:
    path = tmp_path / "models" / "tiny-base"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.fixture
def adapter_run(session: Session, tmp_path: Path, base_model: str):
    out = write_adapter(tmp_path / "run-out", base_model)
    return finished_run_factory(session, str(out), base_model)


def deploy(client: TestClient, run_id: int, **extra) -> dict:
    response = client.post("/api/v1/deployments", json={"run_id": run_id, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# ----------------------------------------------------------------------------- preflight


def test_preflight_reads_rank_and_modules(tmp_path: Path, base_model: str):
    adapter = write_adapter(tmp_path / "a", base_model, rank=16, modules=("q_proj", "k_proj", "down_proj"))
    info = preflight_adapter(adapter, base_model, backend="vllm", max_lora_rank=64)
    assert info.rank == 16
    assert info.target_modules == ["down_proj", "k_proj", "q_proj"]
    assert len(read_safetensors_header(adapter / "adapter_model.safetensors")) == 6


@pytest.mark.parametrize(
    ("adapter_kwargs", "message"),
    [
        ({"rank": 128}, "rank is 128, above the server's limit of 64"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"extra_tensors": ("base_model.model.model.embed_tokens.weight",)}, "resized embeddings"),
        ({"modules": ("q_proj", "mystery_proj")}, "no LoRA on mystery_proj"),
    ],
)
def test_deploy_refuses_an_adapter_vllm_cannot_serve(client, session, tmp_path, base_model, adapter_kwargs, message):
    out = write_adapter(tmp_path / "bad", base_model, **adapter_kwargs)
    run = finished_run_factory(session, str(out), base_model)
    response = client.post("/api/v1/deployments", json={"run_id": run.id})
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert session.exec(select(InferenceServer)).first() is None  # nothing started


def test_deploy_refuses_an_adapter_of_another_base_model(client, session, tmp_path, base_model):
    out = write_adapter(tmp_path / "other", "/models/some-other-model")
    run = finished_run_factory(session, str(out), base_model)
    response = client.post("/api/v1/deployments", json={"run_id": run.id})
    assert response.status_code == 400
    assert "trained on /models/some-other-model" in response.json()["detail"]


def test_the_llamafactory_backend_accepts_what_vllm_refuses(client, session, tmp_path, base_model):
    out = write_adapter(tmp_path / "big", base_model, rank=128, modules_to_save=["lm_head"])
    run = finished_run_factory(session, str(out), base_model)
    deployment = deploy(client, run.id, backend="llamafactory")
    assert deployment["server"]["backend"] == "llamafactory"
    assert deployment["lora_rank"] == 128


@pytest.mark.parametrize("status", ["running", "queued"])
def test_deploy_refuses_an_active_run(client, session, adapter_run, status):
    adapter_run.status = status
    session.add(adapter_run)
    session.commit()
    response = client.post("/api/v1/deployments", json={"run_id": adapter_run.id})
    assert response.status_code == 409
    assert f"is {status}: deploy it once it has succeeded" in response.json()["detail"]


def test_deploy_refuses_a_failed_run_but_takes_its_complete_checkpoint(client, session, tmp_path, base_model):
    out = tmp_path / "failed-out"
    write_adapter(out / "checkpoint-2", base_model)
    run = finished_run_factory(session, str(out), base_model, status="failed",
                               checkpoints=[{"name": "checkpoint-2", "step": 2, "complete": True},
                                            {"name": "checkpoint-4", "step": 4, "complete": False}])
    response = client.post("/api/v1/deployments", json={"run_id": run.id})
    assert response.status_code == 409
    assert "failed: it has no final adapter" in response.json()["detail"]
    response = client.post("/api/v1/deployments", json={"run_id": run.id, "checkpoint": "checkpoint-4"})
    assert response.status_code == 400 and "no complete checkpoint 'checkpoint-4'" in response.json()["detail"]
    deployment = deploy(client, run.id, checkpoint="checkpoint-2")
    assert deployment["adapter_path"] == str(out / "checkpoint-2")
    assert deployment["name"] == f"demo-{run.id}-checkpoint-2"


def test_deploy_unknown_run_is_404(client):
    assert client.post("/api/v1/deployments", json={"run_id": 999}).status_code == 404


# --------------------------------------------------------------------- state machine


def test_adapters_of_one_base_share_one_server(client, session, tmp_path, base_model, adapter_run):
    first = deploy(client, adapter_run.id, name="first")
    other = finished_run_factory(session, str(write_adapter(tmp_path / "o", base_model)), base_model, name="other")
    second = deploy(client, other.id, name="second")
    assert first["status"] == second["status"] == "pending"
    assert first["server_id"] == second["server_id"]
    assert first["server"]["base_name"] == "tiny-base"
    # The name is taken while the first is active, on the same server it is a redeploy.
    taken = client.post("/api/v1/deployments", json={"run_id": other.id, "name": "tiny-base"})
    assert taken.status_code == 409 and "name of a served base model" in taken.json()["detail"]


def test_worker_channel_from_claim_to_stop(client, session, adapter_run):
    worker = {"Authorization": f"Bearer {get_settings().worker_token}"}
    deployment = deploy(client, adapter_run.id, name="tiny-chat")
    server_id = deployment["server_id"]

    claim = client.post(f"{INTERNAL}/servers/{server_id}/claim", json={"worker_id": "w1"}, headers=worker)
    assert claim.status_code == 200
    spec = claim.json()
    assert spec["adapters"] == [{"deployment_id": deployment["id"], "lora_name": "tiny-chat",
                                 "path": adapter_run.output_dir}]
    assert spec["max_lora_rank"] == 64 and spec["kv_cache_bytes"] == "64M"
    # A redelivered task claims nothing: no second server.
    again = client.post(f"{INTERNAL}/servers/{server_id}/claim", json={"worker_id": "w2"}, headers=worker)
    assert again.status_code == 409
    assert client.get(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "starting"

    ready = {"status": "ready", "url": "http://127.0.0.1:9", "pid": 4242, "adapters": ["tiny-chat"], "log_tail": "up"}
    for _ in range(2):  # re-sent after a timeout: the same end state
        reply = client.post(f"{INTERNAL}/servers/{server_id}/events", json=ready, headers=worker)
        assert reply.json() == {"stop": False}
    detail = client.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert detail["status"] == "ready" and detail["server"]["status"] == "ready"
    assert detail["server"]["url"] == "http://127.0.0.1:9"

    assert client.delete(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "stopped"
    second = client.delete(f"/api/v1/deployments/{deployment['id']}")
    assert second.status_code == 409 and "already stopped" in second.json()["detail"]
    # Its last adapter is gone: the next heartbeat tells the worker to stop the server.
    assert client.post(f"{INTERNAL}/servers/{server_id}/events", json={"status": None}, headers=worker).json() == {"stop": True}
    client.post(f"{INTERNAL}/servers/{server_id}/events", json={"status": "stopped"}, headers=worker)
    assert session.get(InferenceServer, server_id).status == "stopped"


def test_a_server_that_dies_fails_its_deployments_with_the_log_tail(client, session, adapter_run):
    worker = {"Authorization": f"Bearer {get_settings().worker_token}"}
    deployment = deploy(client, adapter_run.id, name="doomed")
    server_id = deployment["server_id"]
    client.post(f"{INTERNAL}/servers/{server_id}/claim", json={"worker_id": "w1"}, headers=worker)
    client.post(f"{INTERNAL}/servers/{server_id}/events", headers=worker,
                json={"status": "ready", "url": "http://127.0.0.1:9", "adapters": ["doomed"]})
    died = {"status": "failed", "reason": "the server exited with code 137 under a live deployment",
            "log_tail": "INFO ...\nKilled\n"}
    client.post(f"{INTERNAL}/servers/{server_id}/events", json=died, headers=worker)
    detail = client.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert detail["status"] == "failed"
    assert "exited with code 137" in detail["status_reason"]
    page = client.get("/deployments").text
    assert "badge failed" in page and "Killed" in page
    # A later heartbeat of that worker is told to stop; undeploying the failed one cleans up.
    assert client.post(f"{INTERNAL}/servers/{server_id}/events", json={}, headers=worker).status_code == 409
    assert client.delete(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "stopped"


def test_undeploying_before_a_worker_claims_stops_the_server_at_once(client, session, adapter_run):
    deployment = deploy(client, adapter_run.id)
    client.delete(f"/api/v1/deployments/{deployment['id']}")
    assert session.get(InferenceServer, deployment["server_id"]).status == "stopped"
    worker = {"Authorization": f"Bearer {get_settings().worker_token}"}
    claim = client.post(f"{INTERNAL}/servers/{deployment['server_id']}/claim", json={"worker_id": "w"}, headers=worker)
    assert claim.status_code == 409


def test_the_worker_channel_needs_the_worker_token(client, adapter_run):
    deployment = deploy(client, adapter_run.id)
    response = client.post(f"{INTERNAL}/servers/{deployment['server_id']}/claim", json={"worker_id": "w"},
                           headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


# ------------------------------------------------------------------------------- pages


def test_deployments_page_deploys_and_undeploys(client, session, adapter_run):
    page = client.get("/deployments")
    assert page.status_code == 200 and f"#{adapter_run.id} demo" in page.text
    assert f'value="{adapter_run.id}" selected' in client.get(f"/deployments?run_id={adapter_run.id}").text
    response = client.post("/deployments", data={"run_id": adapter_run.id, "name": "from-page", "backend": "vllm"},
                           headers={"HX-Request": "true"})
    assert response.status_code == 200 and "from-page" in response.text and "badge pending" in response.text
    deployment = session.exec(select(Deployment).where(Deployment.name == "from-page")).one()
    table = client.post(f"/deployments/{deployment.id}/undeploy", headers={"HX-Request": "true"})
    assert "badge stopped" in table.text
    again = client.post(f"/deployments/{deployment.id}/undeploy", headers={"HX-Request": "true"})
    assert "already stopped" in again.text


def test_deploy_form_shows_the_error_next_to_the_field(client, session, tmp_path, base_model, adapter_run):
    adapter_run.status = "running"
    session.add(adapter_run)
    session.commit()
    finished_run_factory(session, str(write_adapter(tmp_path / "ok", base_model)), base_model, name="ok")
    response = client.post("/deployments", data={"run_id": adapter_run.id}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert 'class="field-error"' in response.text and "deploy it once it has succeeded" in response.text


def test_empty_states_say_what_to_do(client):
    page = client.get("/deployments").text
    assert "Nothing to deploy yet" in page and "No deployments" in page
    assert "No model is ready" in client.get("/playground").text
