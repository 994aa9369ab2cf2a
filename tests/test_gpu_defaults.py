"""The panel's recommended GPU defaults (measured in docs/benchmarks.md): the new-config form starts from
them when a GPU worker is online, and from the well-known CPU-safe config otherwise."""

from __future__ import annotations

import re

import yaml

from app.settings import get_settings
from tests.test_configs import form_fields, registered  # noqa: F401  (the fixture)

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559.0,
        "memory_used_mib": 0.0, "utilization": 0.0}


def _checked(page: str, field: str) -> bool:
    tag = re.search(rf'<input[^>]*id="{field}"[^>]*>', page)
    assert tag, field
    return "checked" in tag.group(0)


def _gpu_worker_online(client) -> None:
    beat = client.post("/internal/v1/workers/heartbeat",
                       json={"worker_id": "gpu@box", "hostname": "box", "queues": ["train"], "gpus": [H100]},
                       headers={"Authorization": f"Bearer {get_settings().worker_token}"})
    assert beat.status_code == 200, beat.text


def _saved_from_the_untouched_form(client, registered, name: str) -> dict:  # noqa: F811
    """The YAML `llamafactory-cli train` reads for a config saved from /configs/new as it comes."""
    fields = {**form_fields(client), "name": name, "model_id": str(registered["model"]["id"]),
              "dataset_ids": [str(registered["dataset_id"])]}
    saved = client.post("/configs/new", data=fields, follow_redirects=False)
    assert saved.status_code == 303, saved.text
    config_id = saved.headers["location"].rsplit("/", 1)[-1]
    return yaml.safe_load(client.get(f"/api/v1/configs/{config_id}/yaml").text)


def test_a_config_made_for_a_gpu_trains_packed_with_liger_and_12_sequences_per_step(client, registered) -> None:  # noqa: F811
    cpu = _saved_from_the_untouched_form(client, registered, "on the cpu")
    assert not cpu.get("packing") and not cpu.get("enable_liger_kernel")
    assert not cpu.get("disable_gradient_checkpointing")

    _gpu_worker_online(client)
    gpu = _saved_from_the_untouched_form(client, registered, "on a gpu")
    assert gpu["packing"] is True and gpu["enable_liger_kernel"] is True
    assert gpu["disable_gradient_checkpointing"] is True
    assert (gpu["per_device_train_batch_size"], gpu["gradient_accumulation_steps"]) == (4, 3)
    # The rest is the well-known config the CPU one starts from.
    differing = {key for key in cpu.keys() | gpu.keys() if cpu.get(key) != gpu.get(key)}
    assert differing <= {"packing", "enable_liger_kernel", "disable_gradient_checkpointing", "bf16",
                         "per_device_train_batch_size", "gradient_accumulation_steps",
                         "preprocessing_num_workers", "dataloader_num_workers"}


def test_new_form_starts_from_gpu_defaults_when_a_gpu_worker_is_online(client) -> None:
    cpu_page = client.get("/configs/new").text
    assert not _checked(cpu_page, "packing") and _checked(cpu_page, "gradient_checkpointing")

    _gpu_worker_online(client)
    page = client.get("/configs/new").text
    assert _checked(page, "packing") and _checked(page, "enable_liger_kernel")
    assert not _checked(page, "gradient_checkpointing")
    assert re.search(r'id="gpus"[^>]*value="1"|value="1"[^>]*id="gpus"', page)
    assert re.search(r'id="gradient_accumulation_steps"[^>]*value="3"|value="3"[^>]*id="gradient_accumulation_steps"', page)
    assert "docs/benchmarks.md" in page  # the reason, in the packing field's help
