"""Celery tasks. Each one reports to the app over its internal channel; none opens the database."""

from __future__ import annotations

from workers.celery_app import DEFAULT_QUEUE, celery_app


@celery_app.task(name="tuneboard.ping", queue=DEFAULT_QUEUE, ignore_result=False)
def ping(payload: str) -> str:
    """Round-trip check of the transport (used by `tuneboard doctor` and the tests)."""
    return f"pong:{payload}"
