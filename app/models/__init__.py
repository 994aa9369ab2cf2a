"""All table models, imported here so that SQLModel.metadata and Alembic see every table."""

from app.models.artifact import ArtifactFile, RunArtifact, RunArtifactPublic
from app.models.audit import AuditEntry
from app.models.batch_probe import BatchProbe, BatchProbePublic
from app.models.config import TrainConfig, TrainConfigPublic
from app.models.dataset import Dataset, DatasetPublic, DatasetUpdate
from app.models.deployment import Deployment, DeploymentStatus, InferenceServer
from app.models.evaluation import Evaluation
from app.models.export import ModelExport
from app.models.gateway_key import GatewayKeyLimit, GatewayKeyUsage
from app.models.job import JobStatus
from app.models.model_entry import ModelEntry, ModelEntryCreate, ModelEntryPublic
from app.models.panel_setting import PanelSetting
from app.models.run import Run, RunEvent, RunLogLine, RunMetric, RunPublic, RunStatus
from app.models.user import ApiToken, User
from app.models.webhook import Webhook, WebhookDelivery
from app.models.worker import Worker, WorkerPublic

__all__ = [
    "ApiToken",
    "AuditEntry",
    "ArtifactFile",
    "BatchProbe",
    "BatchProbePublic",
    "Dataset",
    "DatasetPublic",
    "DatasetUpdate",
    "Deployment",
    "DeploymentStatus",
    "Evaluation",
    "GatewayKeyLimit",
    "GatewayKeyUsage",
    "InferenceServer",
    "JobStatus",
    "ModelEntry",
    "ModelEntryCreate",
    "ModelEntryPublic",
    "ModelExport",
    "PanelSetting",
    "Run",
    "RunArtifact",
    "RunArtifactPublic",
    "RunEvent",
    "RunLogLine",
    "RunMetric",
    "RunPublic",
    "RunStatus",
    "TrainConfig",
    "TrainConfigPublic",
    "User",
    "Webhook",
    "WebhookDelivery",
    "Worker",
    "WorkerPublic",
]
