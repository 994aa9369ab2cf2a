"""The panel schedules: queued runs and pending inference servers wait in its database, and each
pass dispatches to a worker only what that worker can start now.

A worker's room is what its heartbeat advertises (GPUs, CPU training slots, serving slots) less
what the runs and servers dispatched to it hold. Training and serving draw on separate capacity,
so a deploy never waits for a training slot (on a GPU worker a server also takes one GPU, and
servers are placed before runs in each pass). Among the workers that hold the model and have
room, a run goes to the one it leaves with the least room to spare. Queued runs are taken by
priority; within one, the user with fewer GPU-hours in the last 24 h first, then first come first
served; a user's runs hold at most the admin's cap of GPUs at once (app/services/quotas.py). A run
that does not fit does not block smaller ones behind it. A dispatch whose claim does not arrive
within `dispatch_timeout_s` (or whose worker went offline) is released and dispatched again; the
claim is the guard against any attempt starting twice.

The pass also explains every queued run it leaves waiting (its position and why), kept in memory
for the pages and the API: the web process is the only scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlmodel import Session, col, or_, select

from app.db import get_engine
from app.models import InferenceServer, ModelEntry, Run, RunStatus, Worker
from app.models.base import as_utc, utcnow
from app.models.deployment import DeploymentStatus
from app.models.run import RunPriority
from app.services import deployments as deployment_service
from app.services import evaluations as evaluation_service
from app.services import exports as export_service
from app.services.broker import kick_scheduler, scheduler_kicked
from app.services import quotas
from app.services import runs as run_service
from app.services.workers import is_online
from app.settings import get_settings

log = logging.getLogger(__name__)

PASS_INTERVAL_S = 1.0
# What a pass reads of a run: not its YAML, metrics or results.
RUN_COLUMNS = (Run.id, Run.attempt, Run.status, Run.priority, Run.queued_at, Run.gpus_requested, Run.gpu_ids,
               Run.worker_id, Run.dispatched_worker_id, Run.dispatch_id, Run.dispatched_at, Run.remaining_s,
               Run.lineage, Run.owner_id)
LOST_SWEEP_INTERVAL_S = 2.0
HOLDING_RUN_STATUSES = (RunStatus.queued, RunStatus.starting, RunStatus.running)
HOLDING_SERVER_STATUSES = (DeploymentStatus.pending, DeploymentStatus.starting, DeploymentStatus.ready)


@dataclass(frozen=True)
class QueueSpot:
    position: int
    reason: str


@dataclass
class Holder:
    """Something that holds part of a worker: a run or a server."""

    label: str
    gpu_ids: list[int]
    remaining_s: float | None = None

    def describe(self) -> str:
        if self.remaining_s is None:
            return self.label
        minutes = round(self.remaining_s / 60)
        left = f"about {minutes} min left" if minutes >= 1 else f"about {max(1, round(self.remaining_s))} s left"
        return f"{self.label} ({left})"


@dataclass
class Room:
    worker: Worker
    gpus: list[int]
    free_gpus: list[int]
    free_cpu_slots: int
    free_serve_slots: int
    models: set[str]
    training: list[Holder] = field(default_factory=list)
    serving: list[Holder] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.worker.id

    def fits_run(self, gpus: int) -> bool:
        return len(self.free_gpus) >= gpus if gpus else self.free_cpu_slots > 0

    def spare_after_run(self, gpus: int) -> tuple[int, int]:
        """How much room a run would leave: the scheduler picks the least (best fit)."""
        return (len(self.free_gpus) - gpus, len(self.gpus)) if gpus else (self.free_cpu_slots - 1, 0)

    def hold_training(self, gpu_ids: list[int], holder: Holder) -> None:
        """What a run (or a job like one) holds: its GPUs, or a CPU training slot when it has none."""
        if gpu_ids:
            self.free_gpus = [g for g in self.free_gpus if g not in gpu_ids]
        else:
            self.free_cpu_slots -= 1
        self.training.append(holder)

    def take_training(self, gpus: int, label: str) -> list[int]:
        """`gpus` free GPUs (lowest first), or a CPU training slot for 0."""
        taken = sorted(self.free_gpus)[:gpus]
        self.hold_training(taken, Holder(label, taken))
        return taken

    def fits_server(self) -> bool:
        return self.free_serve_slots > 0 and (not self.gpus or bool(self.free_gpus))

    def take_server(self, server: InferenceServer) -> list[int]:
        taken = sorted(self.free_gpus)[:1] if self.gpus else []
        self.free_gpus = [g for g in self.free_gpus if g not in taken]
        self.free_serve_slots -= 1
        self.serving.append(Holder(f"server {server.id}", taken))
        return taken


@dataclass
class _Plan:
    """The last pass's explanations (read by the pages and the API)."""

    runs: dict[int, QueueSpot] = field(default_factory=dict)
    servers: dict[int, str] = field(default_factory=dict)
    usage: quotas.QueueUsage = field(default_factory=lambda: quotas.QueueUsage(None, []))


_plan = _Plan()
_pass_lock = threading.Lock()


def queue_spot(run_id: int) -> QueueSpot | None:
    return _plan.runs.get(run_id)


def server_wait_reason(server_id: int) -> str | None:
    return _plan.servers.get(server_id)


def queue_usage() -> quotas.QueueUsage:
    """The cap and each user's GPUs in use and GPU-hours, as of the last pass (the queue view's)."""
    return _plan.usage


# --------------------------------------------------------------------------- one pass
def schedule(session: Session, now: datetime | None = None) -> int:
    """One scheduling pass; returns how many runs and servers it dispatched."""
    with _pass_lock:
        now = now or utcnow()
        workers = session.exec(select(Worker)).all()
        online = {w.id: w for w in workers if is_online(w, now)}
        _release_stale_dispatches(session, online, now)
        for jobs in JOB_SERVICES:
            jobs.release_stale_dispatches(session, set(online), now)
        rooms = _rooms(session, online)
        model_names = {path: name for path, name in session.exec(select(ModelEntry.path, ModelEntry.name))}
        dispatched = _place_servers(session, rooms, model_names)
        dispatched += _place_runs(session, rooms, model_names)
        dispatched += _place_jobs(session, rooms)
        return dispatched


def _release_stale_dispatches(session: Session, online: dict[str, Worker], now: datetime) -> None:
    cutoff = now - timedelta(seconds=get_settings().dispatch_timeout_s)

    def stale(worker_id: str | None, dispatched_at: datetime | None) -> str | None:
        if worker_id not in online:
            return f"worker {worker_id} went offline before claiming it"
        if dispatched_at is not None and as_utc(dispatched_at) < cutoff:
            return f"worker {worker_id} did not claim it within {get_settings().dispatch_timeout_s:.0f} s"
        return None

    for run in session.exec(
        select(*RUN_COLUMNS).where(Run.status == RunStatus.queued, col(Run.dispatch_id).is_not(None))
    ).all():
        if reason := stale(run.dispatched_worker_id, run.dispatched_at):
            run_service.release_dispatch(session, run.id, run.dispatch_id, reason)
    for server in session.exec(
        select(InferenceServer).where(
            InferenceServer.status == DeploymentStatus.pending, col(InferenceServer.dispatch_id).is_not(None)
        )
    ).all():
        if reason := stale(server.dispatched_worker_id, server.dispatched_at):
            deployment_service.release_dispatch(session, server.id, server.dispatch_id, reason)


def _rooms(session: Session, online: dict[str, Worker]) -> dict[str, Room]:
    fingerprints = dict(session.exec(select(ModelEntry.path, ModelEntry.fingerprint)).all())
    rooms = {}
    for worker in online.values():
        gpus = sorted(int(g["index"]) for g in worker.gpus)
        held = {path for path, print_ in worker.models.items() if print_ and fingerprints.get(path) == print_}
        rooms[worker.id] = Room(worker, gpus, list(gpus), worker.cpu_train_slots, worker.serve_slots, held)
    for run in session.exec(select(*RUN_COLUMNS).where(col(Run.status).in_(HOLDING_RUN_STATUSES))).all():
        holder_id = run.worker_id or run.dispatched_worker_id
        room = rooms.get(holder_id or "")
        if room is None or (run.status == RunStatus.queued and run.dispatch_id is None):
            continue
        state = "starting" if run.status != RunStatus.running else None
        room.hold_training(run.gpu_ids, Holder(f"run {run.id}" + (f" ({state})" if state else ""), run.gpu_ids,
                                               run.remaining_s if state is None else None))
    for server in session.exec(
        select(InferenceServer).where(col(InferenceServer.status).in_(HOLDING_SERVER_STATUSES))
    ).all():
        room = rooms.get(server.worker_id or server.dispatched_worker_id or "")
        if room is None or (server.status == DeploymentStatus.pending and server.dispatch_id is None):
            continue
        room.free_gpus = [g for g in room.free_gpus if g not in server.gpu_ids]
        room.free_serve_slots -= 1
        room.serving.append(Holder(f"server {server.id}", server.gpu_ids))
    for jobs in JOB_SERVICES:  # an evaluation or an export holds what a run would
        for job in jobs.holding(session):
            room = rooms.get(job.worker_id or job.dispatched_worker_id or "")
            if room is None:
                continue
            room.hold_training(job.gpu_ids, Holder(f"{JOB_LABELS[jobs]} {job.id}", job.gpu_ids))
    return rooms


def _best_fit(rooms: list[Room], fits: Callable[[Room], bool], spare: Callable[[Room], tuple]) -> Room | None:
    candidates = [room for room in rooms if fits(room)]
    return min(candidates, key=lambda room: (*spare(room), room.name)) if candidates else None


def _place_servers(session: Session, rooms: dict[str, Room], model_names: dict[str, str]) -> int:
    waiting: dict[int, str] = {}
    dispatched = 0
    pending = session.exec(
        select(InferenceServer).where(
            InferenceServer.status == DeploymentStatus.pending, col(InferenceServer.dispatch_id).is_(None),
            col(InferenceServer.stop_requested).is_(False),
        ).order_by(col(InferenceServer.id))
    ).all()
    for server in pending:
        holders = [room for room in rooms.values() if server.base_model_path in room.models]
        room = _best_fit(holders, Room.fits_server, lambda r: (r.free_serve_slots, len(r.free_gpus)))
        if room is None:
            waiting[server.id] = _server_wait_reason(server, rooms, holders, model_names)
            continue
        gpu_ids = room.take_server(server)
        if deployment_service.dispatch_server(session, server, room.name, gpu_ids):
            dispatched += 1
    _plan.servers = waiting
    return dispatched


def _place_runs(session: Session, rooms: dict[str, Room], model_names: dict[str, str]) -> int:
    queued = session.exec(
        select(*RUN_COLUMNS).where(Run.status == RunStatus.queued, col(Run.dispatch_id).is_(None))
    ).all()
    holding = session.exec(select(*RUN_COLUMNS).where(
        col(Run.status).in_(HOLDING_RUN_STATUSES), or_(Run.status != RunStatus.queued, col(Run.dispatch_id).is_not(None))
    )).all()
    share = quotas.FairShare(session, holding)
    # Within a priority, the user with fewer GPU-hours in the last 24 h first.
    queued = sorted(queued, key=lambda r: (RunPriority(r.priority).rank, share.order(r), as_utc(r.queued_at), r.id))
    spots: dict[int, QueueSpot] = {}
    # Runs of one model and size wait for the same reason: work it out once a pass.
    reasons: dict[tuple[str, int], str] = {}
    choices: list[run_service.Dispatch] = []
    for run in queued:
        if (over_quota := share.over_quota(run)) is not None:
            spots[run.id] = QueueSpot(len(spots) + 1, over_quota)
            continue
        model_path = run_model_path(run)
        gpus = run.gpus_requested
        room = None
        if (model_path, gpus) not in reasons:
            holders = [room for room in rooms.values() if model_path in room.models]
            room = _best_fit(holders, lambda r: r.fits_run(gpus), lambda r: r.spare_after_run(gpus))
            if room is None:
                reasons[model_path, gpus] = _run_wait_reason(run, rooms, holders, model_names)
        if room is None:  # its place among the runs left waiting
            spots[run.id] = QueueSpot(len(spots) + 1, reasons[model_path, gpus])
            continue
        choices.append(run_service.Dispatch(run.id, run.attempt, room.name, room.take_training(run.gpus_requested, f"run {run.id}")))
        share.hold(run)
    _plan.runs = spots
    _plan.usage = quotas.QueueUsage(share.cap, share.table(queued))
    return run_service.dispatch_runs(session, choices) if choices else 0


# Jobs scheduled like a run after the runs of each pass (evaluations, then exports): each takes a
# CPU training slot or its GPU on a worker that holds its model.
JOB_SERVICES = (evaluation_service, export_service)
JOB_LABELS = {evaluation_service: "evaluation", export_service: "export"}


def _place_jobs(session: Session, rooms: dict[str, Room]) -> int:
    dispatched = 0
    for jobs in JOB_SERVICES:
        choices = []
        for job in jobs.waiting(session):  # oldest first
            gpus = job.gpus_requested
            holders = [room for room in rooms.values() if job.model_path in room.models]
            room = _best_fit(holders, lambda r: r.fits_run(gpus), lambda r: r.spare_after_run(gpus))
            if room is None:
                continue
            choices.append((job, room.name, room.take_training(gpus, f"{JOB_LABELS[jobs]} {job.id}")))
        dispatched += jobs.dispatch(session, choices) if choices else 0
    return dispatched


def run_model_path(run: Any) -> str:
    return str((run.lineage.get("model") or {}).get("path") or "")


# --------------------------------------------------------------------------- why it waits
def _no_holder_reason(model_path: str, rooms: dict[str, Room], model_names: dict[str, str]) -> str:
    if not rooms:
        return "no worker is online (start one with `tuneboard worker`)"
    model = model_names.get(model_path, model_path)
    return (f"no online worker holds model {model} (the same folder, {model_path}, with the same "
            "config and weights)")


def _busy(holders: list[Holder]) -> str:
    return ", ".join(holder.describe() for holder in holders) or "work being dispatched"


def _run_wait_reason(run: Any, rooms: dict[str, Room], holders: list[Room], model_names: dict[str, str]) -> str:
    model_path = run_model_path(run)
    if not holders:
        return _no_holder_reason(model_path, rooms, model_names)
    gpus = run.gpus_requested
    model = model_names.get(model_path, model_path)
    if gpus:
        largest = max(holders, key=lambda r: (len(r.gpus), len(r.free_gpus)))
        if len(largest.gpus) < gpus:
            return f"needs {gpus} GPU(s); the largest online worker holding {model} has {len(largest.gpus)}"
        busy = [h for h in largest.training + largest.serving if h.gpu_ids]
        return (f"needs {gpus} GPU(s); {largest.name} has {len(largest.free_gpus)} of {len(largest.gpus)} "
                f"free, the others are busy with {_busy(busy)}")
    cpu_workers = [room for room in holders if room.worker.cpu_train_slots > 0]
    if not cpu_workers:
        return f"needs a CPU training slot; no online worker holding {model} trains on the CPU"
    largest = max(cpu_workers, key=lambda r: r.worker.cpu_train_slots)
    busy = [h for h in largest.training if not h.gpu_ids]
    return (f"needs a CPU training slot; {largest.name}'s {largest.worker.cpu_train_slots} "
            f"{'is' if largest.worker.cpu_train_slots == 1 else 'are'} busy with {_busy(busy)}")


def _server_wait_reason(server: InferenceServer, rooms: dict[str, Room], holders: list[Room],
                        model_names: dict[str, str]) -> str:
    if not holders:
        return _no_holder_reason(server.base_model_path, rooms, model_names)
    serving = [room for room in holders if room.worker.serve_slots > 0]
    if not serving:
        return "no online worker holding this model serves (its serving slots are 0)"
    largest = max(serving, key=lambda r: r.worker.serve_slots)
    if largest.free_serve_slots > 0:
        busy = [h for h in largest.training + largest.serving if h.gpu_ids]
        return f"needs a free GPU on {largest.name}; all are busy with {_busy(busy)}"
    return f"{largest.name}'s serving slots are busy with {_busy(largest.serving)}"


# --------------------------------------------------------------------------- the loop
def _pass_once() -> None:
    with Session(get_engine()) as session:
        schedule(session)


def _sweep_once() -> None:
    with Session(get_engine()) as session:
        for run_id in run_service.mark_lost_runs(session):
            log.warning("run %s is lost: its worker went silent", run_id)
        deployment_service.expire_silent_servers(session)
        for jobs in JOB_SERVICES:
            for job_id in jobs.mark_lost(session):
                log.warning("%s %s is lost: its worker went silent", JOB_LABELS[jobs], job_id)


@asynccontextmanager
async def run_scheduler() -> AsyncIterator[None]:
    """The panel's background loop (started in its lifespan): a scheduling pass every second or
    when kicked, and the sweep that declares silent workers' runs lost."""

    async def loop() -> None:
        # Workers cannot report while the panel is down: after a (re)start, give them one timeout
        # to get through before calling anyone silent.
        sweep_from = asyncio.get_running_loop().time() + get_settings().heartbeat_timeout_s
        next_sweep = sweep_from
        while True:
            try:
                now = asyncio.get_running_loop().time()
                if now >= next_sweep:
                    await anyio.to_thread.run_sync(_sweep_once)
                    next_sweep = now + LOST_SWEEP_INTERVAL_S
                await anyio.to_thread.run_sync(_pass_once)
            except Exception:
                log.exception("scheduler pass failed")
            await anyio.to_thread.run_sync(scheduler_kicked.wait, PASS_INTERVAL_S)
            scheduler_kicked.clear()

    task = asyncio.create_task(loop(), name="scheduler")
    try:
        yield
    finally:
        task.cancel()
        kick_scheduler()  # unblock the thread waiting on the event
