"""Deployments end to end with the real servers: the web app and a Celery worker (its own queue,
as `tuneboard worker` starts it; it holds the base model, so the panel schedules the servers
there) as subprocesses, vLLM's CPU build (two server starts in this module: one shared by
the API tests, one for the browser and the killed-server test) and `llamafactory-cli api` once."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from sqlmodel import Session

from app.db import make_engine
from app.models.deployment import InferenceServer
from app.models.user import UserRole
from app.services.users import create_user
from app.settings import get_settings
from tests.conftest import log_in
from tests.factories import finished_run_factory, model_factory
from tests.live import free_port, worker_command

# Generous: on a busy 2-core machine vLLM has taken 200 s to start (17–28 s when idle).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

READY_TIMEOUT_S = 480
CHINESE_MESSAGES = [{"role": "system", "content": "你是Qwen，由阿里云创建。你是一个乐于助人的助手。"},
                    {"role": "user", "content": "你是谁？"}]


class Panel:
    """The web app and one serving worker on a fresh data dir, and a logged-in client."""

    def __init__(self, root: Path, broker_url: str | None = None) -> None:
        self.data = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": str(self.data),
            "TUNEBOARD_APP_URL": self.url, "TUNEBOARD_WORKER_GPUS": "none",
            "TUNEBOARD_MODEL_ROOTS": f'["{root}"]', "TUNEBOARD_HEARTBEAT_INTERVAL_S": "1",
            "TUNEBOARD_SERVE_READY_TIMEOUT_S": str(READY_TIMEOUT_S),
        }
        self.env.pop("TUNEBOARD_BROKER_URL", None)
        if broker_url:
            self.env["TUNEBOARD_BROKER_URL"] = broker_url
        self.processes: list[subprocess.Popen] = []
        self.logs = root / "logs"
        self.logs.mkdir()

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self) -> None:
        self._start("web", [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                            "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (self.logs / "web.log").read_text()[-3000:]
            time.sleep(0.2)
        self._start("worker", worker_command(f"serve@{socket.gethostname()}"))
        self.engine = make_engine(f"sqlite:///{self.data / 'tuneboard.db'}")
        with Session(self.engine) as session:
            create_user(session, "admin", "correct horse battery staple", role=UserRole.admin)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        log_in(self.client, "admin", "correct horse battery staple")
        self.key = self.client.post("/api/v1/gateway-keys", json={"name": "tests"}).json()["token"]
        # Only send tasks once the worker has declared its queues: with the embedded transport a
        # first send racing the worker's declaration of the same queue kills the worker
        # (kombu's SQLAlchemy transport: UNIQUE constraint failed: kombu_queue.name).
        deadline = time.monotonic() + 120
        while not self.client.get("/api/v1/workers").json():
            assert time.monotonic() < deadline, (self.logs / "worker.log").read_text()[-3000:]
            time.sleep(0.3)

    def stop(self) -> None:
        for process in reversed(self.processes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.engine.dispose()

    @contextmanager
    def _seeding(self) -> Iterator[Session]:
        """A session on the panel's database, with this process's settings on its data dir while
        the factories write (a run's folders go into the panel's artifact store)."""
        saved = os.environ.get("TUNEBOARD_DATA_DIR")
        os.environ["TUNEBOARD_DATA_DIR"] = str(self.data)
        get_settings.cache_clear()
        try:
            with Session(self.engine) as session:
                yield session
        finally:
            if saved is None:
                os.environ.pop("TUNEBOARD_DATA_DIR", None)
            else:
                os.environ["TUNEBOARD_DATA_DIR"] = saved
            get_settings.cache_clear()

    def register_model(self, path: Path) -> None:
        """Register the base model (its fingerprint too): the worker then says it holds it."""
        with self._seeding() as session:
            model_factory(session, str(path))

    def run(self, output_dir: Path, base_model: Path, name: str, **kwargs):
        with self._seeding() as session:
            return finished_run_factory(session, str(output_dir), str(base_model), name=name, **kwargs)

    def server_secret(self, server_id: int) -> str:
        """The server's bearer secret (only the panel's database and its worker have it)."""
        with Session(self.engine) as session:
            return session.get(InferenceServer, server_id).api_key

    def wait_for(self, deployment_id: int, statuses: tuple[str, ...], timeout: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            deployment = self.client.get(f"/api/v1/deployments/{deployment_id}").json()
            if deployment["status"] in statuses:
                return deployment
            assert time.monotonic() < deadline, f"{deployment}\n{(self.logs / 'worker.log').read_text()[-3000:]}"
            time.sleep(0.3)

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=600)


def _server_processes(guard_pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(guard_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    panel = Panel(tmp_path_factory.mktemp("serving_panel"))
    panel.start()
    yield panel
    panel.stop()


@pytest.fixture(scope="module")
def runs(panel: Panel, trained_adapter: Path, tiny_model: Path) -> dict[str, int]:
    checkpoints = [{"name": "checkpoint-2", "step": 2, "complete": True}]
    panel.register_model(tiny_model)
    return {
        "main": panel.run(trained_adapter, tiny_model, "tiny-sft", checkpoints=checkpoints).id,
        "second": panel.run(trained_adapter, tiny_model, "tiny-sft-b", checkpoints=checkpoints).id,
    }


@pytest.fixture(scope="module")
def live(panel: Panel, runs: dict[str, int]) -> dict:
    """One vLLM server shared by the API tests: the first adapter deployed and ready."""
    clicked = time.monotonic()
    created = panel.client.post("/api/v1/deployments", json={"run_id": runs["main"], "name": "tiny-chat"})
    assert created.status_code == 201, created.text
    deployment = panel.wait_for(created.json()["id"], ("ready", "failed"))
    assert deployment["status"] == "ready", deployment["server"]["log_tail"][-3000:]
    return {"deployment": deployment, "ready_s": time.monotonic() - clicked}


def test_deploy_goes_ready_on_vllm(panel, live):
    server = live["deployment"]["server"]
    assert server["backend"] == "vllm" and server["status"] == "ready"
    assert server["url"].startswith("http://127.0.0.1:")
    print(f"deploy click → ready: {live['ready_s']:.1f} s")
    models = [m.id for m in panel.openai().models.list().data]
    assert "tiny-chat" in models and server["base_name"] in models


def test_openai_client_chats_through_the_gateway(panel, live):
    client = panel.openai()
    completion = client.chat.completions.create(
        model="tiny-chat", messages=CHINESE_MESSAGES, temperature=0.7, top_p=0.8, max_tokens=16,
        extra_body={"repetition_penalty": 1.05},
    )
    assert completion.model == "tiny-chat"
    assert completion.choices[0].message.content is not None
    assert completion.usage.completion_tokens >= 1

    stream = client.chat.completions.create(
        model="tiny-chat", messages=CHINESE_MESSAGES, temperature=0.7, top_p=0.8, max_tokens=32,
        extra_body={"repetition_penalty": 1.05}, stream=True,
    )
    chunks = [chunk for chunk in stream]
    assert len(chunks) >= 3  # streamed in pieces, not one body
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None


def test_openai_client_completes_text_through_the_gateway(panel, live):
    """/v1/completions (a plain prompt), as the official client's completions.create sends it."""
    client = panel.openai()
    completion = client.completions.create(model="tiny-chat", prompt="你是谁？", max_tokens=8, temperature=0)
    assert completion.model == "tiny-chat" and completion.choices[0].text
    assert completion.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny-chat", prompt="你是谁？", max_tokens=8, temperature=0,
                                            stream=True))
    assert len(chunks) >= 3 and "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


def test_the_exact_request_users_send_works_over_plain_http(panel, live):
    body = {"model": "tiny-chat", "messages": CHINESE_MESSAGES, "temperature": 0.7, "top_p": 0.8,
            "repetition_penalty": 1.05, "max_tokens": 512}
    response = httpx.post(f"{panel.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {panel.key}"}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_server_refuses_requests_without_its_secret(panel, live):
    """vLLM listens on the worker's advertised address, behind the server's own secret: a caller
    that skips the gateway is refused (a gateway key is no use there), the gateway gets through."""
    server = live["deployment"]["server"]
    assert "api_key" not in server  # not in the public API
    body = {"model": "tiny-chat", "messages": CHINESE_MESSAGES, "max_tokens": 4}
    for headers in ({}, {"Authorization": f"Bearer {panel.key}"}, {"Authorization": "Bearer wrong"}):
        direct = httpx.post(f"{server['url']}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert direct.status_code == 401, (headers, direct.text)
        assert httpx.get(f"{server['url']}/v1/models", headers=headers, timeout=60).status_code == 401
        load = httpx.post(f"{server['url']}/v1/load_lora_adapter", headers=headers, timeout=60,
                          json={"lora_name": "intruder", "lora_path": "/tmp"})
        assert load.status_code == 401
    through_gateway = httpx.post(f"{panel.url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {panel.key}"}, timeout=120)
    assert through_gateway.status_code == 200, through_gateway.text
    assert through_gateway.json()["model"] == "tiny-chat"
    secret = {"Authorization": f"Bearer {panel.server_secret(server['id'])}"}
    served = httpx.get(f"{server['url']}/v1/models", headers=secret, timeout=60)
    assert served.status_code == 200 and "tiny-chat" in {m["id"] for m in served.json()["data"]}


def test_max_tokens_beyond_the_model_length_is_a_400_not_a_500(panel, live):
    """The gateway refuses max_tokens ≥ the server's max-model-len (2048, so prompt + 512 fits);
    vLLM 0.32 itself accepts a prompt + max_tokens beyond it and stops at the length."""
    client = panel.openai()
    with pytest.raises(BadRequestError, match="context length is 2048"):
        client.chat.completions.create(model="tiny-chat", messages=CHINESE_MESSAGES, max_tokens=10**6)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHINESE_MESSAGES)


def test_a_second_adapter_loads_into_the_same_server(panel, live, runs):
    server = live["deployment"]["server"]
    processes_before = {p.pid for p in _server_processes(server["pid"])}
    created = panel.client.post("/api/v1/deployments",
                                json={"run_id": runs["second"], "name": "tiny-ckpt", "checkpoint": "checkpoint-2"})
    assert created.status_code == 201, created.text
    second = panel.wait_for(created.json()["id"], ("ready", "failed"), timeout=60)
    assert second["status"] == "ready", second
    assert second["server_id"] == server["id"] and second["server"]["pid"] == server["pid"]
    assert {p.pid for p in _server_processes(server["pid"])} == processes_before  # no second process
    reply = panel.openai().chat.completions.create(model="tiny-ckpt", messages=CHINESE_MESSAGES, max_tokens=8)
    assert reply.model == "tiny-ckpt"


def test_undeploying_both_stops_the_server(panel, live):
    server = live["deployment"]["server"]
    deployments = panel.client.get("/api/v1/deployments", params={"include_stopped": False}).json()
    assert {d["name"] for d in deployments} == {"tiny-chat", "tiny-ckpt"}
    first, last = deployments
    assert panel.client.delete(f"/api/v1/deployments/{first['id']}").json()["status"] == "stopped"
    time.sleep(1.0)
    assert panel.client.get(f"/api/v1/deployments/{last['id']}").json()["server"]["status"] == "ready"
    assert _server_processes(server["pid"]), "the server stopped with an adapter left"
    with pytest.raises(NotFoundError):  # unloaded: the gateway no longer routes it
        panel.openai().chat.completions.create(model=first["name"], messages=CHINESE_MESSAGES, max_tokens=4)
    panel.client.delete(f"/api/v1/deployments/{last['id']}")
    assert panel.client.delete(f"/api/v1/deployments/{last['id']}").status_code == 409  # twice
    deadline = time.monotonic() + 30
    while psutil.pid_exists(server["pid"]) and psutil.Process(server["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the server outlived its last adapter"
        time.sleep(0.2)
    detail = panel.client.get(f"/api/v1/deployments/{last['id']}").json()
    deadline = time.monotonic() + 10
    while detail["server"]["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
        detail = panel.client.get(f"/api/v1/deployments/{last['id']}").json()
    assert detail["server"]["status"] == "stopped"


def test_the_llamafactory_backend_serves_an_adapter(panel, runs):
    created = panel.client.post("/api/v1/deployments",
                                json={"run_id": runs["main"], "name": "tiny-lf", "backend": "llamafactory"})
    assert created.status_code == 201, created.text
    deployment = panel.wait_for(created.json()["id"], ("ready", "failed"))
    assert deployment["status"] == "ready", deployment["server"]["log_tail"][-3000:]
    assert deployment["server"]["backend"] == "llamafactory"
    # Its API behind the server's secret too (LLaMA-Factory's API_KEY).
    assert httpx.get(f"{deployment['server']['url']}/v1/models", timeout=60).status_code == 401
    reply = panel.openai().chat.completions.create(model="tiny-lf", messages=CHINESE_MESSAGES, max_tokens=16,
                                                  temperature=0.7, top_p=0.8)
    assert reply.choices[0].message.role == "assistant"
    panel.client.delete(f"/api/v1/deployments/{deployment['id']}")
    stopped = panel.client.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert stopped["status"] == "stopped"


def test_from_the_browser_deploy_chat_and_a_killed_server(panel, runs):
    """The second vLLM start: deploy from the page, chat in the playground with streamed tokens,
    then kill vLLM under the live deployment: the page shows it failed with the log tail."""
    from playwright.sync_api import expect

    from tests.live import chromium_page, log_in_page

    with chromium_page() as page:
        log_in_page(page, panel.url, "admin", "correct horse battery staple")

        page.goto(f"{panel.url}/deployments")
        page.select_option("#deploy-run", str(runs["second"]))
        page.fill("#deploy-name", "browser-chat")
        page.click("#deploy-form button[type=submit]")
        row = page.locator("tr[data-status]", has_text="browser-chat")
        expect(row).to_have_attribute("data-status", "ready", timeout=READY_TIMEOUT_S * 1000)

        row.get_by_role("link", name="Chat").click()
        expect(page.locator("#pg-model")).to_have_value("browser-chat")
        page.check("#pg-compare")
        expect(page.locator("#pg-base-pane")).to_be_visible()
        page.fill("#pg-max-tokens", "24")
        page.fill("#pg-input", "你是谁？")
        page.click("#pg-send")
        answer = page.locator("#pg-chat-adapter .pg-msg.assistant").first
        expect(answer).not_to_have_attribute("aria-busy", "true", timeout=60_000)
        expect(page.locator("#pg-chat-base .pg-msg.assistant").first).not_to_have_attribute("aria-busy", "true")
        assert page.locator("#pg-chat-adapter .pg-msg.error").count() == 0
        assert answer.inner_text().strip()
        # Streamed: both panes timed from their first token, with the tokens the server counted.
        stats = page.locator("#pg-stats").inner_text()
        assert re.fullmatch(r"first token in [\d.]+ s · [\d.]+ tokens/s \(\d+ tokens\) \| "
                            r"base model: first token in [\d.]+ s · [\d.]+ tokens/s \(\d+ tokens\)", stats), stats
        assert "browser-chat" in page.locator("#pg-curl").inner_text()
        assert "OpenAI(base_url=" in page.locator("#pg-python").inner_text()

        deployment = next(d for d in panel.client.get("/api/v1/deployments").json() if d["name"] == "browser-chat")
        guard_pid = panel.client.get(f"/api/v1/deployments/{deployment['id']}").json()["server"]["pid"]
        for process in _server_processes(guard_pid):
            process.kill()  # vLLM dies under a live deployment
        page.goto(f"{panel.url}/deployments")
        row = page.locator("tr[data-status]", has_text="browser-chat")
        expect(row).to_have_attribute("data-status", "failed", timeout=30_000)
        expect(row).to_contain_text("exited with code")
        expect(page.locator("pre.server-log")).to_be_visible()

        page.on("dialog", lambda dialog: dialog.accept())
        row.get_by_role("button", name="Undeploy").click()
        expect(page.locator("tr[data-status]", has_text="browser-chat")).to_have_attribute("data-status", "stopped")
