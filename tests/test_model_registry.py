"""The models registry: folders under the allowed roots, described from their files alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from app.models import ModelEntry, TrainConfig
from app.services.model_registry import safetensors_param_count, suggest_template, template_warning


def write_model(root: Path, name: str, *, shapes: dict[str, list[int]] | None = None, dtype: str = "BF16",
                chat_template: bool = True, config: dict | None = None) -> Path:
    """A Hugging Face model folder whose safetensors file is real (header + zero bytes)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
        "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 32}))
    shapes = shapes or {"embed.weight": [32, 16], "layers.0.weight": [16, 16]}
    size = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for tensor, shape in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        header[tensor] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * size]}
        offset += count * size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    tokenizer = {"chat_template": "{{ messages }}"} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture
def models_root(data_dir: Path) -> Path:
    return data_dir.parent / "models"


def test_scan_describes_models_from_headers(client, models_root) -> None:
    write_model(models_root, "Qwen2.5-0.5B-Instruct")
    write_model(models_root / "meta-llama", "Llama-2-7b-hf", chat_template=False, dtype="F32",
                config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000})
    (models_root / "not-a-model").mkdir()
    result = client.post("/api/v1/models/scan").json()
    assert sorted(result["added"]) == ["Llama-2-7b-hf", "Qwen2.5-0.5B-Instruct"]
    models = {m["name"]: m for m in client.get("/api/v1/models").json()}
    qwen = models["Qwen2.5-0.5B-Instruct"]
    assert qwen["param_count"] == 32 * 16 + 16 * 16
    assert (qwen["architecture"], qwen["dtype"], qwen["has_chat_template"]) == ("Qwen2ForCausalLM", "bfloat16", True)
    assert qwen["suggested_template"] == "qwen"
    llama = models["Llama-2-7b-hf"]
    assert (llama["dtype"], llama["has_chat_template"], llama["suggested_template"]) == ("float32", False, "llama2")
    # A second scan refreshes, never duplicates.
    assert client.post("/api/v1/models/scan").json()["added"] == []
    assert len(client.get("/api/v1/models").json()) == 2


def test_add_by_path_and_refusals(client, models_root, tmp_path) -> None:
    folder = write_model(models_root, "Qwen3-0.6B")
    created = client.post("/api/v1/models", json={"path": str(folder), "name": "qwen3-small"})
    assert created.status_code == 201, created.text
    assert created.json()["suggested_template"] == "qwen3"
    assert client.post("/api/v1/models", json={"path": str(folder)}).status_code == 409

    outside = write_model(tmp_path / "elsewhere", "Evil")
    (models_root / "link").symlink_to(outside)
    for path, words in [("/etc", "outside"), (f"{models_root}/../elsewhere/Evil", "outside"),
                        (str(models_root / "link"), "outside"), (str(models_root / "missing"), "does not exist")]:
        refused = client.post("/api/v1/models", json={"path": path})
        assert refused.status_code == 400, path
        assert words in refused.json()["detail"], refused.json()
    assert len(client.get("/api/v1/models").json()) == 1


def test_get_and_delete_model(client, session, models_root) -> None:
    model_id = client.post("/api/v1/models", json={"path": str(write_model(models_root, "m"))}).json()["id"]
    assert client.get(f"/api/v1/models/{model_id}").json()["name"] == "m"
    session.add(TrainConfig(name="uses it", model_id=model_id))
    session.commit()
    assert client.delete(f"/api/v1/models/{model_id}").status_code == 409
    session.exec(TrainConfig.__table__.delete())
    session.commit()
    assert client.delete(f"/api/v1/models/{model_id}").status_code == 204
    assert client.get(f"/api/v1/models/{model_id}").status_code == 404
    assert session.get(ModelEntry, model_id) is None


def test_models_page_form(client, models_root) -> None:
    page = client.get("/models")
    assert page.status_code == 200 and 'id="model-path"' in page.text and "No models yet" in page.text
    refused = client.post("/models", data={"path": "/etc", "name": ""})
    assert refused.status_code == 400 and 'id="error-path"' in refused.text and "outside" in refused.text
    folder = write_model(models_root, "gemma-2-2b-it")
    added = client.post("/models", data={"path": str(folder), "name": ""})
    assert added.status_code == 200 and "gemma-2-2b-it" in added.text


@pytest.mark.parametrize(("name", "model_type", "expected"), [
    ("Qwen2.5-7B-Instruct", "qwen2", "qwen"),
    ("Qwen1.5-7B-Chat", "qwen2", "qwen"),
    ("Qwen3-8B", "qwen3", "qwen3"),
    ("Meta-Llama-3.1-8B-Instruct", "llama", "llama3"),
    ("Llama-3.3-70B-Instruct", "llama", "llama3"),
    ("Llama-2-7b-chat-hf", "llama", "llama2"),
    ("DeepSeek-R1-Distill-Qwen-7B", "qwen2", "deepseekr1"),
    ("chatglm3-6b", "chatglm", "chatglm3"),
    ("Mistral-7B-Instruct-v0.3", "mistral", "mistral"),
    ("gemma-2-9b-it", "gemma2", "gemma"),
    ("Phi-3-mini-4k-instruct", "phi3", "phi"),
])
def test_suggested_template_by_family(name, model_type, expected) -> None:
    assert suggest_template(name, {"model_type": model_type}) == expected


def test_base_template_on_an_instruct_model_warns() -> None:
    assert "Instruct/Chat" in template_warning("Qwen2.5-7B-Instruct", "alpaca")
    assert template_warning("Qwen2.5-7B-Instruct", "qwen") is None
    assert template_warning("Qwen2.5-7B", "default") is None


@pytest.mark.slow
def test_the_real_demo_model(client, tiny_model, models_root) -> None:
    """The tiny Qwen2 built by the training env: counted from its safetensors header."""
    link = models_root / "demo"
    link.symlink_to(tiny_model)  # a symlink out of the root is refused…
    assert client.post("/api/v1/models", json={"path": str(link)}).status_code == 400
    copy = models_root / "tiny-qwen2"
    copy.mkdir()
    for file in tiny_model.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    entry = client.post("/api/v1/models", json={"path": str(copy)}).json()
    count, _ = safetensors_param_count(copy / "model.safetensors")
    assert entry["param_count"] == count > 100_000
    assert entry["architecture"] == "Qwen2ForCausalLM" and entry["has_chat_template"]
    assert entry["suggested_template"] == "qwen"
