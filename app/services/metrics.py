"""Operations metrics in Prometheus' text format (prometheus-client), for `GET /metrics`.

Two kinds: what the database and the scheduler's last pass say at scrape time (runs by status, the
queue's depth and wait, workers and their GPUs, each user's GPUs in use and GPU-hours, webhook
deliveries), read by a collector when Prometheus asks; and what the gateway counts
as requests go through (requests, tokens and latency per served model), kept in this process.
They live in a registry of their own, not prometheus-client's global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlmodel import Session, col, func, select

from app.db import get_engine
from app.models import Run, RunStatus, Worker
from app.models.webhook import DeliveryStatus, WebhookDelivery
from app.models.base import as_utc, utcnow
from app.services.scheduler import queue_usage
from app.services.workers import is_online

REGISTRY = CollectorRegistry()

GATEWAY_REQUESTS = Counter(
    "tuneboard_gateway_requests", "Requests through the OpenAI-compatible gateway, by served model and answer.",
    ["model", "status"], registry=REGISTRY,
)
GATEWAY_TOKENS = Counter(
    "tuneboard_gateway_tokens", "Tokens the model servers reported (usage), by served model and kind.",
    ["model", "kind"], registry=REGISTRY,
)
GATEWAY_LATENCY = Histogram(
    "tuneboard_gateway_request_seconds", "Time from the gateway's request to the model's last byte.",
    ["model"], registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


GATEWAY_RATE_LIMITED = Counter(
    "tuneboard_gateway_rate_limited", "Requests refused (429) for a gateway key over its limits, by model asked for.",
    ["model"], registry=REGISTRY,
)


def record_gateway_request(model: str, status_code: int, seconds: float, usage: dict[str, Any] | None) -> None:
    GATEWAY_REQUESTS.labels(model, str(status_code)).inc()
    GATEWAY_LATENCY.labels(model).observe(seconds)
    for kind in ("prompt_tokens", "completion_tokens"):
        count = (usage or {}).get(kind)
        if isinstance(count, int) and count >= 0:
            GATEWAY_TOKENS.labels(model, kind.removesuffix("_tokens")).inc(count)


class PanelCollector(Collector):
    """Runs, the queue and the workers, as the database has them now."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with Session(get_engine()) as session:
            yield from _run_metrics(session)
            yield from _worker_metrics(session)
            yield from _webhook_metrics(session)
        yield from _user_metrics()


def _run_metrics(session: Session) -> Iterator[GaugeMetricFamily]:
    by_status = dict(session.exec(select(Run.status, func.count()).group_by(Run.status)).all())
    runs = GaugeMetricFamily("tuneboard_runs", "Runs by status.", labels=["status"])
    for status in RunStatus:
        runs.add_metric([status.value], by_status.get(status, 0))
    yield runs
    waiting = session.exec(
        select(Run.queued_at).where(Run.status == RunStatus.queued, col(Run.dispatch_id).is_(None))
    ).all()
    now = utcnow()
    yield GaugeMetricFamily("tuneboard_queue_depth", "Queued runs no worker has been given yet.", value=len(waiting))
    oldest = max(((now - as_utc(queued_at)).total_seconds() for queued_at in waiting), default=0.0)
    yield GaugeMetricFamily("tuneboard_queue_oldest_wait_seconds", "How long the longest-waiting queued run has waited.",
                            value=oldest)


def _worker_metrics(session: Session) -> Iterator[GaugeMetricFamily]:
    workers = session.exec(select(Worker)).all()
    online = GaugeMetricFamily("tuneboard_worker_online", "1 while the worker's heartbeats arrive.", labels=["worker"])
    utilization = GaugeMetricFamily("tuneboard_worker_gpu_utilization_percent", "GPU utilisation from NVML.",
                                    labels=["worker", "gpu"])
    memory = GaugeMetricFamily("tuneboard_worker_gpu_memory_used_bytes", "GPU memory in use from NVML.",
                               labels=["worker", "gpu"])
    for worker in workers:
        live = is_online(worker)
        online.add_metric([worker.id], 1 if live else 0)
        for gpu in worker.gpus if live else ():
            labels = [worker.id, str(gpu["index"])]
            utilization.add_metric(labels, float(gpu.get("utilization", 0.0)))
            memory.add_metric(labels, float(gpu.get("memory_used_mib", 0.0)) * 1024 * 1024)
    yield online
    yield utilization
    yield memory


def _user_metrics() -> Iterator[GaugeMetricFamily]:
    """Each user's share, as of the scheduler's last pass (app/services/quotas.py)."""
    usage = queue_usage()
    in_use = GaugeMetricFamily("tuneboard_user_gpus_in_use", "GPUs (a CPU run's slot counts as 1) the user's runs hold.",
                               labels=["user"])
    hours = GaugeMetricFamily("tuneboard_user_gpu_hours_24h", "The user's GPU-hours in the last 24 hours (fair share).",
                              labels=["user"])
    queued = GaugeMetricFamily("tuneboard_user_queued_runs", "The user's queued runs.", labels=["user"])
    for row in usage.users:
        in_use.add_metric([row.username], row.units_in_use)
        hours.add_metric([row.username], row.gpu_hours_24h)
        queued.add_metric([row.username], row.queued)
    yield in_use
    yield hours
    yield queued
    if usage.cap is not None:
        yield GaugeMetricFamily("tuneboard_user_gpu_cap", "GPUs one user's runs may hold at once.", value=usage.cap)


def _webhook_metrics(session: Session) -> Iterator[GaugeMetricFamily]:
    by_status = dict(session.exec(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all())
    deliveries = GaugeMetricFamily("tuneboard_webhook_deliveries", "Webhook deliveries by status (pending: being retried).",
                                   labels=["status"])
    for status in DeliveryStatus:
        deliveries.add_metric([status.value], by_status.get(status, 0))
    yield deliveries


REGISTRY.register(PanelCollector())


def exposition() -> bytes:
    return generate_latest(REGISTRY)
