"""Every CPU benchmark, one after another (they would disturb each other run side by side).

    make bench            # or: .venv/bin/python bench/run_all.py [--only ingest,sse_latency]

Each benchmark prints its own figures and ratios against its target; this prints where each one
ended and how long it took. The GPU benchmark runs on a GPU machine: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = {
    "ingest": "bench_ingest.py",
    "upload": "bench_upload.py",
    "artifacts": "bench_artifacts.py",
    "run_overhead": "bench_run_overhead.py",
    "sse_latency": "bench_sse_latency.py",
    "sse_fanout": "bench_sse_fanout.py",
    "gateway": "bench_gateway.py",
    "load": "bench_load.py",
    "fuzz": "bench_fuzz.py",
    "pages": "bench_pages.py",
    "scheduler": "bench_scheduler.py",
    "eval": "bench_eval.py",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    results = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(BENCH_DIR / BENCHMARKS[name])])
        results.append((name, code, time.monotonic() - started))
    print("\n=== summary ===")
    for name, code, seconds in results:
        print(f"{name:14} {'ok' if code == 0 else f'exit {code}':8} {seconds:7.1f} s")
    return max((code for _, code, _ in results), default=0)


if __name__ == "__main__":
    sys.exit(main())
