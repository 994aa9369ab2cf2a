"""Inference servers (vLLM or LLaMA-Factory's API) and the adapters deployed on them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, timestamp_field


class DeploymentStatus(StrEnum):
    pending = "pending"
    starting = "starting"
    ready = "ready"
    failed = "failed"
    stopped = "stopped"

    def is_finished(self) -> bool:
        return self in (DeploymentStatus.failed, DeploymentStatus.stopped)


class InferenceServer(SQLModel, table=True):
    __tablename__ = "inference_server"

    id: int | None = Field(default=None, primary_key=True)
    backend: str = "vllm"  # "vllm" | "llamafactory"
    base_model_path: str
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    worker_id: str | None = None
    url: str | None = None
    max_lora_rank: int = 16
    max_model_len: int = 2048
    log_tail: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = created_at_field()
    ready_at: datetime | None = timestamp_field()
    stopped_at: datetime | None = timestamp_field()


class Deployment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # The `model` name clients send to the gateway.
    name: str = Field(index=True, max_length=200)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    server_id: int | None = Field(default=None, foreign_key="inference_server.id")
    adapter_path: str | None = None
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    created_at: datetime = created_at_field()
    stopped_at: datetime | None = timestamp_field()
