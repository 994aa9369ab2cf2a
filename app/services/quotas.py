"""Quotas and fair share: the admin's cap on GPUs one user may hold at once, and each user's
GPU-hours of the last 24 hours, which order the queue within a priority (app/services/scheduler.py).

The unit is a GPU, and a CPU run's training slot counts as one: on a panel whose workers train on
the CPU the cap and the fair share still mean something (a run holds max(GPUs, 1) units).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, or_, select

from app.errors import Invalid
from app.models import Run, User
from app.models.base import as_utc, utcnow
from app.models.panel_setting import PanelSetting

USER_GPU_CAP = "user_gpu_cap"
FAIR_SHARE_WINDOW = timedelta(hours=24)


def run_units(gpus: int) -> int:
    """What a run holds against its owner's cap: its GPUs, or 1 for a CPU training slot."""
    return max(gpus, 1)


def user_gpu_cap(session: Session) -> int | None:
    """GPUs (or CPU slots) one user's runs may hold at once; None: no cap (the default)."""
    setting = session.get(PanelSetting, USER_GPU_CAP)
    return setting.value if setting is not None else None


def set_user_gpu_cap(session: Session, cap: int | None) -> int | None:
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise Invalid("The cap is a whole number of GPUs, at least 1 (or none).", field="user_gpu_cap")
    setting = session.get(PanelSetting, USER_GPU_CAP)
    if cap is None and setting is not None:
        session.delete(setting)
    elif cap is not None and setting is None:
        session.add(PanelSetting(key=USER_GPU_CAP, value=cap))
    elif cap is not None:
        setting.value = cap
        session.add(setting)
    session.commit()
    return cap


def gpu_hours(session: Session, now: datetime | None = None) -> dict[int, float]:
    """Each owner's GPU-hours (units × hours) of runs that trained in the last 24 hours, the
    part inside the window only."""
    now = now or utcnow()
    since = now - FAIR_SHARE_WINDOW
    used: dict[int, float] = defaultdict(float)
    for owner_id, started, finished, gpu_ids, requested in session.exec(
        select(Run.owner_id, Run.started_at, Run.finished_at, Run.gpu_ids, Run.gpus_requested).where(
            col(Run.owner_id).is_not(None), col(Run.started_at).is_not(None),
            or_(col(Run.finished_at).is_(None), col(Run.finished_at) > since),
        )
    ).all():
        start, end = max(as_utc(started), since), min(as_utc(finished) if finished else now, now)
        if end > start:
            used[owner_id] += run_units(len(gpu_ids) or requested) * (end - start).total_seconds() / 3600
    return dict(used)


@dataclass(frozen=True)
class UserUsage:
    """One row of the queue view's usage table."""

    username: str
    units_in_use: int
    gpu_hours_24h: float
    queued: int


@dataclass(frozen=True)
class QueueUsage:
    cap: int | None
    users: list[UserUsage]


class FairShare:
    """One scheduling pass's view of the users: their GPU-hours (the queue's order within a
    priority), what their runs hold now against the cap, and why a run waits for its owner's."""

    def __init__(self, session: Session, holding: list[Any], now: datetime | None = None) -> None:
        self.cap = user_gpu_cap(session)
        self.hours = gpu_hours(session, now)
        self.held: dict[int, list[tuple[int, int]]] = defaultdict(list)  # owner -> (run id, units)
        for run in holding:
            if run.owner_id is not None:
                self.held[run.owner_id].append((run.id, run_units(len(run.gpu_ids) or run.gpus_requested)))
        self.names = dict(session.exec(select(User.id, User.username)).all())

    def order(self, run: Any) -> float:
        """Fewer GPU-hours in the last 24 h first (runs the panel made itself count as none)."""
        return self.hours.get(run.owner_id, 0.0) if run.owner_id is not None else 0.0

    def in_use(self, owner_id: int) -> int:
        return sum(units for _run_id, units in self.held.get(owner_id, ()))

    def over_quota(self, run: Any) -> str | None:
        """Why `run` waits for its owner's cap, or None when it may start."""
        if self.cap is None or run.owner_id is None:
            return None
        units, used = run_units(run.gpus_requested), self.in_use(run.owner_id)
        if used + units <= self.cap:
            return None
        name = self.names.get(run.owner_id, f"user {run.owner_id}")
        holders = ", ".join(f"run {run_id}" for run_id, _units in self.held[run.owner_id])
        return (f"waits for {name}'s quota: at most {self.cap} GPU(s) at once per user (a CPU run counts as 1); "
                f"{name}'s runs hold {used}" + (f" ({holders})" if holders else "") + f", this one needs {units}")

    def hold(self, run: Any) -> None:
        if run.owner_id is not None:
            self.held[run.owner_id].append((run.id, run_units(run.gpus_requested)))

    def table(self, queued: list[Any]) -> list[UserUsage]:
        """Every user with runs holding, queued, or trained in the last 24 h; most GPU-hours first."""
        waiting: dict[int, int] = defaultdict(int)
        for run in queued:
            if run.owner_id is not None:
                waiting[run.owner_id] += 1
        owners = set(self.hours) | {o for o, runs in self.held.items() if runs} | set(waiting)
        rows = [UserUsage(self.names.get(o, f"user {o}"), self.in_use(o), round(self.hours.get(o, 0.0), 2), waiting[o])
                for o in owners]
        return sorted(rows, key=lambda row: (-row.gpu_hours_24h, row.username))
