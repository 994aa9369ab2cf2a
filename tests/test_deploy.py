"""Deployments without a server process: preflight, the state machine, the worker channel and the
pages. (The real vLLM / LLaMA-Factory servers are in test_deploy_serving.py.)"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.db import get_engine
from app.models.deployment import Deployment, InferenceServer
from app.services import artifacts as artifact_service
from app.services.deployments import preflight_adapter, read_safetensors_header
from app.services.scheduler import schedule, server_wait_reason
from app.settings import get_settings
from app.wire import model_fingerprint
from tests.factories import finished_run_factory, model_factory, store_folder

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


def write_checkpoint(folder: Path, base_model: str, **adapter_kwargs) -> Path:
    """A complete checkpoint-N folder: the adapter, then trainer_state.json (written last)."""
    write_adapter(folder, base_model, **adapter_kwargs)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[-1])}))
    return folder


@pytest.fixture
def base_model(tmp_path: Path) -> str:
    """A model folder with a config and a weights file: enough for its fingerprint (no server
    process reads it here)."""
    path = tmp_path / "models" / "tiny-base"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 128}))
    (path / "model.safetensors").write_bytes(bytes(64))
    return str(path)


@pytest.fixture
def adapter_run(session: Session, tmp_path: Path, base_model: str):
    model_factory(session, base_model)  # registered, so that a worker can say it holds it
    out = write_adapter(tmp_path / "run-out", base_model)
    return finished_run_factory(session, str(out), base_model)


def deploy(client: TestClient, run_id: int, **extra) -> dict:
    response = client.post("/api/v1/deployments", json={"run_id": run_id, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def worker_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().worker_token}"}


def heartbeat(client: TestClient, worker_id: str, models: dict[str, str], serve_slots: int = 1) -> None:
    """A (fake) worker's heartbeat: online, with its serving slots and the model folders it holds."""
    response = client.post(f"{INTERNAL}/workers/heartbeat", headers=worker_headers(), json={
        "worker_id": worker_id, "hostname": "h", "serve_slots": serve_slots, "models": models,
    })
    assert response.status_code == 200, response.text


def dispatch(client: TestClient, server_id: int, worker_id: str = "w1") -> str:
    """What the panel does before any claim: `worker_id` comes online holding the server's base
    model, the scheduler dispatches the pending server to it. Returns the dispatch id."""
    with Session(get_engine()) as db:
        base = db.get(InferenceServer, server_id).base_model_path
    heartbeat(client, worker_id, {base: model_fingerprint(Path(base))})
    with Session(get_engine()) as db:
        schedule(db)  # (or the panel's own pass got there first: the same dispatch)
        server = db.get(InferenceServer, server_id)
        assert server.status == "pending" and server.dispatched_worker_id == worker_id, server
        assert server.dispatch_id
        return server.dispatch_id


def claim(client: TestClient, server_id: int, dispatch_id: str, worker_id: str = "w1", **headers: str):
    return client.post(f"{INTERNAL}/servers/{server_id}/claim", headers=headers or worker_headers(),
                       json={"worker_id": worker_id, "dispatch_id": dispatch_id, "instance_id": "i1"})


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


@pytest.mark.parametrize(
    ("adapter_kwargs", "dora", "words"),
    [
        ({}, True, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, False, "modules_to_save"),
        ({"extra_tensors": ("base_model.model.model.embed_tokens.weight",)}, False, "full weights"),
    ],
)
def test_an_adapter_vllm_cannot_serve_as_a_lora_waits_for_its_merge(client, session, tmp_path, base_model,
                                                                      adapter_kwargs, dora, words):
    model_factory(session, base_model)
    out = write_adapter(tmp_path / "unservable", base_model, **adapter_kwargs)
    if dora:
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    run = finished_run_factory(session, str(out), base_model)
    first = deploy(client, run.id, name="merged-a")
    assert first["served_as"] == "merged" and first["status"] == "pending" and first["server"] is None
    assert words in first["status_reason"] and first["status_reason"].startswith(f"merging (export {first['export_id']})")
    export = client.get(f"/api/v1/exports/{first['export_id']}").json()
    assert export["status"] == "queued" and export["run_id"] == run.id and export["checkpoint"] is None
    # Another deployment of the same adapter waits for the same merge.
    second = deploy(client, run.id, name="merged-b")
    assert second["export_id"] == first["export_id"]
    assert "merging…" in client.get("/deployments").text
    # The merge ends without a model (cancelled here): the deployments waiting for it fail, saying so.
    assert client.post(f"/api/v1/exports/{export['id']}/cancel").json()["status"] == "cancelled"
    for waiting in (first, second):
        ended = client.get(f"/api/v1/deployments/{waiting['id']}").json()
        assert ended["status"] == "failed" and f"the merge (export {export['id']}) cancelled" in ended["status_reason"]
    assert session.exec(select(InferenceServer)).first() is None  # nothing was started


def test_a_merged_export_is_served_alone_under_the_deployment_name(client, session, tmp_path, base_model):
    """The merge succeeded (its model registered): the deployment gets a server of that model alone,
    whose claim carries no adapter and whose readiness is the deployment's."""
    model_factory(session, base_model)
    out = write_adapter(tmp_path / "dora", base_model)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    run = finished_run_factory(session, str(out), base_model)
    deployment = deploy(client, run.id, name="dora-chat")
    merged = tmp_path / "models" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    merged_model = model_factory(session, str(merged), "dora-merged")
    with Session(get_engine()) as db:  # what a succeeded export leaves: its model registered
        from app.models import JobStatus
        from app.services import exports as export_service

        lifecycle = export_service._jobs
        assert lifecycle.transition(db, deployment["export_id"], JobStatus.starting)
        assert lifecycle.transition(db, deployment["export_id"], JobStatus.succeeded,
                                    values={"model_id": merged_model.id})
    served = client.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert served["status"] == "pending" and served["status_reason"].startswith("merged (export")
    server = served["server"]
    assert server["base_model_path"] == str(merged) and server["base_name"] == "dora-chat"
    spec = claim(client, server["id"], dispatch(client, server["id"])).json()
    assert spec["adapters"] == [] and spec["base_name"] == "dora-chat"
    ready = client.post(f"{INTERNAL}/servers/{server['id']}/events", headers=worker_headers(),
                        json={"status": "ready", "url": "http://127.0.0.1:1", "adapters": []})
    assert ready.status_code == 200, ready.text
    assert client.get(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "ready"
    with Session(get_engine()) as db:
        from app.services.deployments import gateway_models

        assert [name for name, _created in gateway_models(db)] == ["dora-chat"]  # listed once


def test_a_full_fine_tune_is_served_as_a_whole_model(client, session, tmp_path, base_model, tiny_model):
    """Its output folder is a whole model (the tiny model's files stand for it here; the live
    test trains one: test_deploy_merged_live.py)."""
    output = tmp_path / "full-out"
    shutil.copytree(tiny_model, output)
    run = finished_run_factory(session, str(output), base_model)
    run.train_yaml = run.train_yaml.replace("finetuning_type: lora", "finetuning_type: full")
    session.add(run)
    session.commit()
    deployment = deploy(client, run.id, name="full-chat")
    assert deployment["served_as"] == "model" and deployment["export_id"] is None
    server = deployment["server"]
    assert server["base_name"] == "full-chat" and server["base_model_path"] != base_model
    folder = Path(server["base_model_path"])
    assert (folder / "model.safetensors").is_file() and folder.is_relative_to(get_settings().model_roots[0])
    spec = claim(client, server["id"], dispatch(client, server["id"])).json()
    assert spec["adapters"] == [] and spec["base_model_path"] == str(folder)


def test_a_reward_model_is_not_deployed_for_chat(client, session, adapter_run):
    adapter_run.train_yaml = adapter_run.train_yaml + "stage: rm\n"
    session.add(adapter_run)
    session.commit()
    response = client.post("/api/v1/deployments", json={"run_id": adapter_run.id})
    assert response.status_code == 409
    assert response.json() == {"detail": response.json()["detail"], "field": "run_id"}
    assert "reward model (stage: rm)" in response.json()["detail"] and "chat" in response.json()["detail"]
    assert session.exec(select(InferenceServer)).first() is None


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
    write_checkpoint(out / "checkpoint-2", base_model)
    run = finished_run_factory(session, str(out), base_model, status="failed",
                               checkpoints=[{"name": "checkpoint-2", "step": 2, "complete": True},
                                            {"name": "checkpoint-4", "step": 4, "complete": False}])
    response = client.post("/api/v1/deployments", json={"run_id": run.id})
    assert response.status_code == 409
    assert "failed without a stored final adapter" in response.json()["detail"]
    # An incomplete checkpoint is never stored: it cannot be deployed.
    response = client.post("/api/v1/deployments", json={"run_id": run.id, "checkpoint": "checkpoint-4"})
    assert response.status_code == 400 and "no stored checkpoint 'checkpoint-4'" in response.json()["detail"]
    deployment = deploy(client, run.id, checkpoint="checkpoint-2")
    assert deployment["artifact_digest"] == artifact_service.get_manifest(session, run.id, "checkpoint-2").digest
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


def test_a_pending_server_waits_for_a_worker_that_holds_its_base_model(client, session, adapter_run, base_model):
    deployment = deploy(client, adapter_run.id)
    server_id = deployment["server_id"]
    heartbeat(client, "w-empty", {})  # holds no model
    heartbeat(client, "w-other", {base_model: "0" * 64})  # another model in a folder of that name
    with Session(get_engine()) as db:
        assert schedule(db) == 0
        assert db.get(InferenceServer, server_id).dispatch_id is None
    assert "no online worker holds model tiny-base" in server_wait_reason(server_id)
    heartbeat(client, "w-full", {base_model: model_fingerprint(Path(base_model))}, serve_slots=0)
    with Session(get_engine()) as db:
        assert schedule(db) == 0
    assert "serving slots are 0" in server_wait_reason(server_id)
    dispatch_id = dispatch(client, server_id, "w1")
    # Only the worker it went to may claim it, and only under that dispatch.
    assert claim(client, server_id, dispatch_id, "w-full").status_code == 409
    assert claim(client, server_id, "another-dispatch", "w1").status_code == 409
    assert claim(client, server_id, dispatch_id, "w1").status_code == 200


def test_worker_channel_from_claim_to_stop(client, session, adapter_run):
    worker = worker_headers()
    deployment = deploy(client, adapter_run.id, name="tiny-chat")
    server_id = deployment["server_id"]
    dispatch_id = dispatch(client, server_id, "w1")

    response = claim(client, server_id, dispatch_id, "w1")
    assert response.status_code == 200
    spec = response.json()
    manifest = artifact_service.get_manifest(session, adapter_run.id, "adapter")
    assert deployment["artifact_digest"] == manifest.digest
    assert spec["adapters"] == [{"deployment_id": deployment["id"], "lora_name": "tiny-chat",
                                 "run_id": adapter_run.id, "manifest": manifest.model_dump()}]
    assert spec["max_lora_rank"] == 64 and spec["kv_cache_bytes"] == "64M"
    # The server's secret goes to the worker that runs it, never out of the public API.
    assert spec["api_key"] and spec["api_key"] == session.get(InferenceServer, server_id).api_key
    assert "api_key" not in client.get(f"/api/v1/deployments/{deployment['id']}").json()["server"]
    # A redelivered task claims nothing: no second server.
    for worker_id in ("w1", "w2"):
        assert claim(client, server_id, dispatch_id, worker_id).status_code == 409
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
    worker = worker_headers()
    deployment = deploy(client, adapter_run.id, name="doomed")
    server_id = deployment["server_id"]
    assert claim(client, server_id, dispatch(client, server_id)).status_code == 200
    ready = client.post(f"{INTERNAL}/servers/{server_id}/events", headers=worker,
                        json={"status": "ready", "url": "http://127.0.0.1:9", "adapters": ["doomed"]})
    assert ready.json() == {"stop": False}
    assert client.get(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "ready"
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
    dispatch_id = dispatch(client, deployment["server_id"], "w")  # its task is on the way to w
    client.delete(f"/api/v1/deployments/{deployment['id']}")
    assert session.get(InferenceServer, deployment["server_id"]).status == "stopped"
    assert claim(client, deployment["server_id"], dispatch_id, "w").status_code == 409


@pytest.fixture
def replaced_checkpoint_deployment(client, session, tmp_path, base_model) -> dict:
    """A deployed checkpoint-2 of a failed run, whose stored checkpoint-2 was then replaced by
    another folder (as a resumed attempt saves it anew)."""
    model_factory(session, base_model)
    out = tmp_path / "failed-out"
    write_checkpoint(out / "checkpoint-2", base_model)
    run = finished_run_factory(session, str(out), base_model, status="failed",
                               checkpoints=[{"name": "checkpoint-2", "step": 2, "complete": True}])
    deployment = deploy(client, run.id, checkpoint="checkpoint-2", name="stale")
    write_checkpoint(out / "checkpoint-2", base_model, rank=4)
    store_folder(session, run.id, run.attempt, out / "checkpoint-2", "checkpoint-2", 2)
    return deployment


def test_a_claim_serves_the_deployed_folder_not_one_stored_under_its_name_since(
    client, session, tmp_path, base_model, replaced_checkpoint_deployment,
):
    stale = replaced_checkpoint_deployment
    good_run = finished_run_factory(session, str(write_adapter(tmp_path / "good", base_model)), base_model,
                                    name="good")
    good = deploy(client, good_run.id, name="good")
    server_id = good["server_id"]
    assert stale["server_id"] == server_id
    response = claim(client, server_id, dispatch(client, server_id))
    assert response.status_code == 200
    assert [a["lora_name"] for a in response.json()["adapters"]] == ["good"]  # the other one still starts
    detail = client.get(f"/api/v1/deployments/{stale['id']}").json()
    assert detail["status"] == "failed" and "replaced since" in detail["status_reason"]
    assert client.get(f"/api/v1/deployments/{good['id']}").json()["status"] == "starting"


def test_a_server_with_nothing_left_to_serve_is_not_started(client, session, replaced_checkpoint_deployment):
    stale = replaced_checkpoint_deployment
    response = claim(client, stale["server_id"], dispatch(client, stale["server_id"]))
    assert response.status_code == 409
    detail = client.get(f"/api/v1/deployments/{stale['id']}").json()
    assert detail["status"] == "failed" and "replaced since" in detail["status_reason"]
    assert detail["server"]["status"] == "failed" and "replaced since" in detail["server"]["status_reason"]


def test_the_worker_channel_needs_the_worker_token(client, adapter_run):
    deployment = deploy(client, adapter_run.id)
    dispatch_id = dispatch(client, deployment["server_id"], "w")
    response = claim(client, deployment["server_id"], dispatch_id, "w", Authorization="Bearer nope")
    assert response.status_code == 401


# ------------------------------------------------------------------------------- pages


def test_deployments_page_deploys_and_undeploys(client, session, adapter_run):
    page = client.get("/deployments")
    assert page.status_code == 200 and f"demo — #{adapter_run.id}, succeeded</option>" in page.text
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


def test_a_base_model_is_served_alone_to_chat_with_from_the_models_page(client, session, tmp_path) -> None:
    from app.models.model_entry import ModelEntry

    model = ModelEntry(name="tiny-base", path=str(tmp_path / "tiny-base"))
    session.add(model)
    session.commit()
    page = client.post(f"/models/{model.id}/serve")
    assert page.status_code == 200 and "Starting tiny-base" in page.text
    server = session.exec(select(InferenceServer).where(InferenceServer.base_model_path == model.path)).one()
    assert (server.serves_model_alone, server.status, server.base_name) == (True, "pending", "tiny-base")
    assert f'action="/models/servers/{server.id}/stop"' in page.text and "Serve for chat" not in page.text
    again = client.post(f"/models/{model.id}/serve")  # the name is taken while it serves
    assert again.status_code == 409 and "in use" in again.text

    server.status, server.url = "ready", "http://127.0.0.1:9"
    session.add(server)
    session.commit()
    page = client.get("/models").text
    assert 'href="/playground?model=tiny-base"' in page
    assert 'value="tiny-base"' in client.get("/playground?model=tiny-base").text

    assert client.post(f"/models/servers/{server.id}/stop", follow_redirects=False).status_code == 303
    session.refresh(server)
    assert server.stop_requested
    page = client.get("/models").text
    assert "stopping" in page and 'href="/playground?model=tiny-base"' not in page


def test_after_undeploy_the_server_row_reads_stopping_until_its_worker_stops_it(client, session, adapter_run):
    deployment = deploy(client, adapter_run.id, name="short-lived")
    server_id = deployment["server_id"]
    dispatch_id = dispatch(client, server_id)
    assert claim(client, server_id, dispatch_id).status_code == 200
    ready = client.post(f"{INTERNAL}/servers/{server_id}/events", headers=worker_headers(),
                        json={"status": "ready", "url": "http://127.0.0.1:9", "adapters": ["short-lived"]})
    assert ready.status_code == 200
    assert client.delete(f"/api/v1/deployments/{deployment['id']}").status_code == 200
    row = client.get("/deployments").text.split('id="deployments-table"')[1]
    assert '<span class="badge stopped">stopping</span>' in row and '<span class="badge ready">ready</span>' not in row
    stopped = client.post(f"{INTERNAL}/servers/{server_id}/events", headers=worker_headers(),
                          json={"status": "stopped", "reason": "no adapter left"})
    assert stopped.json() == {"stop": True}
    row = client.get("/deployments").text.split('id="deployments-table"')[1]
    assert "stopping" not in row and '<span class="badge stopped">stopped</span>' in row
