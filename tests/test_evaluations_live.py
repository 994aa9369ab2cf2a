"""End to end (issue #17): the tiny model trains through the panel (a real Celery worker, real
`llamafactory-cli train`), then its held-out rows are evaluated on that worker with both backends:
LLaMA-Factory's own predict and vLLM's offline engine (CPU), each with the base model's evaluation
of the same rows beside it; the best checkpoint is picked, merged into the base model
(`llamafactory-cli export`), the merged model served alone on vLLM and chatted with through the
gateway, and fine-tuned again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from app.db import get_engine
from app.services import artifacts as artifact_service
from app.wire import EVAL_METRICS
from tests.factories import run_config_factory
from tests.live import LivePanel, live_panel  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

TIMEOUT_S = 600.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}


def wait_for(panel: LivePanel, url: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while (body := panel.api.get(url).json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"{url} stayed {body['status']}\n{panel.log()}"
        time.sleep(0.5)
    assert body["status"] == "succeeded", f"{body['status_reason']}\n{panel.log()}"
    return body


def trained_run(panel: LivePanel, tiny_model: Path) -> int:
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, str(tiny_model), rows=40, params={
            "val_size": 0.2, "save_steps": 4, "eval_steps": 4, "num_train_epochs": 1.0, "cutoff_len": 64,
            # Early stopping as transformers and LLaMA-Factory take it, through the config.
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
            "early_stopping_steps": 3,
        }).id
    # (a start checks the config in the training environment: slow on a loaded machine)
    started = panel.api.post("/api/v1/runs", json={"config_id": config_id}, timeout=300)
    assert started.status_code == 201, started.text
    run_id = started.json()["id"]
    wait_for(panel, f"/api/v1/runs/{run_id}")
    return run_id


def evaluate(panel: LivePanel, run_id: int, **payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    # (the first one works out the held-out split in the training environment)
    created = panel.api.post(f"/api/v1/runs/{run_id}/evaluations", json={"max_rows": 8, "max_new_tokens": 8, **payload},
                             timeout=300)
    assert created.status_code == 201, created.text
    evaluation = wait_for(panel, f"/api/v1/evaluations/{created.json()['id']}")
    base = wait_for(panel, f"/api/v1/evaluations/{evaluation['base']['id']}")
    return panel.api.get(f"/api/v1/evaluations/{evaluation['id']}").json(), base


def test_train_evaluate_both_backends_best_checkpoint_merge_serve_merged_and_chat(live_panel: LivePanel, tiny_model: Path):
    panel = live_panel
    run_id = trained_run(panel, tiny_model)

    lf, lf_base = evaluate(panel, run_id, backend="llamafactory")
    assert lf["source"] == "split" and lf["rows"] == 8 and lf["rows_evaluated"] == 8
    assert set(lf["metrics"]) == set(EVAL_METRICS) == set(lf_base["metrics"])
    assert lf["delta"] == {name: lf["metrics"][name] - lf_base["metrics"][name] for name in EVAL_METRICS}
    assert lf["rows_per_s"] > 0 and lf["versions"]["llamafactory"] == "0.9.5"
    lf_rows = panel.api.get(f"/api/v1/evaluations/{lf['id']}/rows", params={"limit": 100}).json()
    assert lf_rows["total"] == 8
    for row, index in zip(lf_rows["rows"], lf["row_indices"], strict=True):
        assert row["index"] == index and f"tiny {index}: say hi" in row["prompt"]  # the held-out row's prompt
        assert row["reference"].strip() == f"hi {index}"
        assert row["base_output"] is not None and row["adapter_output"] is not None

    vllm, vllm_base = evaluate(panel, run_id, backend="vllm")
    assert vllm["row_indices"] == lf["row_indices"] and vllm["base"]["id"] != lf["base"]["id"]
    assert set(vllm["metrics"]) == set(EVAL_METRICS) and set(vllm_base["metrics"]) == set(EVAL_METRICS)
    vllm_rows = panel.api.get(f"/api/v1/evaluations/{vllm['id']}/rows", params={"limit": 100}).json()["rows"]
    # The same prompts through the same template, the same references.
    assert [(r["prompt"], r["reference"]) for r in vllm_rows] == [(r["prompt"], r["reference"]) for r in lf_rows["rows"]]
    agree = sum(a["adapter_output"] == b["adapter_output"] for a, b in zip(vllm_rows, lf_rows["rows"]))
    print(f"vLLM and LLaMA-Factory greedy outputs agree on {agree}/8 rows; "
          f"rows/s vLLM {vllm['rows_per_s']:.2f} vs LLaMA-Factory {lf['rows_per_s']:.2f}")

    # A second adapter evaluation of the same rows reuses the base model's (nothing queued for it).
    again = panel.api.post(f"/api/v1/runs/{run_id}/evaluations",
                           json={"max_rows": 8, "max_new_tokens": 8, "checkpoint": "checkpoint-4"}).json()
    assert again["base"] == {"id": lf_base["id"], "status": "succeeded", "metrics": lf_base["metrics"]}
    wait_for(panel, f"/api/v1/evaluations/{again['id']}")

    best = panel.api.get(f"/api/v1/runs/{run_id}/best-checkpoint").json()
    with Session(get_engine()) as session:
        stored = [a for a in artifact_service.list_artifacts(session, run_id) if a.name != "adapter"]
        assert best["name"] == artifact_service._best_checkpoint(session, stored).name
    jsonl = panel.api.get(f"/api/v1/evaluations/{lf['id']}/rows.jsonl").text.splitlines()
    assert [json.loads(line)["adapter_output"] for line in jsonl] == [r["adapter_output"] for r in lf_rows["rows"]]

    export_serve_chat_and_train_again(panel, run_id, best["name"])


def export_serve_chat_and_train_again(panel: LivePanel, run_id: int, best: str) -> None:
    """merge the best checkpoint (`llamafactory-cli export` on the worker) → the merged model is a
    registered model: served alone on vLLM it chats through the gateway, vLLM's batch generation
    with it matches the adapter it came from on the same rows, and it trains again."""
    import io
    import zipfile

    created = panel.api.post(f"/api/v1/runs/{run_id}/exports", json={"checkpoint": best, "export_size": 1})
    assert created.status_code == 201, created.text
    export = wait_for(panel, f"/api/v1/exports/{created.json()['id']}")
    model = next(m for m in panel.api.get("/api/v1/models").json() if m["id"] == export["model_id"])
    assert Path(model["path"]).is_dir() and model["model_type"] == "qwen2"
    archive = zipfile.ZipFile(io.BytesIO(panel.api.get(f"/api/v1/exports/{export['id']}/download").content))
    assert {"Modelfile", "config.json", "model.safetensors", "tokenizer.json"} <= set(archive.namelist())
    assert "FROM ." in archive.read("Modelfile").decode()

    dataset_id = panel.api.get(f"/api/v1/runs/{run_id}").json()["lineage"]["datasets"][0]["id"]
    adapter = panel.api.post(f"/api/v1/runs/{run_id}/evaluations", json={
        "checkpoint": best, "dataset_id": dataset_id, "backend": "vllm", "max_rows": 6, "max_new_tokens": 8}).json()
    merged = panel.api.post("/api/v1/evaluations", json={
        "model_id": export["model_id"], "dataset_id": dataset_id, "backend": "vllm", "max_rows": 6,
        "max_new_tokens": 8, "template": "qwen", "cutoff_len": 64}).json()
    adapter = wait_for(panel, f"/api/v1/evaluations/{adapter['id']}")
    merged = wait_for(panel, f"/api/v1/evaluations/{merged['id']}")
    assert merged["kind"] == "base" and merged["model_path"] == model["path"] and merged["rows_evaluated"] == 6
    adapter_rows = panel.api.get(f"/api/v1/evaluations/{adapter['id']}/rows").json()["rows"]
    merged_rows = panel.api.get(f"/api/v1/evaluations/{merged['id']}/rows").json()["rows"]
    assert [r["prompt"] for r in merged_rows] == [r["prompt"] for r in adapter_rows]
    agree = sum(a["adapter_output"] == m["base_output"] for a, m in zip(adapter_rows, merged_rows))
    print(f"merged model vs the LoRA it was merged from (vLLM, greedy): {agree}/6 rows identical")

    # Served alone (no LoRA) on vLLM, the merged model chats through the gateway.
    served = panel.api.post(f"/api/v1/models/{export['model_id']}/serve", json={"name": "tiny-merged"})
    assert served.status_code == 201, served.text
    server_url = f"/api/v1/model-servers/{served.json()['id']}"
    deadline = time.monotonic() + TIMEOUT_S
    while (server := panel.api.get(server_url).json())["status"] not in ("ready", "failed", "stopped"):
        assert time.monotonic() < deadline, f"{server}\n{panel.log()}"
        time.sleep(0.5)
    assert server["status"] == "ready", f"{server}\n{panel.log()}"
    key = panel.api.post("/api/v1/gateway-keys", json={"name": "merged"}).json()["token"]
    gateway = {"Authorization": f"Bearer {key}"}
    assert "tiny-merged" in [m["id"] for m in panel.api.get("/v1/models", headers=gateway).json()["data"]]
    chat = panel.api.post("/v1/chat/completions", headers=gateway, json={
        "model": "tiny-merged", "messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 8})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] is not None and chat.json()["usage"]["completion_tokens"] >= 1
    stopped = panel.api.post(f"{server_url}/stop").json()
    deadline = time.monotonic() + 60
    while stopped["status"] != "stopped":
        assert time.monotonic() < deadline, stopped
        time.sleep(0.5)
        stopped = panel.api.get(server_url).json()

    # The merged model trains again (a run of a config on it).
    with Session(get_engine()) as session:
        config_id = run_config_factory(session, model["path"], name="again", rows=16, params={
            "val_size": 0.0, "eval_strategy": "no", "save_steps": 100, "num_train_epochs": 1.0, "cutoff_len": 64}).id
    again = panel.api.post("/api/v1/runs", json={"config_id": config_id}).json()
    wait_for(panel, f"/api/v1/runs/{again['id']}")
