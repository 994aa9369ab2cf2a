"""`tuneboard up --demo`: the web app builds and registers the demo model, dataset and config."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.demo import DEMO_CONFIG_NAME, DEMO_DATASET_NAME, DEMO_MODEL_NAME
from app.main import create_app
from app.settings import get_settings
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in


@pytest.mark.slow
def test_demo_is_installed_once_at_start_up(client, monkeypatch) -> None:
    monkeypatch.setenv("TUNEBOARD_DEMO", "1")
    get_settings.cache_clear()
    for _start in range(2):  # a second start finds everything in place and adds nothing
        with TestClient(create_app()) as demo_client:
            log_in(demo_client, ADMIN_USERNAME, ADMIN_PASSWORD)
            models = demo_client.get("/api/v1/models").json()
            datasets = demo_client.get("/api/v1/datasets").json()
            configs = demo_client.get("/api/v1/configs").json()
    assert [m["name"] for m in models] == [DEMO_MODEL_NAME]
    assert models[0]["architecture"] == "Qwen2ForCausalLM" and models[0]["has_chat_template"]
    assert models[0]["suggested_template"] == "qwen"
    assert [(d["name"], d["row_count"]) for d in datasets] == [(DEMO_DATASET_NAME, 200)]
    (config,) = configs
    assert config["name"] == DEMO_CONFIG_NAME
    assert config["dataset_ids"] == [datasets[0]["id"]] and config["model_id"] == models[0]["id"]
    assert config["params"]["template"] == "qwen" and config["params"]["bf16"] is False
    model_config = json.loads((get_settings().model_roots[0] / DEMO_MODEL_NAME / "config.json").read_text())
    assert model_config["hidden_size"] == 128 and model_config["num_attention_heads"] == 4
