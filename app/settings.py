"""Settings from `TUNEBOARD_…` environment variables or a `.env` file."""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = PROJECT_ROOT / "templates"
STATIC_DIR = PROJECT_ROOT / "static"
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"

DEV_SECRET = "dev-insecure-secret-change-me"


class Environment(StrEnum):
    dev = "dev"
    test = "test"
    prod = "prod"


def _env_bin(env: str, name: str) -> str:
    """A command inside one of the repo's own environments (`make` builds them under .envs/)."""
    return str(PROJECT_ROOT / ".envs" / env / "bin" / name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEBOARD_", env_file=".env", extra="ignore")

    environment: Environment = Environment.dev
    data_dir: Path = Path("data")
    database_url: str | None = None
    # None: the embedded Celery transport (kombu's SQLAlchemy transport on a SQLite file
    # in the data dir), so the panel runs with no Redis. Set redis://… for remote workers.
    broker_url: str | None = None
    secret_key: str = DEV_SECRET
    # In prod the session cookie is Secure (sent over HTTPS only), so a login over plain http does not
    # stick. True keeps it usable over http: only on a network you trust, or behind a TLS proxy.
    allow_http: bool = False
    # Shared secret of the worker → app channel; derived from secret_key when unset.
    internal_token: str | None = None
    # Where workers send reports (the app's own URL as seen from a worker).
    app_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    model_roots: list[Path] = Field(default_factory=lambda: [Path("data/models")])
    max_upload_bytes: int = 2 * 1024**3
    # Build and register the tiny demo model, dataset and config at start-up (`tuneboard up --demo`).
    demo: bool = False

    # Commands of the training and serving environments (their pins conflict with the app's).
    train_python: str = _env_bin("train", "python")
    llamafactory_cli: str = _env_bin("train", "llamafactory-cli")
    serve_python: str = _env_bin("serve", "python")

    # Inference servers (deployments). On CPU the KV cache is bounded in bytes (vLLM would
    # otherwise reserve ~92 % of RAM); on GPU a share of the card's memory.
    serve_kv_cache_bytes: str = "64M"
    # OpenMP threads of a CPU vLLM server, unpinned: its spinning threads slow ~10× when the
    # host's cores are shared (the web app, training) — measured on 2 cores: 64 tokens 0.7 s vs 6.3 s.
    serve_cpu_threads: int = 1
    serve_gpu_memory_utilization: float = 0.85
    serve_max_lora_rank: int = 64
    serve_max_model_len: int = 2048
    serve_ready_timeout_s: float = 300.0

    # A worker's capacity, advertised in its heartbeats (the panel schedules against it): runs
    # on the CPU at once (None: 1 on a machine without GPUs, else 0) and inference servers at once.
    worker_cpu_slots: int | None = None
    worker_serve_slots: int = 1
    # The address the panel reaches this worker's inference servers at. None: 127.0.0.1 when the
    # panel is on this machine, else this machine's address on the route to the panel.
    advertise_host: str | None = None
    # A dispatched run or server whose claim has not arrived by then is dispatched again.
    dispatch_timeout_s: float = 30.0

    # The bearer token Prometheus scrapes /metrics with; unset: /metrics is off.
    metrics_token: str | None = None

    # A webhook delivery refused or unanswered is tried again after this, doubling each time
    # (app/services/webhooks.py; a bounded number of attempts).
    webhook_retry_base_s: float = Field(default=10.0, gt=0)

    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    # Grace between SIGABRT (LLaMA-Factory saves and stops) and SIGTERM/SIGKILL.
    cancel_grace_s: float = 60.0

    # The automatic micro-batch (app/services/batching.py): the share of a GPU's memory a chosen
    # micro-batch leaves free, the timed steps per probed size, how long a probe may take, and
    # (tests only) probing CPU runs too, under a memory limit in MiB instead of the machine's RAM.
    probe_margin: float = Field(default=0.10, ge=0, lt=1)
    probe_timed_steps: int = Field(default=3, ge=1)
    probe_timeout_s: float = 300.0
    probe_cpu: bool = False
    probe_cpu_memory_mib: float | None = None

    # Where checkpoints and adapters are kept: "" = <data dir>/artifacts/blobs; or an S3-compatible
    # bucket, s3://bucket/prefix?endpoint_url=http://host:9000&region=us-east-1 (credentials from
    # the AWS_* variables boto3 reads). Workers always go through the panel.
    artifact_store: str = ""
    # Checkpoints a run keeps besides its best one (lowest eval loss) and its adapter; at least
    # one, the newest, which a resume starts from.
    keep_checkpoints: int = Field(default=3, ge=1)
    # An unreferenced blob or staged upload younger than this is left alone by the collector: its
    # manifest may be on its way.
    artifact_gc_grace_s: float = 3600.0

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> "Settings":
        if self.environment == Environment.prod and self.secret_key == DEV_SECRET:
            raise ValueError("TUNEBOARD_SECRET_KEY must be set to a secret of your own outside dev")
        return self

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'tuneboard.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def celery_result_backend(self) -> str:
        """Only the ping round-trip keeps a result; everything else reports to the app."""
        if self.broker_url is None:
            return f"db+sqlite:///{self.resolved_data_dir / 'celery-results.db'}"
        return self.broker_url

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def worker_token(self) -> str:
        if self.internal_token:
            return self.internal_token
        return _derive(self.secret_key, "internal")

    def path(self, *parts: str) -> Path:
        """A path under the data dir, created on demand."""
        target = self.resolved_data_dir.joinpath(*parts)
        target.mkdir(parents=True, exist_ok=True)
        return target


def _derive(secret: str, purpose: str) -> str:
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


@lru_cache
def get_settings() -> Settings:
    return Settings()
