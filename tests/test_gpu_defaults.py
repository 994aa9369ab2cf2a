"""The panel's recommended GPU defaults (measured in docs/benchmarks.md): the new-config form starts from
them when a GPU worker is online, and from the well-known CPU-safe config otherwise."""

from __future__ import annotations

import re

from app.services.llamafactory_params import GPU_DEFAULTS, default_params
from app.settings import get_settings

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559.0,
        "memory_used_mib": 0.0, "utilization": 0.0}


def _checked(page: str, field: str) -> bool:
    tag = re.search(rf'<input[^>]*id="{field}"[^>]*>', page)
    assert tag, field
    return "checked" in tag.group(0)


def test_gpu_defaults_add_to_the_well_known_config() -> None:
    assert "packing" not in default_params() and "enable_liger_kernel" not in default_params()
    assert default_params(1) == {**default_params(), **GPU_DEFAULTS}
    assert default_params(1)["per_device_train_batch_size"] * default_params(1)["gradient_accumulation_steps"] == 12


def test_new_form_starts_from_gpu_defaults_when_a_gpu_worker_is_online(client) -> None:
    cpu_page = client.get("/configs/new").text
    assert not _checked(cpu_page, "packing") and _checked(cpu_page, "gradient_checkpointing")

    beat = client.post("/internal/v1/workers/heartbeat",
                       json={"worker_id": "gpu@box", "hostname": "box", "queues": ["train"], "gpus": [H100]},
                       headers={"Authorization": f"Bearer {get_settings().worker_token}"})
    assert beat.status_code == 200, beat.text
    page = client.get("/configs/new").text
    assert _checked(page, "packing") and _checked(page, "enable_liger_kernel")
    assert not _checked(page, "gradient_checkpointing")
    assert re.search(r'id="gpus"[^>]*value="1"|value="1"[^>]*id="gpus"', page)
    assert re.search(r'id="gradient_accumulation_steps"[^>]*value="3"|value="3"[^>]*id="gradient_accumulation_steps"', page)
    assert "docs/benchmarks.md" in page  # the reason, in the packing field's help
