"""Latency: a line appended to trainer_log.jsonl → its metric event received by an SSE client of
the dashboard's stream. Target: p95 ≤ 300 ms. See sse_common.py for what is real (all of it but
the trainer, a sleeping stand-in; the lines are appended by this script).

    .venv/bin/python bench/bench_sse_latency.py [--lines 80] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import httpx

from sse_common import fake_run  # first: it puts the repository on sys.path

from tests.live import parse_sse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=80)
    parser.add_argument("--interval", type=float, default=0.25, help="mean seconds between lines")
    args = parser.parse_args()
    appended: dict[int, float] = {}
    received: dict[int, float] = {}
    with fake_run("bench-sse-latency-") as run:
        done = threading.Event()

        def watch() -> None:
            url = f"{run.panel.url}/runs/{run.run_id}/events?after={run.cursor}"
            with httpx.Client(cookies=run.panel.api.cookies, timeout=httpx.Timeout(30, read=120)) as client:
                with client.stream("GET", url) as response:
                    for event in parse_sse(response.iter_lines()):
                        if event.get("event") == "metric":
                            step = json.loads(event["data"])["step"]
                            received.setdefault(step, time.monotonic())
                            if len(received) == args.lines:
                                done.set()
                                return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(1.0)  # the stream is open
        for step in range(1, args.lines + 1):
            appended[step] = time.monotonic()
            run.append(step, args.lines)
            time.sleep(random.uniform(0.5, 1.5) * args.interval)
        done.wait(timeout=30)
    latencies = sorted((received[s] - appended[s]) * 1000 for s in appended if s in received)
    missing = len(appended) - len(latencies)
    p50 = statistics.median(latencies)
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
    print(f"{len(latencies)} lines appended → SSE metric event (missing: {missing})")
    print(f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {latencies[-1]:.0f} ms (target p95 ≤ 300 ms; "
          f"ratio p95/target {p95 / 300:.2f})")


if __name__ == "__main__":
    main()
