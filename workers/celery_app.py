"""The Celery application shared by the web app (which sends tasks) and the workers.

With no broker configured it uses kombu's SQLAlchemy transport on a SQLite file in the
data dir, so the panel runs with no server; with TUNEBOARD_BROKER_URL=redis://… the
same tasks go through Redis and workers can live on other machines.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import celeryd_after_setup

from app.settings import Settings, get_settings
from app.wire import DEFAULT_QUEUE, worker_queue


def make_celery(settings: Settings) -> Celery:
    if settings.uses_embedded_broker:
        settings.path()  # the broker's SQLite file lives in the data dir
    celery = Celery(
        "tuneboard",
        broker=settings.celery_broker_url,
        backend=settings.celery_result_backend,
        include=["workers.tasks", "workers.serving"],
    )
    transport_options: dict[str, object] = {}
    if settings.uses_embedded_broker:
        # The SQLAlchemy transport polls; a short interval keeps submit → start fast. It is set on
        # the transport class because that transport hands every transport option to
        # sqlalchemy.create_engine(), which refuses unknown ones.
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = 0.1
    else:
        # Redelivery of a message held longer than this is still possible (prefetched ones);
        # the app claims a run once per attempt, so a redelivered task never starts twice.
        transport_options["visibility_timeout"] = 3600
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=DEFAULT_QUEUE,
        task_ignore_result=True,
        # Acknowledged on receipt: a training task runs for hours, and an unacknowledged one is
        # what kombu 5.7's Redis channel fails to restore when the connection drops ("Unrecoverable
        # error", the worker exits: tests/test_faults.py). Nothing is lost by it: the panel
        # dispatches again what is not claimed in time, a worker that dies mid-run loses its run to
        # the heartbeat check (→ lost, resume), and the claim guards any duplicate.
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return celery


def declare_queues(celery: Celery, worker_ids: list[str]) -> None:
    """Create the queues up front. With the embedded transport, two processes declaring the same
    queue at once race on a UNIQUE row (the loser's worker dies), so `tuneboard up` declares its
    worker's queues before it starts the web app and the worker."""
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        for name in (DEFAULT_QUEUE, *map(worker_queue, worker_ids)):
            celery.amqp.queues.select_add(name)
            celery.amqp.queues[name](channel).declare()


@celeryd_after_setup.connect
def _consume_own_queue(sender: str, instance, **_kwargs) -> None:
    """Every worker consumes a queue of its own, named after it: the panel schedules, and sends a
    task to the one worker that has room for it."""
    instance.app.amqp.queues.select_add(worker_queue(sender))


celery_app = make_celery(get_settings())

# Worker-side signal handlers (they never fire in the web process).
from workers import heartbeat  # noqa: E402,F401
