"""This worker's GPUs, handed out to the runs it trains at once: disjoint sets, first come first
served. A CPU run takes none; a run that asks for more GPUs than the worker has can never get
them (the task gives it back to the queue instead of waiting)."""

from __future__ import annotations

import threading
from functools import lru_cache

from workers.gpus import worker_gpu_indices


class NotEnoughGpus(RuntimeError):
    pass


class GpuPool:
    def __init__(self, gpu_ids: list[int]) -> None:
        self.gpu_ids = sorted(gpu_ids)
        self._free = set(self.gpu_ids)
        self._changed = threading.Condition()

    @property
    def total(self) -> int:
        return len(self.gpu_ids)

    def free(self) -> list[int]:
        with self._changed:
            return sorted(self._free)

    def reserve(self, count: int, timeout_s: float | None = None) -> list[int] | None:
        """`count` free GPU ids (lowest first), waiting until they are free; None on timeout."""
        if count > self.total:
            raise NotEnoughGpus(f"this worker has {self.total} GPU(s); the run asks for {count}")
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._free) >= count, timeout_s):
                return None
            taken = sorted(self._free)[:count]
            self._free.difference_update(taken)
            return taken

    def release(self, gpu_ids: list[int]) -> None:
        with self._changed:
            self._free.update(gpu_id for gpu_id in gpu_ids if gpu_id in self.gpu_ids)
            self._changed.notify_all()


@lru_cache
def get_gpu_pool() -> GpuPool:
    """TUNEBOARD_WORKER_GPUS ("0,1", "all", "none"), else every GPU NVML or nvidia-smi sees."""
    return GpuPool(worker_gpu_indices())
