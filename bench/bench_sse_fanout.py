"""Fan-out: 100 SSE clients watching one live run; CPU of the web process (psutil on the uvicorn
pid) while lines stream in. Target: < 25 % of one core. Measured against the same load with one
client, so the ratio shows what the extra 99 cost. See sse_common.py for the setup.

    .venv/bin/python bench/bench_sse_fanout.py [--clients 100] [--seconds 30] [--rate 4]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import httpx
import psutil

from sse_common import fake_run

CONNECT_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 30.0


async def _client(url: str, cookies: httpx.Cookies, counts: list[int], index: int, stop: asyncio.Event,
                  connected: list[bool]) -> None:
    async with httpx.AsyncClient(cookies=cookies, timeout=httpx.Timeout(60, read=None)) as client:
        async with client.stream("GET", url) as response:
            connected[index] = response.status_code == 200
            current: dict[str, str] = {}
            async for line in response.aiter_lines():
                if stop.is_set():
                    return
                if line and not line.startswith(":"):
                    key, _, value = line.partition(":")
                    current[key] = value.removeprefix(" ")
                elif not line and current:
                    if current.get("event") == "metric":
                        counts[index] += 1
                    current = {}


def _watchers(url: str, cookies: httpx.Cookies, clients: int, counts: list[int], ready: threading.Event,
              finished: threading.Event, errors: list[str]) -> None:
    async def main() -> None:
        stop, connected = asyncio.Event(), [False] * clients
        tasks = [asyncio.create_task(_client(url, cookies, counts, i, stop, connected)) for i in range(clients)]
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not all(connected) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ready.set()
        while not finished.is_set():
            await asyncio.sleep(0.1)
        stop.set()
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(result, asyncio.CancelledError):
                errors.append(repr(result))

    asyncio.run(main())


def measure(clients: int, seconds: float, rate: float) -> tuple[float, list[int], int]:
    with fake_run(f"bench-sse-fanout-{clients}-") as run:
        web = psutil.Process(run.panel.web_pid)
        counts, errors = [0] * clients, []
        ready, finished = threading.Event(), threading.Event()
        url = f"{run.panel.url}/runs/{run.run_id}/events?after={run.cursor}"
        watcher = threading.Thread(target=_watchers, args=(url, run.panel.api.cookies, clients, counts, ready, finished, errors))
        watcher.start()
        ready.wait()
        time.sleep(1.0)  # the connections settle (replay done)
        lines = int(seconds * rate)
        before, started = web.cpu_times(), time.monotonic()
        for step in range(1, lines + 1):
            run.append(step, lines)
            time.sleep(1 / rate)
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S  # until every client has every event
        while min(counts) < lines and time.monotonic() < deadline:
            time.sleep(0.05)
        after, elapsed = web.cpu_times(), time.monotonic() - started
        finished.set()
        watcher.join(timeout=30)
    if errors:
        print(f"{len(errors)} client errors, e.g. {errors[0]}")
    print(f"{clients} clients: metric events received min {min(counts)}, max {max(counts)} of {lines}")
    cpu = (after.user + after.system - before.user - before.system) / elapsed * 100
    return cpu, counts, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=4.0, help="trainer_log lines per second")
    args = parser.parse_args()
    one, _, _ = measure(1, args.seconds, args.rate)
    many, counts, lines = measure(args.clients, args.seconds, args.rate)
    complete = sum(1 for count in counts if count >= lines)
    print(f"{args.rate:g} lines/s for {args.seconds:g} s; web process CPU (% of one core):")
    print(f"  1 client: {one:.1f} %   {args.clients} clients: {many:.1f} % (target < 25 %; "
          f"ratio {many / max(one, 0.1):.2f}× one client, {many / 25:.2f} of the target)")
    print(f"  clients that received every metric event: {complete}/{args.clients}")


if __name__ == "__main__":
    main()
