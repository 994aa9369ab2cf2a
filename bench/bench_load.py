"""Load: 50 logged-in users browsing the pages (list and detail pages of datasets, configs, runs,
workers, models; locust, headless, fixed duration) while 20 live dashboards follow a running run's
event stream (a pool of Python SSE clients), all on loopback. The run is sse_common's: the real
worker, tailer, reporter and app pipeline with a stand-in trainer, the benchmark appending
LLaMA-Factory-shaped lines at a fixed rate. Prints p95 page latency and the error count.

    .venv/bin/pip install locust   # once
    .venv/bin/python bench/bench_load.py [--users 50] [--dashboards 20] [--seconds 60] [--rate 4]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from sse_common import fake_run  # first: it puts the repository on sys.path

from sqlmodel import Session  # noqa: E402

from app.db import get_engine  # noqa: E402
from app.models import Run, TrainConfig  # noqa: E402
from tests.factories import dataset_factory, finished_run_factory  # noqa: E402

LOCUST = str(Path(sys.executable).with_name("locust"))
LOCUSTFILE = Path(__file__).with_name("bench_load_users.py")


def seed(live_run_id: int, output: Path) -> dict[str, list[int]]:
    """The ids to browse: the live run's rows and a few more, so the lists are not one line long."""
    with Session(get_engine()) as session:
        live = session.get(Run, live_run_id)
        config = session.get(TrainConfig, live.config_id)
        run_ids, config_ids, dataset_ids = [live_run_id], [config.id], list(config.dataset_ids)
        for index in range(5):
            dataset_ids.append(dataset_factory(session, f"load-{index}").id)
            run = finished_run_factory(session, str(output / str(index)), "/models/stand-in", name=f"load-{index}")
            run.lineage = live.lineage  # what the runs service records at start (model, datasets)
            session.add(run)
            session.commit()
            run_ids.append(run.id)
            config_ids.append(run.config_id)
    return {"datasets": dataset_ids, "configs": config_ids, "runs": run_ids}


class Dashboards:
    """`count` SSE clients on one run's stream; counts metric events and errors."""

    def __init__(self, url: str, cookies: httpx.Cookies, count: int) -> None:
        self.url, self.cookies, self.count = url, cookies, count
        self.events = [0] * count
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, index: int) -> None:
        try:
            async with httpx.AsyncClient(cookies=self.cookies, timeout=httpx.Timeout(30, read=None)) as client:
                async with client.stream("GET", self.url) as response:
                    response.raise_for_status()
                    current: dict[str, str] = {}
                    async for line in response.aiter_lines():
                        if line and not line.startswith(":"):
                            key, _, value = line.partition(":")
                            current[key] = value.strip()
                        elif not line and current:
                            self.events[index] += current.get("event") == "metric"
                            current = {}
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001  (every failure is counted and shown)
            self.errors.append(repr(error))

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.count)]
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        for one in tasks:
            one.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--dashboards", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=float, default=4.0, help="trainer_log lines per second")
    args = parser.parse_args()

    with fake_run("bench-load-") as run:
        panel = run.panel
        ids = seed(run.run_id, panel.data_dir / "load-outputs")
        cookie = "; ".join(f"{name}={value}" for name, value in panel.api.cookies.items())
        dashboards = Dashboards(f"{panel.url}/runs/{run.run_id}/events?after={run.cursor}", panel.api.cookies,
                                args.dashboards)
        dashboards.thread.start()
        report = panel.log_dir / "locust"
        env = {**os.environ, "BENCH_LOAD_COOKIE": cookie, "BENCH_LOAD_IDS": json.dumps(ids)}
        locust = subprocess.Popen(
            [LOCUST, "-f", str(LOCUSTFILE), "--headless", "--users", str(args.users),
             "--spawn-rate", str(args.users), "--run-time", f"{args.seconds}s", "--host", panel.url,
             "--csv", str(report), "--only-summary", "--loglevel", "WARNING"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines = int(args.seconds * args.rate)
        started = time.monotonic()
        for step in range(1, lines + 1):
            run.append(step, lines)
            time.sleep(max(0.0, started + step / args.rate - time.monotonic()))
        output, _ = locust.communicate(timeout=120)
        deadline = time.monotonic() + 30  # the last lines reach every dashboard
        while min(dashboards.events) < lines and time.monotonic() < deadline:
            time.sleep(0.1)
        lag_s = time.monotonic() - started - args.seconds
        dashboards.stop.set()
        dashboards.thread.join(timeout=30)

    print(output[-3000:])
    with open(f"{report}_stats.csv", newline="") as stats_file:
        rows = {row["Name"]: row for row in csv.DictReader(stats_file)}
    total = rows["Aggregated"]
    complete = sum(1 for count in dashboards.events if count >= lines)
    print(f"{args.users} users browsing for {args.seconds} s + {args.dashboards} live dashboards "
          f"({args.rate:g} metric lines/s), loopback; machine load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs:")
    for name, row in rows.items():
        print(f"  {name:28} requests {row['Request Count']:>6}  p50 {row['50%']:>5} ms  p95 {row['95%']:>5} ms  "
              f"errors {row['Failure Count']}")
    print(f"page p95 {total['95%']} ms, p99 {total['99%']} ms, {float(total['Requests/s']):.1f} requests/s, "
          f"page errors {total['Failure Count']}")
    print(f"dashboards: {complete}/{args.dashboards} received all {lines} metric events "
          f"(min {min(dashboards.events)}; the last {lag_s:.1f} s after the last line was written), "
          f"stream errors {len(dashboards.errors)}"
          + (f", e.g. {dashboards.errors[0]}" if dashboards.errors else ""))
    return 0 if int(total["Failure Count"]) == 0 and not dashboards.errors and complete == args.dashboards else 1


if __name__ == "__main__":
    sys.exit(main())
