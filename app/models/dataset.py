"""Datasets: an uploaded file, validated as it streamed in, registered for LLaMA-Factory."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field, json_field
from app.models.user import OwnedPublic, expose_owner_name, owner_id_field


class DatasetKind(StrEnum):
    """What a dataset trains, as LLaMA-Factory reads it: the stage of a run decides which kinds fit."""

    sft = "sft"  # instruction/response pairs or conversations ending with the answer
    ranking = "ranking"  # preference pairs: a prompt with a chosen and a rejected answer (dpo, orpo, rm)
    kto = "kto"  # conversations whose answer is marked desirable or not (kto_tag)
    pretrain = "pretrain"  # plain text documents (pt)


class DatasetBase(SQLModel):
    name: str = Field(index=True, unique=True, max_length=100)
    description: str = ""
    kind: DatasetKind = Field(default=DatasetKind.sft, index=True)
    formatting: str  # "alpaca" | "sharegpt"
    file_kind: str  # "json" | "jsonl" | "txt"
    original_filename: str
    sha256: str = Field(index=True, unique=True)
    size_bytes: int
    row_count: int
    # LLaMA-Factory's column mapping as validated (role → key; null: not read) and the sharegpt
    # tags; the dataset_info.json entry lists them only where they differ from the defaults.
    columns: dict[str, str | None] = json_field()
    tags: dict[str, str] = json_field()
    created_at: datetime = created_at_field()


class Dataset(DatasetBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # Validation report: problems by kind, stats, preview rows.
    report: dict[str, Any] = json_field()
    owner_id: int | None = owner_id_field()


class DatasetPublic(DatasetBase, OwnedPublic):
    id: int


class DatasetUpdate(SQLModel):
    name: str | None = Field(default=None, max_length=100)
    description: str | None = None


class DatasetDetail(DatasetPublic):
    """A dataset with its validation report and its dataset_info.json entry."""

    report: dict[str, Any]
    dataset_info: dict[str, Any]


class DatasetImportResult(SQLModel):
    registered: list[DatasetPublic]
    skipped: list[dict[str, str]]


expose_owner_name(Dataset)
