"""The micro-batch probe cache: what a probe measured for one (model shape, GPU type, sequence
length, packing, LoRA and memory settings) key, so that the next run of the same key skips the probe
(app/services/batching.py). Written by the panel only, from the reports of its workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


class BatchProbeBase(SQLModel):
    # sha256 of `key_fields`: the cache key.
    key: str = Field(max_length=64, unique=True)
    # What the key is made of: {"model_shape", "gpu", "cutoff_len", "packing", "lora_rank", ...}.
    key_fields: dict[str, Any] = json_field()
    gpu_name: str = Field(default="", max_length=200)
    # The device's memory, what of it was not PyTorch's, and the memory before the first step (MiB).
    total_mib: float = 0.0
    overhead_mib: float = 0.0
    base_mib: float = 0.0
    seq_len: int = 0
    # [{"micro", "ok", "peak_reserved_mib", "peak_allocated_mib", "fb_s", "opt_s", "error"}]; an
    # out-of-memory error of a run at a cached size is added as {"micro", "ok": false}.
    measurements: list[dict[str, Any]] = json_field(list)
    # The probe's wall time (process start to result) and its model load time, seconds.
    probe_s: float = 0.0
    load_s: float = 0.0
    versions: dict[str, str] = json_field()
    worker_id: str = ""
    run_id: int | None = None
    created_at: datetime = created_at_field()
    updated_at: datetime | None = timestamp_field()


class BatchProbe(BatchProbeBase, table=True):
    __tablename__ = "batch_probe"

    id: int | None = Field(default=None, primary_key=True)


class BatchProbePublic(BatchProbeBase):
    id: int
