"""The audit log through the real app and SQLite: who did what, when, from which address and how
it ended; filters; CSV and JSONL exports; admins only; nothing edits or deletes an entry."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from app.db import get_engine
from app.main import create_app
from app.models.audit import AuditEntry
from app.models.base import utcnow
from app.models.user import UserRole
from app.services.users import create_token, create_user
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in
from tests.factories import run_config_factory

PASSWORD = "long enough password"
ALICE_ADDRESS = "203.0.113.7"
ADMIN_ADDRESS = "198.51.100.2"


@pytest.fixture
def admin_browser(client: TestClient) -> TestClient:
    """The admin, logged in from an address of their own."""
    browser = TestClient(client.app, client=(ADMIN_ADDRESS, 50000))
    log_in(browser, ADMIN_USERNAME, ADMIN_PASSWORD)
    return browser


@pytest.fixture
def alice(client: TestClient) -> dict[str, str]:
    """A member's bearer header."""
    with Session(get_engine()) as session:
        user = create_user(session, "alice", PASSWORD, role=UserRole.member)
        _token, raw = create_token(session, user, "cli")
    return {"Authorization": f"Bearer {raw}"}


def _entries(**filters) -> list[AuditEntry]:
    with Session(get_engine()) as session:
        statement = select(AuditEntry).order_by(AuditEntry.id)
        for name, value in filters.items():
            statement = statement.where(getattr(AuditEntry, name) == value)
        return list(session.exec(statement))


def test_a_run_start_and_cancel_are_recorded_with_who_and_from_where(client, alice, session) -> None:
    config = run_config_factory(session)
    member = TestClient(client.app, client=(ALICE_ADDRESS, 40000))
    run = member.post("/api/v1/runs", headers=alice, json={"config_id": config.id}).json()
    assert member.post(f"/api/v1/runs/{run['id']}/cancel", headers=alice).status_code == 200
    assert member.get(f"/api/v1/runs/{run['id']}", headers=alice).status_code == 200  # reads are not recorded

    entries = _entries(entity_type="run")
    assert [(e.action, e.entity_id, e.username, e.address, e.outcome) for e in entries] == [
        ("run.create", run["id"], "alice", ALICE_ADDRESS, "done"),
        ("run.cancel", run["id"], "alice", ALICE_ADDRESS, "done"),
    ]
    assert entries[1].detail["request"] == "POST /api/v1/runs/{run_id}/cancel"
    assert entries[1].detail["status"] == 200 and entries[0].detail["status"] == 201
    assert entries[0].created_at <= entries[1].created_at


def test_refusals_are_recorded_with_their_reason(client, alice, session) -> None:
    config = run_config_factory(session)
    run = client.post("/api/v1/runs", json={"config_id": config.id}).json()  # the admin's
    member = TestClient(client.app, client=(ALICE_ADDRESS, 40000))
    assert member.post(f"/api/v1/runs/{run['id']}/cancel", headers=alice).status_code == 403
    assert member.post("/api/v1/runs/999/cancel", headers=alice).status_code == 404
    denied, missing = _entries(username="alice")
    assert (denied.action, denied.entity_id, denied.outcome) == ("run.cancel", run["id"], "denied")
    assert "belongs to admin" in denied.detail["error"]
    assert (missing.action, missing.entity_id, missing.outcome) == ("run.cancel", 999, "refused")
    # A wrong password is recorded too, under the name that was tried.
    anonymous = TestClient(client.app, client=(ALICE_ADDRESS, 40001))
    csrf = anonymous.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
    anonymous.post("/login", data={"username": "mallory", "password": "guess", "csrf_token": csrf})
    (failed_login,) = _entries(action="session.login", outcome="refused")
    assert failed_login.username == "" and failed_login.detail["username"] == "mallory"
    assert failed_login.address == ALICE_ADDRESS


def test_user_created_and_disabled_by_an_admin(admin_browser: TestClient) -> None:
    created = admin_browser.post("/api/v1/users", json={"username": "bob", "password": PASSWORD, "role": "viewer"})
    assert created.status_code == 201 and created.json()["role"] == "viewer"
    bob_id = created.json()["id"]
    assert admin_browser.patch(f"/api/v1/users/{bob_id}", json={"disabled": True}).status_code == 200
    create, disable = _entries(entity_type="user", username=ADMIN_USERNAME)[-2:]
    assert (create.action, create.entity_id, create.address, create.outcome) == ("user.create", bob_id,
                                                                                 ADMIN_ADDRESS, "done")
    assert (disable.action, disable.entity_id, disable.detail["changed"]) == ("user.update", bob_id, ["disabled"])
    # The login that started this browser's session is there too.
    assert [e.action for e in _entries(username=ADMIN_USERNAME, address=ADMIN_ADDRESS)][0] == "session.login"
    # A password is never in the log, not even hashed.
    assert admin_browser.patch(f"/api/v1/users/{bob_id}", json={"password": "another long one"}).status_code == 200
    assert "another long one" not in json.dumps([e.detail for e in _entries()])


def test_the_api_filters_by_user_action_entity_and_time(admin_browser: TestClient, alice, session) -> None:
    config = run_config_factory(session)
    member = TestClient(admin_browser.app)
    run = member.post("/api/v1/runs", headers=alice, json={"config_id": config.id}).json()
    member.post(f"/api/v1/runs/{run['id']}/cancel", headers=alice)
    admin_browser.post("/api/v1/users", json={"username": "carol", "password": PASSWORD})

    def listed(**params) -> list[tuple[str, str]]:
        response = admin_browser.get("/api/v1/audit", params=params)
        assert response.status_code == 200, response.text
        return [(e["username"], e["action"]) for e in response.json()]

    assert listed(username="alice") == [("alice", "run.cancel"), ("alice", "run.create")]  # newest first
    assert listed(action="run.cancel") == [("alice", "run.cancel")]
    assert listed(action="user") == [("admin", "user.create")]
    assert listed(entity_type="run", entity_id=run["id"]) == [("alice", "run.cancel"), ("alice", "run.create")]
    later = (utcnow() + timedelta(minutes=1)).isoformat()
    assert listed(since=later) == [] and len(listed(until=later)) == len(_entries())
    newest = admin_browser.get("/api/v1/audit", params={"limit": 1}).json()
    older = admin_browser.get("/api/v1/audit", params={"before_id": newest[0]["id"]}).json()
    assert [e["id"] for e in newest + older] == [e.id for e in reversed(_entries())]


def test_exports_as_csv_and_jsonl(admin_browser: TestClient, alice, session) -> None:
    config = run_config_factory(session)
    run = TestClient(admin_browser.app).post("/api/v1/runs", headers=alice, json={"config_id": config.id}).json()
    everything = _entries()

    as_csv = admin_browser.get("/api/v1/audit/export", params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert 'filename="audit.csv"' in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [int(r["id"]) for r in rows] == [e.id for e in everything]  # oldest first, all of them
    run_row = next(r for r in rows if r["action"] == "run.create")
    assert (run_row["username"], run_row["entity_type"], run_row["entity_id"], run_row["outcome"]) == (
        "alice", "run", str(run["id"]), "done")
    assert json.loads(run_row["detail"])["request"] == "POST /api/v1/runs"

    as_jsonl = admin_browser.get("/api/v1/audit/export", params={"format": "jsonl", "username": "alice"})
    assert as_jsonl.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in as_jsonl.text.splitlines()]
    assert [(e["action"], e["entity_id"], e["address"]) for e in lines] == [("run.create", run["id"], "testclient")]
    assert admin_browser.get("/api/v1/audit/export", params={"format": "xml"}).status_code == 422


def test_the_audit_page_is_for_admins_and_filters(admin_browser: TestClient, alice) -> None:
    admin_browser.post("/api/v1/users", json={"username": "dave", "password": PASSWORD})
    page = admin_browser.get("/admin/audit")
    assert page.status_code == 200 and "user.create" in page.text and ADMIN_ADDRESS in page.text
    assert 'href="/api/v1/audit/export?format=csv"' in page.text
    filtered = admin_browser.get("/admin/audit", params={"action": "session", "username": "", "entity_id": ""})
    assert "session.login" in filtered.text and "user.create" not in filtered.text
    assert 'href="/api/v1/audit/export?format=jsonl&action=session"' in filtered.text
    member = TestClient(admin_browser.app)
    assert member.get("/api/v1/audit", headers=alice).status_code == 403
    assert member.get("/api/v1/audit/export", headers=alice).status_code == 403


def test_no_route_edits_or_deletes_an_entry_and_the_database_refuses_to(client) -> None:
    audit_routes = [(c.path, sorted(c.methods or ())) for c in iter_route_contexts(create_app().routes)
                    if "audit" in c.path]
    assert audit_routes and all(methods == ["GET"] for _path, methods in audit_routes), audit_routes
    (entry,) = _entries()  # the admin's login
    for statement in (update(AuditEntry).values(username="someone else"), delete(AuditEntry)):
        with Session(get_engine()) as session, pytest.raises(IntegrityError, match="append-only"):
            session.exec(statement)
    assert _entries() == [entry]
