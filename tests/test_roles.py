"""Roles, ownership and read-only tokens through the real app and SQLite: every route against an
admin, a member, a viewer and nobody; members changing only what they own; a disabled user's
tokens and sessions refused at once."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from starlette.routing import Mount

from app.auth import admin_user
from app.db import get_engine
from app.main import create_app
from app.models import Dataset, Deployment, Run, TrainConfig
from app.models.audit import AuditEntry
from app.models.deployment import DeploymentStatus
from app.models.user import User, UserRole
from app.services.audit import READS_BY_POST
from app.services.permissions import OWN_ACCOUNT_ROUTES
from app.services.users import create_token, create_user, get_user_by_name
from tests.conftest import log_in
from tests.factories import alpaca_rows, run_config_factory
from tests.test_auth import PUBLIC_PREFIXES

PASSWORD = "long enough password"
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def _needs_admin(route: APIRoute) -> bool:
    def calls(dependant) -> bool:
        return any(d.call is admin_user or calls(d) for d in dependant.dependencies)
    return calls(route.dependant)


def _routes() -> list[tuple[str, str, str, bool]]:
    """(method, template, path with 1 for each parameter, admin only) of every logged-in route."""
    routes = []
    for context in iter_route_contexts(create_app().routes):
        route = context.original_route
        if isinstance(route, Mount) or context.path.startswith(PUBLIC_PREFIXES):
            continue
        path = re.sub(r"\{[^}:]+(:path)?\}", "1", context.path)
        admin_only = isinstance(route, APIRoute) and _needs_admin(route)
        routes += [(m, context.path, path, admin_only) for m in sorted(context.methods or ()) if m != "HEAD"]
    return routes


def _expected_refusal(role: UserRole, method: str, template: str, admin_only: bool) -> int | None:
    """403 where the role may not do this; None where it may (the route's own answer follows)."""
    if role == UserRole.admin:
        return None
    if admin_only:
        return 403
    if role == UserRole.viewer and method in STATE_CHANGING and template not in READS_BY_POST | OWN_ACCOUNT_ROUTES:
        return 403
    return None


def _user(username: str, role: UserRole) -> User:
    with Session(get_engine()) as session:
        return create_user(session, username, PASSWORD, role=role)


def _bearer(user: User, *, read_only: bool = False) -> dict[str, str]:
    with Session(get_engine()) as session:
        _token, raw = create_token(session, user, "tests", read_only=read_only)
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture
def people(client: TestClient) -> dict[str, User]:
    """The admin of `client`, two members and a viewer."""
    with Session(get_engine()) as session:
        admin = get_user_by_name(session, "admin")
    return {"admin": admin, "alice": _user("alice", UserRole.member), "bob": _user("bob", UserRole.member),
            "vera": _user("vera", UserRole.viewer)}


def test_every_route_per_role_over_the_api_and_the_pages(client: TestClient, people, anon_client) -> None:
    routes = _routes()
    assert ("POST", "/api/v1/users", "/api/v1/users", True) in routes
    assert ("GET", "/api/v1/audit", "/api/v1/audit", True) in routes
    assert ("GET", "/api/v1/runs", "/api/v1/runs", False) in routes
    browsers = {}
    for name in ("alice", "vera"):
        browsers[name] = TestClient(client.app)
        log_in(browsers[name], name, PASSWORD)
    browsers["admin"] = client
    _bearer(people["admin"])  # token 1, which the sweep's DELETE /api/v1/tokens/1 revokes (not the one it sends)
    checked = 0
    for name, role in (("admin", UserRole.admin), ("alice", UserRole.member), ("vera", UserRole.viewer)):
        bearer = _bearer(people[name])
        for method, template, path, admin_only in routes:
            if path.startswith("/api/v1"):
                response = anon_client.request(method, path, headers=bearer, follow_redirects=False)
            else:
                response = browsers[name].request(method, path, follow_redirects=False)
            expected = _expected_refusal(role, method, template, admin_only)
            if expected is None:
                assert response.status_code not in (401, 403), (name, method, path, response.text[:300])
                assert response.status_code < 500, (name, method, path, response.text[:300])
            else:
                assert response.status_code == expected, (name, method, path, response.status_code)
            checked += 1
    assert checked == 3 * len(routes)
    # Nobody: 401 on the API, the login page for the pages (as test_auth.py checks route by route).
    for method, _template, path, _admin_only in routes:
        response = anon_client.request(method, path, follow_redirects=False)
        assert response.status_code == (401 if path.startswith("/api/v1") else 303), (method, path)


def test_an_admin_only_page_is_refused_to_a_member_with_a_page(client: TestClient, people) -> None:
    browser = TestClient(client.app)
    log_in(browser, "alice", PASSWORD)
    refused = browser.get("/admin/users", headers={"Accept": "text/html"})
    assert refused.status_code == 403 and "only an admin" in refused.text and "<html" in refused.text
    assert 'href="/admin/users"' not in browser.get("/runs").text  # no Admin link for a member
    assert 'href="/admin/users"' in client.get("/runs").text


def _upload(client: TestClient, headers: dict[str, str], name: str) -> dict:
    body = json.dumps(alpaca_rows(3, prefix=name)).encode()
    response = client.post("/api/v1/datasets", headers=headers, data={"name": name},
                           files={"file": (f"{name}.json", body, "application/json")})
    assert response.status_code == 201, response.text
    return response.json()


def test_members_change_only_what_they_own(client: TestClient, people, anon_client, session) -> None:
    alice, bob, admin = _bearer(people["alice"]), _bearer(people["bob"]), _bearer(people["admin"])

    # Dataset: created over the API, so its owner is whoever uploaded it.
    dataset = _upload(anon_client, alice, "alices-data")
    assert dataset["owner"] == "alice"
    assert anon_client.patch(f"/api/v1/datasets/{dataset['id']}", headers=bob, json={"description": "mine now"}
                             ).status_code == 403
    refused = anon_client.delete(f"/api/v1/datasets/{dataset['id']}", headers=bob)
    assert refused.status_code == 403 and "belongs to alice" in refused.json()["detail"]
    assert anon_client.get(f"/api/v1/datasets/{dataset['id']}", headers=bob).json()["description"] == ""

    # Run: started by alice over the API; bob may read it, not cancel or delete it.
    config = run_config_factory(session)
    run = anon_client.post("/api/v1/runs", headers=alice, json={"config_id": config.id}).json()
    assert run["owner"] == "alice" and run["status"] == "queued"
    assert anon_client.get(f"/api/v1/runs/{run['id']}", headers=bob).status_code == 200
    assert anon_client.post(f"/api/v1/runs/{run['id']}/cancel", headers=bob).status_code == 403
    assert anon_client.delete(f"/api/v1/runs/{run['id']}", headers=bob).status_code == 403
    assert anon_client.get(f"/api/v1/runs/{run['id']}", headers=bob).json()["status"] == "queued"
    assert anon_client.post(f"/api/v1/runs/{run['id']}/cancel", headers=alice).json()["status"] == "cancelled"
    assert anon_client.delete(f"/api/v1/runs/{run['id']}", headers=bob).status_code == 403
    assert anon_client.delete(f"/api/v1/runs/{run['id']}", headers=alice).status_code == 204

    # Config and deployment rows of alice's (made here directly: their create routes are tested
    # in their areas; the owner stamp is the same for every insert of a request).
    alice_id = people["alice"].id
    own_config = TrainConfig(name="alices-config", params={}, owner_id=alice_id)
    failed = Deployment(name="alices-deployment", status=DeploymentStatus.failed, owner_id=alice_id)
    session.add_all([own_config, failed])
    session.commit()
    assert anon_client.get(f"/api/v1/configs/{own_config.id}", headers=bob).json()["owner"] == "alice"
    assert anon_client.delete(f"/api/v1/configs/{own_config.id}", headers=bob).status_code == 403
    assert anon_client.delete(f"/api/v1/deployments/{failed.id}", headers=bob).status_code == 403
    session.refresh(failed)
    assert failed.status == DeploymentStatus.failed
    assert anon_client.delete(f"/api/v1/deployments/{failed.id}", headers=alice).json()["status"] == "stopped"
    assert anon_client.delete(f"/api/v1/configs/{own_config.id}", headers=alice).status_code == 204
    # An admin may change anyone's.
    assert anon_client.delete(f"/api/v1/datasets/{dataset['id']}", headers=admin).status_code == 204
    assert session.get(Dataset, dataset["id"]) is None


def test_pages_refuse_another_members_run_too(client: TestClient, people, session) -> None:
    config = run_config_factory(session)
    run = Run(name="alices", config_id=config.id, status="failed", owner_id=people["alice"].id)
    session.add(run)
    session.commit()
    bob = TestClient(client.app)
    log_in(bob, "bob", PASSWORD)
    refused = bob.post(f"/runs/{run.id}/delete", headers={"HX-Request": "true"})
    assert refused.status_code == 403 and refused.headers["HX-Retarget"] == "#flash"
    assert "only its owner or an admin" in refused.text
    with Session(get_engine()) as db:
        (denied,) = db.exec(select(AuditEntry).where(AuditEntry.outcome == "denied")).all()
    assert (denied.username, denied.action, denied.entity_id) == ("bob", "run.delete", run.id)
    assert "belongs to alice" in denied.detail["error"]
    session.expire_all()
    assert session.get(Run, run.id) is not None


def test_lists_filter_by_owner(client: TestClient, people, anon_client, session) -> None:
    alice, bob = _bearer(people["alice"]), _bearer(people["bob"])
    _upload(anon_client, alice, "a-data")
    _upload(anon_client, bob, "b-data")
    config = run_config_factory(session)  # no owner: made by the panel, not by a request
    for headers in (alice, bob, bob):
        assert anon_client.post("/api/v1/runs", headers=headers, json={"config_id": config.id}).status_code == 201
    for collection in ("datasets", "runs"):
        mine = anon_client.get(f"/api/v1/{collection}?owner=me", headers=bob).json()
        everyone = anon_client.get(f"/api/v1/{collection}", headers=bob).json()
        by_name = anon_client.get(f"/api/v1/{collection}?owner=alice", headers=bob).json()
        assert {row["owner"] for row in mine} == {"bob"}
        assert {row["owner"] for row in by_name} == {"alice"}
        assert len(everyone) == len(mine) + len(by_name) + (1 if collection == "datasets" else 0)
        assert anon_client.get(f"/api/v1/{collection}?owner=nobody", headers=bob).json() == []
    assert len(anon_client.get("/api/v1/runs?owner=me", headers=bob).json()) == 2
    configs = anon_client.get("/api/v1/configs?owner=me", headers=bob).json()
    assert configs == [] and anon_client.get("/api/v1/configs", headers=bob).json()[0]["owner"] is None


def test_a_viewer_reads_but_changes_nothing(client: TestClient, people, anon_client, session) -> None:
    vera = _bearer(people["vera"])
    config = run_config_factory(session)
    assert anon_client.get("/api/v1/runs", headers=vera).status_code == 200
    refused = anon_client.post("/api/v1/runs", headers=vera, json={"config_id": config.id})
    assert refused.status_code == 403 and "viewers read only" in refused.json()["detail"]
    assert session.exec(select(Run)).all() == []
    # Their own account stays theirs: a token of their own (acting as a viewer, still).
    assert anon_client.post("/api/v1/tokens", headers=vera, json={"name": "mine"}).status_code == 201


def test_a_read_only_token_reads_and_is_refused_every_change(client: TestClient, people, anon_client, session) -> None:
    created = anon_client.post("/api/v1/tokens", headers=_bearer(people["alice"]),
                               json={"name": "dashboards", "read_only": True})
    assert created.status_code == 201 and created.json()["read_only"] is True
    read_only = {"Authorization": f"Bearer {created.json()['token']}"}
    config = run_config_factory(session)
    assert anon_client.get("/api/v1/runs", headers=read_only).status_code == 200
    refused = anon_client.post("/api/v1/runs", headers=read_only, json={"config_id": config.id})
    assert refused.status_code == 403 and "read-only" in refused.json()["detail"]
    # Nor may it mint itself a token that could.
    assert anon_client.post("/api/v1/tokens", headers=read_only, json={"name": "escape"}).status_code == 403
    assert session.exec(select(Run)).all() == []


def test_a_disabled_users_tokens_and_sessions_stop_at_once(client: TestClient, people, anon_client) -> None:
    alice = people["alice"]
    bearer = _bearer(alice)
    browser = TestClient(client.app)
    log_in(browser, "alice", PASSWORD)
    assert anon_client.get("/api/v1/runs", headers=bearer).status_code == 200
    assert browser.get("/runs", follow_redirects=False).status_code == 200

    disabled = client.patch(f"/api/v1/users/{alice.id}", json={"disabled": True})
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True
    assert anon_client.get("/api/v1/runs", headers=bearer).status_code == 401
    assert browser.get("/runs", follow_redirects=False).status_code == 303
    assert browser.get("/api/v1/runs").status_code == 401
    # Logging in again is refused, and says why.
    again = TestClient(client.app)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', again.get("/login").text).group(1)
    refused = again.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf})
    assert refused.status_code == 403 and "disabled" in refused.text

    assert client.patch(f"/api/v1/users/{alice.id}", json={"disabled": False}).json()["disabled"] is False
    assert anon_client.get("/api/v1/runs", headers=bearer).status_code == 200


def test_the_list_pages_show_owners_and_toggle_to_mine(client: TestClient, people, session) -> None:
    config = run_config_factory(session)
    alice_id, admin_id = people["alice"].id, people["admin"].id
    session.add_all([
        Run(name="alices-run", config_id=config.id, status="failed", owner_id=alice_id),
        Run(name="admins-run", config_id=config.id, status="failed", owner_id=admin_id),
        TrainConfig(name="alices-config", params={}, owner_id=alice_id),
        Deployment(name="alices-deployment", status=DeploymentStatus.failed, owner_id=alice_id),
        Deployment(name="admins-deployment", status=DeploymentStatus.failed, owner_id=admin_id),
    ])
    session.commit()
    for path, alices, admins in (("/runs", "alices-run", "admins-run"),
                                 ("/configs", "alices-config", config.name),
                                 ("/deployments", "alices-deployment", "admins-deployment")):
        everyone = client.get(path).text
        assert alices in everyone and admins in everyone and "<td class=\"small\">alice</td>" in everyone, path
        mine = client.get(path, params={"owner": "me"}).text
        assert alices not in mine and 'id="owner-mine" aria-current="page"' in mine, path
        assert (admins in mine) == (path != "/configs"), path  # the factory's config has no owner


def test_a_gateway_key_records_who_made_it(client: TestClient, people, anon_client) -> None:
    created = anon_client.post("/api/v1/gateway-keys", headers=_bearer(people["alice"]), json={"name": "laptop"})
    assert created.status_code == 201 and created.json()["owner"] == "alice"
    listed = anon_client.get("/api/v1/gateway-keys", headers=_bearer(people["alice"])).json()
    assert [(key["name"], key["owner"]) for key in listed] == [("laptop", "alice")]


def test_detail_pages_name_the_owner(client: TestClient, people, anon_client, session) -> None:
    config = run_config_factory(session)
    run = anon_client.post("/api/v1/runs", headers=_bearer(people["alice"]), json={"config_id": config.id}).json()
    assert 'id="run-owner">alice<' in client.get(f"/runs/{run['id']}").text
    dataset = session.exec(select(Dataset)).first()  # the factory's: made by no request, so no owner
    assert 'id="dataset-owner">—<' in client.get(f"/datasets/{dataset.id}").text
