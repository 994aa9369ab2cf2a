"""Settings an admin changes in the panel (not the environment's): one JSON value per key."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel


class PanelSetting(SQLModel, table=True):
    __tablename__ = "panel_setting"

    key: str = Field(primary_key=True, max_length=100)
    value: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
