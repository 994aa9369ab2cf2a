"""The worker's part of the automatic micro-batch (app/services/batching.py has the panel's): run the
probe when the claim asks for one, write the chosen split into the run's train.yaml, and pick the next
smaller split when the trainer runs out of memory in its first steps.

Everything the panel needs to know goes over /internal/v1 (ProbeReport, BatchFallback); the probe's
measurements are stored by the panel, never here.
"""

from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from app.settings import PROJECT_ROOT
from app.wire import BatchChoice, ProbeReport, ProbeRequest
from workers.envscripts import microbatch

PROBE_SCRIPT = PROJECT_ROOT / "workers" / "envscripts" / "batch_probe.py"
# What PyTorch (and LLaMA-Factory's logs of it) print when a device or the host runs out of memory.
OOM_PATTERN = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory|DefaultCPUAllocator: can't allocate memory")
OOM_SCAN_BYTES = 256 * 1024
MIB = 1024.0


def probe_request_file(path: Path, train_yaml: Path, request: ProbeRequest) -> None:
    args = yaml.safe_load(train_yaml.read_text())
    path.write_text(json.dumps({"args": args, **request.model_dump()}))


def read_probe_result(path: Path, attempt: int, worker_id: str, error: str | None = None) -> ProbeReport:
    """The probe's RESULT.json as the report the panel takes (a failure when it wrote none)."""
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        result = {"ok": False, "error": error or "the probe wrote no result"}
    if error:
        result = {**result, "ok": False, "error": error}
    known = set(ProbeReport.model_fields) - {"attempt", "worker_id"}
    return ProbeReport(attempt=attempt, worker_id=worker_id, **{k: v for k, v in result.items() if k in known})


def apply_split(train_yaml: Path, micro: int, accumulation: int) -> None:
    """Write the split into the run's train.yaml (everything else as it was)."""
    config = yaml.safe_load(train_yaml.read_text())
    config["per_device_train_batch_size"] = micro
    config["gradient_accumulation_steps"] = accumulation
    train_yaml.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def current_split(train_yaml: Path) -> tuple[int, int]:
    config = yaml.safe_load(train_yaml.read_text())
    return int(config.get("per_device_train_batch_size") or 8), int(config.get("gradient_accumulation_steps") or 1)


def ran_out_of_memory(stdout_log: Path, since: int) -> bool:
    """Whether the trainer's output after byte `since` (this launch's) says it ran out of memory."""
    try:
        with stdout_log.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(since, size - OOM_SCAN_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return False
    return bool(OOM_PATTERN.search(text))


def smaller_split(choice: BatchChoice, micro: int, accumulation: int) -> tuple[int, int] | None:
    """The split to fall back to after `micro` ran out of memory: the largest smaller size that the
    probe said fits, else the largest smaller divisor of the step."""
    step = micro * accumulation
    candidates = [m for m in choice.fallbacks if m < micro and step % m == 0]
    smaller = candidates[0] if candidates else microbatch.next_smaller(micro, step)
    return (smaller, step // smaller) if smaller else None


def peak_memory(output_dir: Path) -> dict[str, float]:
    """The trainer's peak GPU memory (MiB) from trainer_log.jsonl's RECORD_VRAM fields (GiB)."""
    reserved = allocated = 0.0
    try:
        with (output_dir / "trainer_log.jsonl").open("rb") as handle:
            lines = deque(handle, maxlen=100_000)
    except OSError:
        return {}
    for raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            reserved = max(reserved, float(record.get("vram_reserved") or 0))
            allocated = max(allocated, float(record.get("vram_allocated") or 0))
    if reserved <= 0:
        return {}
    return {"reserved_mib": round(reserved * MIB, 1), "allocated_mib": round(allocated * MIB, 1)}
