"""Inference servers (vLLM or LLaMA-Factory's API) and the adapters deployed on them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field, timestamp_field
from app.models.user import OwnedPublic, expose_owner_name, owner_id_field


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
SERVED_AS_LORA, SERVED_AS_MERGED, SERVED_AS_MODEL = "lora", "merged", "model"


class ServeBackend(StrEnum):
    vllm = "vllm"
    # `llamafactory-cli api --infer_backend huggingface`: one adapter per server, for models
    # vLLM can't serve.
    llamafactory = "llamafactory"


class InferenceServerBase(SQLModel):
    backend: ServeBackend = ServeBackend.vllm
    base_model_path: str = Field(index=True)
    # The gateway's `model` name for the base model itself (vLLM's --served-model-name).
    base_name: str = ""
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    gpu_ids: list[int] = json_field(list)
    worker_id: str | None = None
    url: str | None = None
    pid: int | None = None
    max_lora_rank: int = 16
    max_model_len: int = 2048
    # Set when its last adapter is undeployed; the supervising worker stops the process.
    stop_requested: bool = False
    log_tail: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = created_at_field()
    ready_at: datetime | None = timestamp_field()
    stopped_at: datetime | None = timestamp_field()


class InferenceServer(InferenceServerBase, table=True):
    __tablename__ = "inference_server"

    id: int | None = Field(default=None, primary_key=True)
    # LLaMA-Factory's chat template, for the llamafactory backend.
    template: str | None = None
    # The panel's dispatch of a pending server to one worker (see Run.dispatch_id).
    dispatch_id: str | None = None
    dispatched_worker_id: str | None = None
    dispatched_at: datetime | None = timestamp_field()
    # The worker process that claimed it (a restarted worker's servers died with it).
    worker_instance: str | None = None
    # The bearer secret the server requires (vLLM's --api-key): only the gateway sends it.
    api_key: str = ""
    # A registered model served alone, with no adapter (a merged export: app/services/exports.py).
    serves_model_alone: bool = False
    claimed_at: datetime | None = timestamp_field()
    heartbeat_at: datetime | None = timestamp_field()


class DeploymentBase(SQLModel):
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
    # How it is served: "lora" (an adapter on its base model's server), "merged" (vLLM cannot serve
    # it as a LoRA: an export job merges it into its base first) or "model" (a full or freeze
    # fine-tune's output, a whole model); the last two on a server of their own (serves_model_alone).
    served_as: str = SERVED_AS_LORA
    # The export (merge) job a "merged" deployment waits for, then is served from.
    export_id: int | None = None
    status: DeploymentStatus = DeploymentStatus.pending
    status_reason: str = ""
    created_at: datetime = created_at_field()
    ready_at: datetime | None = timestamp_field()
    stopped_at: datetime | None = timestamp_field()


class Deployment(DeploymentBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = owner_id_field()


class DeploymentCreate(SQLModel):
    run_id: int
    name: str | None = Field(default=None, max_length=200)
    checkpoint: str | None = None
    backend: ServeBackend = ServeBackend.vllm
    # Deploy even when the adapter's latest evaluation scores below the base model's (the
    # promotion gate, app/services/evaluations.py promotion_problem).
    force: bool = False


class DeploymentPublic(DeploymentBase, OwnedPublic):
    id: int


class InferenceServerPublic(InferenceServerBase):
    id: int
    # The scheduler's word on a pending server that no worker could take yet.
    wait_reason: str | None = None


class DeploymentDetail(DeploymentPublic):
    server: InferenceServerPublic | None = None


expose_owner_name(Deployment)
