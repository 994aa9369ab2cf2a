"""Celery tasks. Each one reports to the panel over its internal channel; none opens the database.
The panel sends them to one worker's own queue (app/services/scheduler.py), with one payload of
app/wire.py as the `task` keyword."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from app.wire import DEFAULT_QUEUE, EVAL_TASK, EXPORT_TASK, PING_TASK, TRAIN_TASK, EvalTask, ExportTask, TrainTask
from workers import evaluation, training
from workers import export as export_job
from workers.celery_app import celery_app
from workers.heartbeat import INSTANCE_ID

log = logging.getLogger(__name__)


@celery_app.task(name=PING_TASK, queue=DEFAULT_QUEUE, ignore_result=False)
def ping(payload: str) -> str:
    """Round-trip check of the transport (used by `tuneboard doctor` and the tests)."""
    return f"pong:{payload}"


@celery_app.task(name=TRAIN_TASK, bind=True)
def train(self: Task, task: dict[str, Any]) -> str:
    """Train one dispatched attempt (see workers/training.py). A redelivered or superseded task
    finds the attempt not claimable and does nothing."""
    return training.train(TrainTask.model_validate(task), worker_id=self.request.hostname or "worker",
                          instance_id=INSTANCE_ID, task_id=self.request.id or "")


@celery_app.task(name=EVAL_TASK, bind=True)
def evaluate(self: Task, task: dict[str, Any]) -> str:
    """Run one dispatched evaluation (see workers/evaluation.py); a redelivered one is not claimable."""
    return evaluation.evaluate(EvalTask.model_validate(task), worker_id=self.request.hostname or "worker",
                               instance_id=INSTANCE_ID)


@celery_app.task(name=EXPORT_TASK, bind=True)
def export(self: Task, task: dict[str, Any]) -> str:
    """Merge one dispatched export (see workers/export.py); a redelivered one is not claimable."""
    return export_job.export(ExportTask.model_validate(task), worker_id=self.request.hostname or "worker",
                             instance_id=INSTANCE_ID)
