"""Inference servers (vLLM or LLaMA-Factory's API) and the adapters deployed on them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field


class DeploymentStatus(StrEnum):
    pending = "pending"
    starting = "starting"
    ready = "ready"
    failed = "failed"
    stopped = "stopped"

    def is_finished(self) -> bool:
        return self in (DeploymentStatus.failed, DeploymentStatus.stopped)

    def is_active(self) -> bool:
        return not self.is_finished()


ACTIVE_STATUSES = (DeploymentStatus.pending, DeploymentStatus.starting, DeploymentStatus.ready)


class ServeBackend(StrEnum):
    vllm = "vllm"
    # `llamafactory-cli api --infer_backend huggingface`: one adapter per server, for models
    # vLLM can't serve.
    llamafactory = "llamafactory"


class InferenceServer(SQLModel, table=True):
    __tablename__ = "inference_server"

    id: int | None = Field(default=None, primary_key=True)
    backend: ServeBackend = ServeBackend.vllm
    base_model_path: str = Field(index=True)
    # The gateway's `model` name for the base model itself (vLLM's --served-model-name).
    base_name: str = ""
    # LLaMA-Factory's chat template, for the llamafactory backend.
    template: str | None = None
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    # The panel's dispatch of a pending server to one worker (see Run.dispatch_id).
    dispatch_id: str | None = None
    dispatched_worker_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = None
    # The worker process that claimed it (a restarted worker's servers died with it).
    worker_instance: str | None = None
    url: str | None = None
    # The bearer secret the server requires (vLLM's --api-key): only the gateway sends it.
    api_key: str = ""
    pid: int | None = None
    max_lora_rank: int = 16
    max_model_len: int = 2048
    # Set when its last adapter is undeployed; the supervising worker stops the process.
    stop_requested: bool = False
    # A registered model served alone, with no adapter (a merged export: app/services/exports.py).
    serves_model_alone: bool = False
    log_tail: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = created_at_field()
    claimed_at: datetime | None = timestamp_field()
    ready_at: datetime | None = timestamp_field()
    heartbeat_at: datetime | None = timestamp_field()
    stopped_at: datetime | None = timestamp_field()


class Deployment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # The `model` name clients send to the gateway.
    name: str = Field(index=True, max_length=200)
    run_id: int | None = Field(default=None, foreign_key="run.id")
    # None: the run's final adapter; else a "checkpoint-N" folder of its output.
    checkpoint: str | None = None
    server_id: int | None = Field(default=None, foreign_key="inference_server.id")
    # The served adapter's content address (app.wire.ArtifactManifest.digest).
    artifact_digest: str = ""
    # The adapter's name inside the server (vLLM's lora_name; LLaMA-Factory's API_MODEL_NAME).
    lora_name: str = ""
    lora_rank: int = 0
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    created_at: datetime = created_at_field()
    ready_at: datetime | None = timestamp_field()
    stopped_at: datetime | None = timestamp_field()


class DeploymentCreate(SQLModel):
    run_id: int
    name: str | None = Field(default=None, max_length=200)
    checkpoint: str | None = None
    backend: ServeBackend = ServeBackend.vllm
    # Deploy even when the adapter's latest evaluation scores below the base model's (the
    # promotion gate, app/services/evaluations.py promotion_problem).
    force: bool = False


class DeploymentPublic(SQLModel):
    id: int
    name: str
    run_id: int | None
    checkpoint: str | None
    server_id: int | None
    artifact_digest: str
    lora_name: str
    lora_rank: int
    status: DeploymentStatus
    status_reason: str
    created_at: datetime
    ready_at: datetime | None
    stopped_at: datetime | None


class InferenceServerPublic(SQLModel):
    id: int
    backend: ServeBackend
    base_model_path: str
    base_name: str
    status: DeploymentStatus
    status_reason: str
    gpu_ids: list[int]
    worker_id: str | None
    url: str | None
    pid: int | None
    max_lora_rank: int
    max_model_len: int
    stop_requested: bool
    log_tail: str
    # The scheduler's word on a pending server that no worker could take yet.
    wait_reason: str | None = None
    created_at: datetime
    ready_at: datetime | None
    stopped_at: datetime | None


class DeploymentDetail(DeploymentPublic):
    server: InferenceServerPublic | None = None
