#!/usr/bin/env python3
"""Fault injection for tests/test_batching_live.py: `llamafactory-cli` that runs out of memory at large
micro-batches. With FAULT_OOM_AT_MICRO=N in its environment, a `train train.yaml` whose
per_device_train_batch_size is N or more prints the error PyTorch printed when a micro-batch did not
fit on an H200 (bench/gpu/results/h200_auto_0.5b.json) and exits 1 after the model would have
loaded; anything else runs the training env's real llamafactory-cli. A CPU cannot run out of
memory on the tiny model on cue: this stands in for the GPU that does."""
import os
import sys
import time
from pathlib import Path

REAL_CLI = Path(__file__).resolve().parents[2] / ".envs" / "train" / "bin" / "llamafactory-cli"
OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.19 GiB. GPU 0 has a total capacity of "
       "139.80 GiB of which 697.12 MiB is free. Including non-PyTorch memory, this process has 139.11 GiB memory "
       "in use.")


def micro_batch(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("per_device_train_batch_size:"):
            return int(line.split(":", 1)[1])
    return 8


limit = int(os.environ.get("FAULT_OOM_AT_MICRO") or 0)
if limit and sys.argv[1:2] == ["train"] and micro_batch(Path(sys.argv[2])) >= limit:
    time.sleep(1)
    print("Traceback (most recent call last):", file=sys.stderr)
    print(OOM, file=sys.stderr, flush=True)
    sys.exit(1)
os.execv(str(REAL_CLI), [str(REAL_CLI), *sys.argv[1:]])
