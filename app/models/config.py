"""Training configs: LLaMA-Factory arguments for a LoRA SFT run, versioned once a run uses them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field
from app.models.user import OwnedPublic, expose_owner_name, owner_id_field


class TrainConfigBase(SQLModel):
    name: str = Field(index=True, max_length=100)
    description: str = ""
    version: int = 1
    # The config this one was edited from (a frozen config is never changed in place).
    parent_id: int | None = Field(default=None, foreign_key="train_config.id")
    model_id: int | None = Field(default=None, foreign_key="modelentry.id")
    # LLaMA-Factory arguments exactly as exported to YAML, minus the panel-owned keys.
    params: dict[str, Any] = json_field()
    dataset_ids: list[int] = json_field(list)
    gpus: int = 0
    # On a GPU, the worker picks per_device_train_batch_size × gradient_accumulation_steps from a probe,
    # keeping their product (the sequences per optimizer step); off: the params' split as written.
    auto_batch: bool = True
    frozen: bool = False
    created_at: datetime = created_at_field()


class TrainConfig(TrainConfigBase, table=True):
    __tablename__ = "train_config"

    id: int | None = Field(default=None, primary_key=True)
    owner_id: int | None = owner_id_field()


class TrainConfigPublic(TrainConfigBase, OwnedPublic):
    id: int


expose_owner_name(TrainConfig)
