"""Local base models found under the allowed model roots."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from app.models.base import created_at_field


class ModelEntryBase(SQLModel):
    name: str = Field(index=True, unique=True, max_length=200)
    path: str = Field(unique=True)
    architecture: str = ""
    model_type: str = ""
    param_count: int = 0
    dtype: str = ""
    has_chat_template: bool = False
    suggested_template: str | None = None
    created_at: datetime = created_at_field()


class ModelEntry(ModelEntryBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # app.wire.model_fingerprint of the folder: a worker holds this model when it reads the same.
    fingerprint: str = ""


class ModelEntryCreate(SQLModel):
    path: str
    name: str | None = None


class ModelEntryPublic(ModelEntryBase):
    id: int
