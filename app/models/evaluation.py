"""Evaluation jobs: a base model's, or a run's adapter's (final or checkpoint), generations on a
set of rows, scored with BLEU-4 and ROUGE-1/2/L (app/services/evaluations.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field
from app.models.job import JobStatus


class Evaluation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # None for a base-model evaluation.
    run_id: int | None = Field(default=None, foreign_key="run.id", index=True, ondelete="CASCADE")
    checkpoint: str | None = None  # None: the run's final adapter
    adapter_digest: str = ""
    model_path: str
    model_fingerprint: str = ""
    template: str
    cutoff_len: int
    backend: str  # app.wire.EvalBackend
    # The rows: a dataset, or (dataset_id None, run_id set) the run's held-out split.
    dataset_id: int | None = None
    source: str  # "split" | "dataset"
    formatting: str  # of the rows: "alpaca" | "sharegpt"
    row_indices: list[int] = json_field(list)
    rows_digest: str = Field(default="", max_length=64, index=True)
    max_rows: int
    max_new_tokens: int
    # The base model's evaluation of the same rows, computed once and shared.
    base_evaluation_id: int | None = None
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    status_reason: str = ""
    gpus_requested: int = 0
    dispatch_id: str | None = None
    dispatched_worker_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = None
    worker_instance: str | None = None
    cancel_requested: bool = False
    heartbeat_at: datetime | None = timestamp_field()
    metrics: dict[str, float] = json_field()
    rows_evaluated: int = 0
    generate_s: float | None = None
    elapsed_s: float | None = None
    versions: dict[str, Any] = json_field()
    created_at: datetime = created_at_field()
    started_at: datetime | None = timestamp_field()
    finished_at: datetime | None = timestamp_field()
