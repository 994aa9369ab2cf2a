"""An admin manages users in the browser and over the API: create, change the role, disable and
enable, reset the password; the last admin stays an admin."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.db import get_engine
from app.models.audit import AuditEntry
from app.models.user import User, UserRole
from app.services.users import create_user, get_user_by_name
from tests.conftest import ADMIN_USERNAME, log_in, page_csrf_token

PASSWORD = "long enough password"
HTMX = {"HX-Request": "true"}


def _user(name: str) -> User:
    with Session(get_engine()) as session:
        return get_user_by_name(session, name)


def _can_log_in(client: TestClient, username: str, password: str) -> bool:
    browser = TestClient(client.app)
    csrf = page_csrf_token(browser.get("/login").text)
    response = browser.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                            follow_redirects=False)
    return response.status_code == 303


def test_the_users_page_creates_changes_disables_and_resets(client: TestClient) -> None:
    page = client.get("/admin/users")
    assert page.status_code == 200 and 'id="create-user"' in page.text and ADMIN_USERNAME in page.text

    created = client.post("/admin/users", data={"username": "erin", "password": PASSWORD, "role": "viewer"},
                          headers=HTMX)
    assert created.status_code == 200 and "Created viewer erin." in created.text and "<html" not in created.text
    erin = _user("erin")
    assert erin.role == UserRole.viewer and _can_log_in(client, "erin", PASSWORD)

    short = client.post("/admin/users", data={"username": "frank", "password": "short"}, headers=HTMX)
    assert short.status_code == 422 and 'id="error-password"' in short.text and 'value="frank"' in short.text
    assert short.headers["HX-Retarget"] == "#users"  # app.js swaps a refusal only where this points
    assert _user("frank") is None

    assert client.post(f"/admin/users/{erin.id}", data={"role": "member"}, headers=HTMX).status_code == 200
    assert _user("erin").role == UserRole.member

    browser = TestClient(client.app)
    log_in(browser, "erin", PASSWORD)
    disabled = client.post(f"/admin/users/{erin.id}", data={"disabled": "true"}, headers=HTMX)
    assert 'badge stopped">disabled' in disabled.text
    assert browser.get("/runs", follow_redirects=False).status_code == 303  # her session ended at once
    assert not _can_log_in(client, "erin", PASSWORD)
    client.post(f"/admin/users/{erin.id}", data={"disabled": "false"}, headers=HTMX)

    assert client.post(f"/admin/users/{erin.id}", data={"password": "a new long password"},
                       headers=HTMX).status_code == 200
    assert not _can_log_in(client, "erin", PASSWORD) and _can_log_in(client, "erin", "a new long password")

    with Session(get_engine()) as session:
        entries = session.exec(select(AuditEntry).where(AuditEntry.username == ADMIN_USERNAME,
                                                        AuditEntry.entity_type == "user")).all()
    assert entries[-5].detail["error"] == "Use at least 8 characters."
    assert [(e.action, e.entity_id, e.outcome, e.detail.get("changed")) for e in entries[-6:]] == [
        ("user.create", erin.id, "done", None),
        ("user.create", None, "refused", None),  # the short password: nobody was made
        ("user.update", erin.id, "done", ["role"]),
        ("user.update", erin.id, "done", ["disabled"]),
        ("user.update", erin.id, "done", ["disabled"]),
        ("user.update", erin.id, "done", ["password"]),
    ]


def test_the_last_admin_can_be_neither_demoted_nor_disabled(client: TestClient) -> None:
    me = _user(ADMIN_USERNAME)
    demote = client.patch(f"/api/v1/users/{me.id}", json={"role": "member"})
    assert demote.status_code == 409 and "last admin" in demote.json()["detail"]
    assert demote.json()["field"] == "role"
    assert client.patch(f"/api/v1/users/{me.id}", json={"disabled": True}).status_code == 409
    page = client.post(f"/admin/users/{me.id}", data={"disabled": "true"}, headers=HTMX)
    assert page.status_code == 422 and "last admin" in page.text
    assert _user(ADMIN_USERNAME).role == UserRole.admin and not _user(ADMIN_USERNAME).disabled

    # With a second admin, the first may step down; then the second is the last one.
    other = client.post("/api/v1/users", json={"username": "grace", "password": PASSWORD, "role": "admin"}).json()
    assert client.patch(f"/api/v1/users/{me.id}", json={"role": "member"}).json()["role"] == "member"
    assert client.patch(f"/api/v1/users/{other['id']}", json={"disabled": True}).status_code == 403  # no admin now
    with Session(get_engine()) as session:
        assert get_user_by_name(session, "grace").role == UserRole.admin


def test_the_users_api(client: TestClient) -> None:
    created = client.post("/api/v1/users", json={"username": "heidi", "password": PASSWORD, "role": "member"})
    assert created.status_code == 201
    assert set(created.json()) == {"id", "username", "role", "disabled", "created_at"}
    assert client.post("/api/v1/users", json={"username": "heidi", "password": PASSWORD}).status_code == 422
    assert client.post("/api/v1/users", json={"username": "ivan", "password": PASSWORD, "role": "root"}
                       ).status_code == 422
    listed = client.get("/api/v1/users").json()
    assert [(u["username"], u["role"]) for u in listed] == [(ADMIN_USERNAME, "admin"), ("heidi", "member")]
    assert client.patch("/api/v1/users/999", json={"disabled": True}).status_code == 404

    member = TestClient(client.app)
    log_in(member, "heidi", PASSWORD)
    assert member.get("/api/v1/users").status_code == 403
    refused = member.post("/api/v1/users", json={"username": "judy", "password": PASSWORD, "role": "admin"})
    assert refused.status_code == 403 and _user("judy") is None
    assert member.patch(f"/api/v1/users/{created.json()['id']}", json={"role": "admin"}).status_code == 403
    assert _user("heidi").role == UserRole.member


def test_the_cli_creates_users_of_each_role(data_dir) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    runner = CliRunner()
    for args, role in ((["--role", "viewer"], UserRole.viewer), (["--admin"], UserRole.admin), ([], UserRole.member)):
        name = f"cli-{role.value}"
        result = runner.invoke(cli, ["user", "create", name, *args, "--password-stdin"], input=f"{PASSWORD}\n")
        assert result.exit_code == 0 and f"created {role.value} {name}" in result.output, result.output
        assert _user(name).role == role
    assert runner.invoke(cli, ["user", "set-password", "cli-viewer", "--password-stdin"],
                         input="another long password\n").exit_code == 0
    with Session(get_engine()) as session:
        entries = session.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.entity_id, e.address, e.username) for e in entries] == [
        ("user.create", _user("cli-viewer").id, "server shell", ""),
        ("user.create", _user("cli-admin").id, "server shell", ""),
        ("user.create", _user("cli-member").id, "server shell", ""),
        ("user.password", _user("cli-viewer").id, "server shell", ""),
    ]


def test_the_account_page_shows_the_role_and_offers_read_only_tokens(client: TestClient) -> None:
    page = client.get("/account").text
    assert re.search(r'id="account-role">admin<', page) and 'name="read_only"' in page
    fragment = client.post("/account/tokens", data={"name": "grafana", "read_only": "true"}, headers=HTMX).text
    assert "read-only" in fragment
    assert client.get("/api/v1/tokens").json()[0]["read_only"] is True


def test_a_member_made_with_create_user_can_log_in(client: TestClient) -> None:
    with Session(get_engine()) as session:
        create_user(session, "kim", PASSWORD)
    assert _user("kim").role == UserRole.member and _can_log_in(client, "kim", PASSWORD)
