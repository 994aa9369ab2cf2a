"""Deploying what vLLM cannot serve as a LoRA, end to end on the tiny model (issues #17 and #18):
a DoRA run trained through the panel deploys merged (an export job, `llamafactory-cli export`,
then vLLM serves the merged model alone), a full fine-tune's output deploys as a whole model, and
both chat through the gateway under their deployment names. Real LLaMA-Factory and vLLM (CPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from app.db import get_engine
from tests.factories import run_config_factory
from tests.live import LivePanel, live_panel  # noqa: F401  (the fixture)
from tests.test_evaluations_live import TIMEOUT_S, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Small and quick: 16 rows, one epoch, no evaluation.
QUICK = {"val_size": 0.0, "eval_strategy": "no", "save_steps": 100, "num_train_epochs": 1.0, "cutoff_len": 64}


def wait_for_deployment(panel: LivePanel, deployment_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while (deployment := panel.api.get(f"/api/v1/deployments/{deployment_id}").json())["status"] != "ready":
        assert deployment["status"] in ("pending", "starting"), f"{deployment}\n{panel.log()}"
        assert time.monotonic() < deadline, f"{deployment}\n{panel.log()}"
        time.sleep(0.5)
    return deployment


def chat_and_undeploy(panel: LivePanel, deployment: dict[str, Any], gateway: dict[str, str]) -> None:
    name = deployment["name"]
    assert [m["id"] for m in panel.api.get("/v1/models", headers=gateway).json()["data"]].count(name) == 1
    chat = panel.api.post("/v1/chat/completions", headers=gateway, json={
        "model": name, "messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 8})
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == name and chat.json()["usage"]["completion_tokens"] >= 1
    assert panel.api.delete(f"/api/v1/deployments/{deployment['id']}").json()["status"] == "stopped"
    deadline = time.monotonic() + 120  # its server stops: the worker's serving slot is free again
    while panel.api.get(f"/api/v1/deployments/{deployment['id']}").json()["server"]["status"] != "stopped":
        assert time.monotonic() < deadline, panel.log()
        time.sleep(0.5)


def test_a_dora_adapter_deploys_merged_and_a_full_fine_tune_as_a_whole_model(live_panel: LivePanel,
                                                                             tiny_model: Path):
    panel = live_panel
    with Session(get_engine()) as session:
        dora = run_config_factory(session, str(tiny_model), name="dora", rows=16,
                                  params={**QUICK, "use_dora": True}).id
        full = run_config_factory(session, str(tiny_model), name="full", rows=16,
                                  params={**QUICK, "finetuning_type": "full", "learning_rate": 1.0e-4}).id
    runs = {}
    for name, config_id in (("dora", dora), ("full", full)):
        # (a start checks the config in the training environment: slow on a loaded machine)
        started = panel.api.post("/api/v1/runs", json={"config_id": config_id}, timeout=300)
        assert started.status_code == 201, started.text
        runs[name] = started.json()["id"]
    for run_id in runs.values():
        wait_for(panel, f"/api/v1/runs/{run_id}")
    key = panel.api.post("/api/v1/gateway-keys", json={"name": "merged"}).json()["token"]
    gateway = {"Authorization": f"Bearer {key}"}

    # The DoRA adapter: the preflight says why, an export merges it, vLLM serves the merged model.
    created = panel.api.post("/api/v1/deployments", json={"run_id": runs["dora"], "name": "tiny-dora"})
    assert created.status_code == 201, created.text + panel.log("web")
    merged = created.json()
    assert merged["served_as"] == "merged" and merged["server"] is None
    assert "DoRA" in merged["status_reason"] and merged["status_reason"].startswith("merging")
    merged = wait_for_deployment(panel, merged["id"])
    export = panel.api.get(f"/api/v1/exports/{merged['export_id']}").json()
    assert export["status"] == "succeeded" and export["run_id"] == runs["dora"]
    model = next(m for m in panel.api.get("/api/v1/models").json() if m["id"] == export["model_id"])
    assert merged["server"]["base_model_path"] == model["path"] and merged["server"]["base_name"] == "tiny-dora"
    chat_and_undeploy(panel, merged, gateway)

    # The full fine-tune: its output folder is the model, served alone with no LoRA.
    created = panel.api.post("/api/v1/deployments", json={"run_id": runs["full"], "name": "tiny-full"})
    assert created.status_code == 201, created.text + panel.log("web")
    whole = created.json()
    assert whole["served_as"] == "model" and whole["export_id"] is None
    assert Path(whole["server"]["base_model_path"], "model.safetensors").is_file()
    whole = wait_for_deployment(panel, whole["id"])
    chat_and_undeploy(panel, whole, gateway)
