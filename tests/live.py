"""A live panel for end-to-end tests: the real web app (uvicorn) and a real Celery worker as
subprocesses on a fresh data dir, against real Redis or the embedded SQLite transport.

    from tests.live import live_panel  # noqa: F401  (the fixture)

    def test_x(live_panel): live_panel.api.get("/api/v1/runs")

    @pytest.mark.parametrize("live_panel", [REDIS_URL], indirect=True)           # a broker URL
    @pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)   # running_panel kwargs

The test process shares the data dir (the `data_dir` fixture), so a test can seed rows with
`Session(get_engine())` and factories, and read what the panel wrote.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlmodel import Session

from app.db import get_engine, migrate
from app.models.user import UserRole
from app.services.users import create_token, create_user
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, PROJECT_ROOT, log_in
from workers.serving import free_port  # noqa: F401  (one free-port helper, shared by the tests)

# The runs-app tests' own Redis database (flushed when a panel starts on it).
REDIS_URL = "redis://127.0.0.1:6379/11"
START_TIMEOUT_S = 60.0
# Debian's Chromium, never a browser a tool downloads; headless (Playwright's default), and kept off
# the network this machine does not have.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-quic", "--no-first-run", "--disable-sync",
]


@contextmanager
def chromium_page(*, init_script: str | None = None, **context_options: Any) -> Iterator[Any]:
    """A page of a fresh headless Chromium (Playwright's `Page`; the browser closes after), its
    context made with `context_options` (viewport, locale, ...) and `init_script` run in every
    document it loads."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's Chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
            if init_script:
                context.add_init_script(init_script)
            yield context.new_page()
        finally:
            browser.close()


def log_in_page(page: Any, url: str, username: str, password: str) -> None:
    """Log in through the panel's login form."""
    page.goto(f"{url}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.locator("form button[type=submit], form button:not([type])").first.click()
    page.wait_for_load_state()


@contextmanager
def app_in_thread() -> Iterator[int]:
    """The real app (this process's settings) served by uvicorn in a thread; yields its port."""
    import threading

    import uvicorn

    from app.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class LivePanel:
    url: str
    # Logged in as the admin through the login form (session cookie + CSRF header): pages and /api/v1.
    api: httpx.Client
    # A personal API token of the admin (Authorization: Bearer, or TUNEBOARD_TOKEN for the CLI).
    token: str
    data_dir: Path
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    username: str = ADMIN_USERNAME
    password: str = ADMIN_PASSWORD

    @property
    def web_pid(self) -> int:
        return self.processes["web"].pid

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker `name@<hostname>` (its own queue, as `tuneboard worker` starts it); `env`
        adds settings, e.g. its slots."""
        self.processes[name] = _start(
            worker_command(f"{name}@{socket.gethostname()}"), {**self.env, **(env or {})},
            self.log_dir / f"{name}.log",
        )
        return self.processes[name]

    def start_web(self) -> subprocess.Popen:
        """uvicorn on this panel's port (again, after `stop("web")`: the fault tests restart it)."""
        port = self.url.rsplit(":", 1)[1]
        self.processes["web"] = _start(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", port, "--log-level", "warning", "--timeout-graceful-shutdown", "5"],
            self.env, self.log_dir / "web.log",
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.api.get("/healthz").status_code == 200:
                    return self.processes["web"]
            except httpx.TransportError:
                pass
            assert self.processes["web"].poll() is None and time.monotonic() < deadline, self.log("web")
            time.sleep(0.1)

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        _stop(self.processes.pop(name), sig)

    def log(self, name: str = "worker", chars: int = 6000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """`tuneboard …` against this panel (TUNEBOARD_URL, TUNEBOARD_TOKEN)."""
        env = {**self.env, "TUNEBOARD_URL": self.url, "TUNEBOARD_TOKEN": self.token}
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout_s, check=False)


def start_run(api: httpx.Client, config_id: int) -> int:
    """Start a run of the config through the API; its id."""
    response = api.post("/api/v1/runs", json={"config_id": config_id})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def run_of(api: httpx.Client, run_id: int) -> dict[str, Any]:
    return api.get(f"/api/v1/runs/{run_id}").raise_for_status().json()


def worker_command(name: str, concurrency: int = 4) -> list[str]:
    """A Celery worker as `tuneboard worker` starts it: the default queue plus its own."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "default",
            "--pool", "threads", "--concurrency", str(concurrency), "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "-n", name]


def _start(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _admin_token() -> str:
    """The admin (created unless the `client` fixture already did) and a fresh API token."""
    migrate()
    with Session(get_engine()) as session:
        from app.services.users import get_user_by_name

        user = get_user_by_name(session, ADMIN_USERNAME) or create_user(
            session, ADMIN_USERNAME, ADMIN_PASSWORD, role=UserRole.admin
        )
        _token, raw = create_token(session, user, "live-panel")
        return raw


@contextmanager
def running_panel(
    data_dir: Path, log_dir: Path, *, broker_url: str | None = None, worker: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[LivePanel]:
    """Web + (optionally) one worker on `data_dir`; broker_url None = the embedded transport."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process_env = {key: value for key, value in os.environ.items() if not key.startswith("TUNEBOARD_")}
    process_env.update({
        "TUNEBOARD_ENVIRONMENT": "test",
        "TUNEBOARD_DATA_DIR": str(data_dir),
        "TUNEBOARD_APP_URL": url,
        "TUNEBOARD_WORKER_GPUS": "none",
        "TUNEBOARD_MODEL_ROOTS": os.environ.get("TUNEBOARD_MODEL_ROOTS", f'["{data_dir / "models"}"]'),
        **({"TUNEBOARD_BROKER_URL": broker_url} if broker_url else {}),
        **(env or {}),
    })
    if broker_url and broker_url.startswith("redis://"):
        redis.Redis.from_url(broker_url).flushdb()
    log_dir.mkdir(parents=True, exist_ok=True)
    token = _admin_token()
    if not broker_url:  # as `tuneboard up` does: no race on the embedded broker's queue rows
        from app.settings import get_settings
        from workers.celery_app import declare_queues, make_celery

        declare_queues(make_celery(get_settings()), [f"worker@{socket.gethostname()}"])
    panel = LivePanel(url, httpx.Client(base_url=url, timeout=30), token, data_dir, process_env, log_dir)
    try:
        panel.start_web()
        log_in(panel.api, ADMIN_USERNAME, ADMIN_PASSWORD)
        if worker:
            panel.start_worker()
        yield panel
    finally:
        for name in [n for n in panel.processes if n != "web"] + ["web"]:
            if name in panel.processes:
                panel.stop(name)
        panel.api.close()


@pytest.fixture
def live_panel(request: pytest.FixtureRequest, data_dir: Path, tmp_path: Path) -> Iterator[LivePanel]:
    """Parameterise indirectly with a broker URL (str) or `running_panel` keyword arguments (dict);
    unparameterised: the embedded transport and one worker."""
    param: Any = getattr(request, "param", None)
    options = param if isinstance(param, dict) else {"broker_url": param}
    with running_panel(data_dir, tmp_path / "logs", **options) as panel:
        yield panel


@contextmanager
def standalone_panel(root: Path, **options: Any) -> Iterator[LivePanel]:
    """A live panel outside pytest (the benchmarks): this process's settings point at
    `root/data` too, so it can seed rows the panel then serves."""
    from app.settings import get_settings

    data_dir, models = root / "data", root / "models"
    models.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": str(data_dir),
        "TUNEBOARD_MODEL_ROOTS": f'["{models}"]',
    })
    get_settings.cache_clear()
    get_engine.cache_clear()
    with running_panel(data_dir, root / "logs", **options) as panel:
        yield panel


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as {field: value} dicts (comments, i.e. keep-alives, skipped)."""
    current: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(":")
            current[key] = value.removeprefix(" ")
        elif current:
            yield current
            current = {}
