"""This machine's GPUs: which ones a worker may use, and their live utilisation and memory.

NVML first (what nvidia-smi itself reads); `nvidia-smi` parsing when the NVML library cannot be
loaded; nothing on a CPU-only machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

WORKER_GPUS_ENV = "TUNEBOARD_WORKER_GPUS"
_SMI_FIELDS = "index,name,memory.total,memory.used,utilization.gpu"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: float
    memory_used_mib: float
    utilization: float  # percent

    def as_dict(self) -> dict:
        return asdict(self)


def detect_gpus() -> list[GpuInfo]:
    gpus = _from_nvml()
    if gpus is None:
        gpus = _from_nvidia_smi()
    return gpus or []


def worker_gpu_indices() -> list[int]:
    """The GPUs this worker may use: TUNEBOARD_WORKER_GPUS ("0,1", "all", "none"), default all."""
    wanted = os.environ.get(WORKER_GPUS_ENV, "all").strip().lower()
    if wanted in ("none", ""):
        return []
    present = [gpu.index for gpu in detect_gpus()]
    if wanted == "all":
        return present
    indices = [int(part) for part in wanted.split(",") if part.strip()]
    missing = sorted(set(indices) - set(present))
    if missing:
        raise ValueError(f"{WORKER_GPUS_ENV} names GPUs {missing} that this machine does not have")
    return indices


def gpu_stats(indices: list[int] | None = None) -> list[GpuInfo]:
    gpus = detect_gpus()
    return gpus if indices is None else [gpu for gpu in gpus if gpu.index in indices]


def driver_versions() -> dict[str, str]:
    """{"driver": "…", "cuda": "…"} as the driver reports them; empty without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            return {
                "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "cuda": f"{cuda // 1000}.{(cuda % 1000) // 10}",
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: a CPU-only machine
        return {}


def _from_nvml() -> list[GpuInfo] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mib=memory.total / 2**20,
                    memory_used_mib=memory.used / 2**20,
                    utilization=float(utilization.gpu),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _from_nvidia_smi() -> list[GpuInfo] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        output = subprocess.run(
            ["nvidia-smi", f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return parse_nvidia_smi_csv(output)


def parse_nvidia_smi_csv(output: str) -> list[GpuInfo]:
    gpus = []
    for line in output.strip().splitlines():
        index, name, total, used, utilization = (part.strip() for part in line.split(","))
        gpus.append(
            GpuInfo(
                index=int(index), name=name, memory_total_mib=_number(total),
                memory_used_mib=_number(used), utilization=_number(utilization),
            )
        )
    return gpus


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]" on some boards
        return 0.0


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
