"""A new config's starting values for the worker its run would land on, read from the online
workers' heartbeats (their GPUs) and doctor reports (bf16 support, CPU count): no bf16 on a
CPU-only worker, and no more tokenizer or data-loader processes than the machine has cores."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from app.models import Worker
from app.services import llamafactory_params as catalogue
from app.services.workers import online_workers

# LLaMA-Factory's usual values, the most a default ever asks for.
MAX_PREPROCESSING_WORKERS = 16
MAX_DATALOADER_WORKERS = 8


@dataclass(frozen=True)
class FormDefaults:
    gpus: int
    params: dict[str, Any]
    # Where the defaults come from, in words, for the form (None: no worker is online).
    worker_note: str | None


def cpu_count(worker: Worker) -> int | None:
    """The worker's cores: its doctor report's count, else this machine's when the worker runs
    here (the embedded worker of `tuneboard up`), else unknown."""
    reported = worker.doctor.get("facts", {}).get("cpu_count")
    if isinstance(reported, int) and reported > 0:
        return reported
    return os.cpu_count() if worker.hostname == socket.gethostname() else None


def _bf16_supported(worker: Worker) -> bool | None:
    return worker.doctor.get("facts", {}).get("training_env", {}).get("torch", {}).get("bf16_supported")


def landing_worker(workers: list[Worker], gpus: int) -> Worker | None:
    """The worker a run asking for `gpus` GPUs would go to: one with that many GPUs (the largest
    first); for a CPU run, one that trains on the CPU."""
    if gpus > 0:
        fitting = [w for w in workers if len(w.gpus) >= gpus]
        return max(fitting, key=lambda w: len(w.gpus), default=None)
    return next((w for w in workers if w.cpu_train_slots > 0), workers[0] if workers else None)


def new_config_defaults(session: Session) -> FormDefaults:
    workers = online_workers(session)
    gpus = 1 if any(w.gpus for w in workers) else 0
    params = catalogue.default_params(gpus)
    worker = landing_worker(workers, gpus)
    if worker is None:
        params["bf16"] = False  # nothing says a GPU will be there
        return FormDefaults(gpus, params, None)
    supported = _bf16_supported(worker)
    params["bf16"] = gpus > 0 and supported is not False
    if gpus > 0 and supported is False:
        params["fp16"] = True  # an older GPU: half precision it has
    cores = cpu_count(worker)
    if cores is not None:
        params["preprocessing_num_workers"] = max(1, min(MAX_PREPROCESSING_WORKERS, cores // 2))
        # A CPU run's cores are busy computing: batches are best made in the training process.
        params["dataloader_num_workers"] = min(MAX_DATALOADER_WORKERS, cores // 4) if gpus else 0
    hardware = [f"{len(worker.gpus)} GPU(s)" if gpus else "no GPU",
                f"{cores} CPU cores" if cores else "CPU cores unknown"]
    if gpus:
        hardware.append("bf16" if params["bf16"] else "fp16 (no bf16)")
    return FormDefaults(gpus, params, f"Defaults for worker {worker.id}: {', '.join(hardware)}.")
