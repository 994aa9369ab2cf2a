"""Webhooks through the real app and its background delivery loop, to a real HTTP receiver on
127.0.0.1 that checks each signature, refuses the first attempts when told to, and records the
order of what it accepted."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.db import get_engine, migrate
from app.main import create_app
from app.models import Deployment, InferenceServer, Run, User
from app.models.base import utcnow
from app.models.webhook import WebhookCreate, WebhookDelivery
from app.services import runs as run_service
from app.services import webhooks
from app.services.deployments import report_adapter
from app.services.users import create_user
from app.settings import get_settings
from app.wire import AdapterReport, FinishRequest
from tests.factories import run_config_factory

WORKER = "cpu@box"
DELIVERY_DEADLINE_S = 60  # how long a test waits for the loop at most (not a timing assertion)


class Receiver:
    """A webhook endpoint: verifies X-Tuneboard-Signature with `secret`, answers 500 to the first
    `refuse_first` requests, records every attempt and, in order, the bodies it accepted."""

    def __init__(self) -> None:
        self.secret = ""
        self.refuse_first = 0
        self.attempts: list[dict] = []
        self.accepted: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), raw, hashlib.sha256).hexdigest()
                signed = hmac.compare_digest(self.headers.get("X-Tuneboard-Signature", ""), expected)
                receiver.attempts.append({"event": self.headers.get("X-Tuneboard-Event"), "signed": signed})
                if not signed:
                    status = 401
                elif len(receiver.attempts) <= receiver.refuse_first:
                    status = 500
                else:
                    status = 200
                    receiver.accepted.append(json.loads(raw))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.httpd.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.httpd.shutdown()
    receiver.httpd.server_close()


@pytest.fixture(autouse=True)
def quick_retries(data_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEBOARD_WEBHOOK_RETRY_BASE_S", "0.05")
    get_settings.cache_clear()


def settled(session: Session, count: int) -> list[WebhookDelivery]:
    """The first `count` deliveries once none of them is pending (waits for the loop)."""
    deadline = time.monotonic() + DELIVERY_DEADLINE_S
    while True:
        session.expire_all()
        deliveries = session.exec(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        if len(deliveries) >= count and all(d.status != "pending" for d in deliveries[:count]):
            return list(deliveries)
        assert time.monotonic() < deadline, [(d.id, d.status, d.response_codes) for d in deliveries]
        time.sleep(0.05)


def running_run(session: Session, owner: User, name: str, **values) -> Run:
    config = session.exec(select(Run.config_id)).first() or run_config_factory(session, name=f"cfg-{name}").id
    run = Run(name=name, config_id=config, status="running", owner_id=owner.id, worker_id=WORKER,
              started_at=utcnow(), **{"heartbeat_at": utcnow(), **values})
    session.add(run)
    session.commit()
    return run


def finish(session: Session, run: Run, outcome: str, reason: str = "") -> None:
    """The worker's finish report, as the worker channel hands it to the service."""
    run_service.finish_run(session, run.id, FinishRequest(attempt=run.attempt, worker_id=WORKER, outcome=outcome,
                                                          reason=reason))


def admin(session: Session) -> User:
    return session.exec(select(User).where(User.username == "admin")).one()


def test_signed_retried_after_500s_and_in_order(client: TestClient, session: Session, receiver: Receiver) -> None:
    created = client.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["run.succeeded", "run.failed"]})
    assert created.status_code == 201, created.text
    receiver.secret = created.json()["secret"]
    assert "secret" not in client.get("/api/v1/webhooks").json()[0]  # shown once
    receiver.refuse_first = 2
    owner = admin(session)
    first, second, third = (running_run(session, owner, n) for n in ("first", "second", "third"))
    finish(session, first, "succeeded")
    finish(session, second, "failed", "out of memory")
    finish(session, third, "cancelled")  # not asked for

    one, two = settled(session, 2)
    assert (one.status, one.attempts, one.response_codes) == ("delivered", 3, [500, 500, 200])
    assert (two.status, two.attempts, two.response_codes) == ("delivered", 1, [200])
    assert all(attempt["signed"] for attempt in receiver.attempts)
    # The second event waited while the first was retried: the receiver saw them in order.
    assert [a["event"] for a in receiver.attempts] == ["run.succeeded"] * 3 + ["run.failed"]
    assert [(b["event"], b["run"]["id"], b["run"]["owner"]) for b in receiver.accepted] == [
        ("run.succeeded", first.id, "admin"), ("run.failed", second.id, "admin")]
    assert receiver.accepted[1]["run"]["status_reason"] == "out of memory"
    log = client.get(f"/api/v1/webhooks/{created.json()['id']}/deliveries").json()
    assert [d["response_codes"] for d in log] == [[200], [500, 500, 200]]  # newest first


def test_a_receiver_that_never_accepts_fails_after_the_bounded_attempts(client, session, receiver) -> None:
    created = client.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["run.lost"]}).json()
    receiver.secret = created["secret"]
    receiver.refuse_first = 1000
    running_run(session, admin(session), "doomed", heartbeat_at=utcnow() - timedelta(hours=1))
    assert len(run_service.mark_lost_runs(session)) == 1
    [delivery] = settled(session, 1)
    assert delivery.status == "failed"
    assert delivery.response_codes == [500] * webhooks.MAX_ATTEMPTS
    assert len(receiver.attempts) == webhooks.MAX_ATTEMPTS


def test_whose_runs_and_which_events(client, session, receiver) -> None:
    """A member's webhook for their own runs hears nothing of the admin's; one for everyone's does."""
    member = create_user(session, "member", "a member's long password")
    own = webhooks.create_webhook(session, member, WebhookCreate(url=receiver.url, events=["run.succeeded"]))
    everyone = webhooks.create_webhook(session, member, WebhookCreate(url=receiver.url + "?all",
                                                                      events=["run.succeeded"], scope="everyone"))
    receiver.secret = everyone.secret
    finish(session, running_run(session, admin(session), "admins"), "succeeded")
    [delivery] = settled(session, 1)
    assert delivery.webhook_id == everyone.id and delivery.status == "delivered"
    mine = running_run(session, member, "members")
    receiver.secret = own.secret
    finish(session, mine, "succeeded")
    deliveries = settled(session, 3)
    assert sorted(d.webhook_id for d in deliveries[1:]) == sorted([own.id, everyone.id])


def test_deployment_ready_and_failed_and_a_slack_body(client, session, receiver) -> None:
    created = client.post("/api/v1/webhooks", json={
        "url": receiver.url, "events": ["deployment.ready", "deployment.failed"], "slack": True}).json()
    receiver.secret = created["secret"]
    server = InferenceServer(base_model_path="/models/tiny", base_name="tiny", status="ready", url="http://127.0.0.1:9")
    session.add(server)
    session.flush()
    owner = admin(session)
    good = Deployment(name="good", server_id=server.id, lora_name="good", status="starting", owner_id=owner.id)
    bad = Deployment(name="bad", server_id=server.id, lora_name="bad", status="starting", owner_id=owner.id)
    session.add_all([good, bad])
    session.commit()
    report_adapter(session, good.id, AdapterReport(status="ready"))
    report_adapter(session, bad.id, AdapterReport(status="failed", reason="rank 128 is above 64"))
    settled(session, 2)
    assert [set(body) for body in receiver.accepted] == [{"text"}, {"text"}]
    assert "deployment good ready" in receiver.accepted[0]["text"]
    assert "deployment bad failed: rank 128 is above 64" in receiver.accepted[1]["text"]


def test_send_test_from_the_page_and_its_delivery_log(client, session, receiver) -> None:
    page = client.post("/notifications/webhooks", headers={"HX-Request": "true"},
                       data={"url": receiver.url, "events": ["run.failed"], "scope": "mine"})
    assert page.status_code == 200 and "it is not shown again" in page.text
    hook = webhooks.list_webhooks(session, admin(session))[0]
    assert hook.secret in page.text
    receiver.secret = hook.secret
    client.post(f"/notifications/webhooks/{hook.id}/test", headers={"HX-Request": "true"})
    [delivery] = settled(session, 1)
    assert delivery.event == "test" and delivery.response_codes == [200]
    html = client.get("/notifications").text
    assert f'id="delivery-{delivery.id}"' in html and "delivered" in html
    assert hook.secret not in html
    refused = client.post("/notifications/webhooks", headers={"HX-Request": "true"},
                          data={"url": "ftp://example.com/x", "events": ["run.failed"]})
    assert "Give an http:// or https:// URL" in refused.text


def test_a_delivery_committed_while_nothing_delivers_is_sent_after_a_restart(data_dir, receiver) -> None:
    """The delivery row commits with the run's status: a panel that stops before sending it
    sends it when it starts again."""
    migrate(get_engine())
    with Session(get_engine()) as session:
        owner = create_user(session, "admin", "correct horse battery staple")
        hook = webhooks.create_webhook(session, owner, WebhookCreate(url=receiver.url, events=["run.succeeded"]))
        receiver.secret = hook.secret
        finish(session, running_run(session, owner, "before-restart"), "succeeded")  # no delivery loop runs
        assert receiver.attempts == []
    with TestClient(create_app()), Session(get_engine()) as session:
        [delivery] = settled(session, 1)
    assert delivery.status == "delivered"
    assert [b["run"]["name"] for b in receiver.accepted] == ["before-restart"]
