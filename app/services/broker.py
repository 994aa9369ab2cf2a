"""The panel's side of dispatch: waking the scheduler, and sending a task to one worker's own
queue (see app/services/scheduler.py)."""

from __future__ import annotations

import threading

from pydantic import BaseModel

from app.wire import worker_queue

scheduler_kicked = threading.Event()


def kick_scheduler() -> None:
    """Ask for a scheduling pass now (a run was queued, room was freed, a worker appeared)."""
    scheduler_kicked.set()


def send_to_workers(messages: list[tuple[str, str, BaseModel]]) -> list[Exception | None]:
    """Publish each (worker_id, task_name, payload) as `task_name(task=payload)` on the worker's
    queue, over one broker connection; the error of each message that could not be sent."""
    from workers.celery_app import celery_app

    errors: list[Exception | None] = []
    with celery_app.producer_or_acquire() as producer:
        for worker_id, task_name, payload in messages:
            try:
                celery_app.send_task(
                    task_name, kwargs={"task": payload.model_dump(mode="json")}, queue=worker_queue(worker_id),
                    producer=producer, retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                )
            except Exception as error:  # the broker is down: the caller takes the dispatch back
                errors.append(error)
            else:
                errors.append(None)
    return errors


def send_to_worker(worker_id: str, task_name: str, payload: BaseModel) -> None:
    """One message; raises when the broker refused it."""
    (error,) = send_to_workers([(worker_id, task_name, payload)])
    if error is not None:
        raise error
