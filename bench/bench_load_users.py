"""The locustfile of bench/bench_load.py: logged-in users browsing the list and detail pages.
It runs inside `locust` (gevent), never imported by the panel or the tests. The runner passes the
session cookie and the ids to browse in the environment."""

from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

COOKIE = os.environ["BENCH_LOAD_COOKIE"]
IDS: dict[str, list[int]] = json.loads(os.environ["BENCH_LOAD_IDS"])


class Browser(HttpUser):
    wait_time = between(1, 3)  # a person reading a page before the next click

    def on_start(self) -> None:
        self.client.headers["Cookie"] = COOKIE

    def _get(self, path: str, name: str) -> None:
        with self.client.get(path, name=name, allow_redirects=False, catch_response=True) as response:
            if response.status_code != 200:  # a 303 to /login would be a lost session
                response.failure(f"{response.status_code}")

    @task(3)
    def lists(self) -> None:
        area = random.choice(["datasets", "configs", "runs", "workers", "models"])
        self._get(f"/{area}", f"/{area}")

    @task(3)
    def details(self) -> None:
        area = random.choice(["datasets", "configs", "runs"])
        self._get(f"/{area}/{random.choice(IDS[area])}", f"/{area}/[id]")

    @task(1)
    def htmx_fragment(self) -> None:
        with self.client.get("/workers", name="/workers (htmx cards)", headers={"HX-Request": "true",
                             "HX-Target": "worker-cards"}, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}")
