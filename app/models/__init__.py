"""All table models, imported here so that SQLModel.metadata and Alembic see every table."""

from app.models.config import TrainConfig, TrainConfigPublic
from app.models.dataset import Dataset, DatasetPublic, DatasetUpdate
from app.models.deployment import Deployment, DeploymentStatus, InferenceServer
from app.models.model_entry import ModelEntry, ModelEntryCreate, ModelEntryPublic
from app.models.run import Run, RunEvent, RunLogLine, RunMetric, RunPublic, RunStatus
from app.models.user import ApiToken, User
from app.models.worker import Worker, WorkerHeartbeat, WorkerPublic

__all__ = [
    "ApiToken",
    "Dataset",
    "DatasetPublic",
    "DatasetUpdate",
    "Deployment",
    "DeploymentStatus",
    "InferenceServer",
    "ModelEntry",
    "ModelEntryCreate",
    "ModelEntryPublic",
    "Run",
    "RunEvent",
    "RunLogLine",
    "RunMetric",
    "RunPublic",
    "RunStatus",
    "TrainConfig",
    "TrainConfigPublic",
    "User",
    "Worker",
    "WorkerHeartbeat",
    "WorkerPublic",
]
