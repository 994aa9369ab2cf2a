"""A run's folders in the artifact store: each checkpoint-N and the final adapter is a manifest of
files, and each file's bytes are a content-addressed blob (shared by every manifest that holds them)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.base import created_at_field


class RunArtifactBase(SQLModel):
    run_id: int = Field(foreign_key="run.id", ondelete="CASCADE")
    name: str = Field(max_length=200)  # "checkpoint-N" or "adapter"
    step: int | None = None
    # The attempt that uploaded it.
    attempt: int
    # ArtifactManifest.digest: the content address of the whole folder.
    digest: str = Field(max_length=64)
    size: int
    created_at: datetime = created_at_field()


class RunArtifact(RunArtifactBase, table=True):
    __tablename__ = "run_artifact"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)


class RunArtifactPublic(RunArtifactBase):
    id: int


class ArtifactFile(SQLModel, table=True):
    __tablename__ = "artifact_file"
    __table_args__ = (UniqueConstraint("artifact_id", "path"),)

    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="run_artifact.id", ondelete="CASCADE")
    path: str = Field(max_length=500)
    # The blob's key in the store; indexed for the garbage collector's "still referenced?".
    sha256: str = Field(max_length=64, index=True)
    size: int
