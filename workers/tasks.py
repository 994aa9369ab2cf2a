"""Celery tasks. Each one reports to the app over its internal channel; none opens the database."""

from __future__ import annotations

import logging

from celery import Task

from workers import training
from workers.celery_app import DEFAULT_QUEUE, TRAIN_QUEUE, celery_app
from workers.gpu_pool import NotEnoughGpus
from workers.reporter import AppUnavailable
from workers.training import WorkerShuttingDown

log = logging.getLogger(__name__)


@celery_app.task(name="tuneboard.ping", queue=DEFAULT_QUEUE, ignore_result=False)
def ping(payload: str) -> str:
    """Round-trip check of the transport (used by `tuneboard doctor` and the tests)."""
    return f"pong:{payload}"


@celery_app.task(name="tuneboard.train", queue=TRAIN_QUEUE, bind=True, max_retries=None)
def train(self: Task, run_id: int, attempt: int, gpus: int | None = None) -> str:
    """Train one attempt of a run (see workers/training.py). A redelivered task finds the attempt
    already claimed and does nothing; one this worker can't take yet goes back to the queue."""
    try:
        return training.train(run_id, attempt, worker_id=self.request.hostname or "worker",
                              task_id=self.request.id or "", gpus=gpus)
    except NotEnoughGpus as error:
        log.warning("run %s attempt %s: %s; back to the queue", run_id, attempt, error)
        raise self.retry(countdown=30) from error
    except WorkerShuttingDown as error:
        raise self.retry(countdown=0) from error
    except AppUnavailable as error:  # the claim could not be sent: the run is still queued
        log.warning("run %s attempt %s: %s; back to the queue", run_id, attempt, error)
        raise self.retry(countdown=10) from error
