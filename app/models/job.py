"""The lifecycle every job of a worker goes through: a training run, an evaluation, an export.

queued (in the panel's database) → starting (a worker's claim) → running (its first heartbeat) →
succeeded | failed | cancelled | lost (its worker went silent)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    starting = "starting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"

    def is_finished(self) -> bool:
        return self in FINISHED_JOB_STATUSES

    def is_active(self) -> bool:
        return not self.is_finished()


FINISHED_JOB_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.lost})
