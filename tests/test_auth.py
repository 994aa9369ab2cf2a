"""Login, setup, sessions, CSRF and personal API tokens, through the real app and SQLite."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from starlette.routing import Mount

from app.db import get_engine
from app.main import create_app
from app.models.user import ApiToken, User, UserRole
from app.security import hash_api_token
from app.services.users import create_user
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in, page_csrf_token

# Open to anyone: health, static files, the auth pages. The worker channel (/internal/v1), the
# OpenAI-compatible gateway (/v1) and Prometheus' /metrics (tests/test_metrics.py) check tokens of their own.
PUBLIC_PREFIXES = ("/healthz", "/static", "/login", "/setup", "/logout", "/internal/v1", "/v1/", "/metrics")


def _protected_routes() -> list[tuple[str, str]]:
    routes = []
    for context in iter_route_contexts(create_app().routes):
        if isinstance(context.original_route, Mount) or context.path.startswith(PUBLIC_PREFIXES):
            continue
        path = re.sub(r"\{[^}:]+(:path)?\}", "1", context.path)
        routes += [(method, path) for method in sorted(context.methods or ()) if method != "HEAD"]
    return routes


def test_anonymous_sees_only_the_login_page(anon_client: TestClient) -> None:
    routes = _protected_routes()
    assert ("GET", "/account") in routes and ("GET", "/api/v1/tokens") in routes
    for method, path in routes:
        response = anon_client.request(method, path, follow_redirects=False)
        if path.startswith("/api/v1"):
            assert response.status_code == 401, (method, path, response.status_code)
            assert "detail" in response.json()
        else:
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/login?next="), (method, path)


def test_htmx_without_session_is_redirected_by_header(anon_client: TestClient) -> None:
    response = anon_client.get(
        "/account", headers={"HX-Request": "true", "HX-Current-URL": "http://testserver/account?x=1"},
        follow_redirects=False,
    )
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=/account%3Fx%3D1"


def test_setup_page_creates_the_first_admin_once(anon_client: TestClient) -> None:
    assert anon_client.get("/account").url.path == "/setup"  # /account → /login → /setup
    csrf = page_csrf_token(anon_client.get("/setup").text)
    form = {"username": "ada", "password": "s3cret-pass", "password_again": "s3cret-pass", "csrf_token": csrf}
    assert anon_client.post("/setup", data={**form, "password_again": "other"}).status_code == 400
    assert anon_client.post("/setup", data={**form, "csrf_token": "forged"}).status_code == 403
    response = anon_client.post("/setup", data=form, follow_redirects=False)
    assert response.status_code == 303
    assert "ada" in anon_client.get("/account").text  # logged in right away
    assert anon_client.get("/setup", follow_redirects=False).headers["location"] == "/login"
    again = anon_client.post("/setup", data={**form, "username": "eve"})
    assert again.status_code == 403
    with Session(get_engine()) as session:
        admins = session.exec(select(User)).all()
    assert [(u.username, u.is_admin) for u in admins] == [("ada", True)]
    assert admins[0].password_hash.startswith("$argon2id$")


@pytest.fixture
def admin(anon_client: TestClient) -> User:
    with Session(get_engine()) as session:
        return create_user(session, ADMIN_USERNAME, ADMIN_PASSWORD, role=UserRole.admin)


def test_login_and_logout(anon_client: TestClient, admin: User) -> None:
    login_page = anon_client.get("/login")
    cookie = login_page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    log_in(anon_client, ADMIN_USERNAME, ADMIN_PASSWORD)
    page = anon_client.get("/account")
    assert page.status_code == 200 and ADMIN_USERNAME in page.text
    # Logging out is a plain form POST carrying the hidden csrf_token field.
    csrf = anon_client.headers.pop("X-CSRF-Token")
    assert anon_client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
    response = anon_client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert anon_client.get("/account", follow_redirects=False).status_code == 303


def test_login_returns_to_next_but_never_off_site(anon_client: TestClient, admin: User) -> None:
    for target, expected in (("/account?tab=1", "/account?tab=1"), ("//evil.example", "/"),
                             ("https://evil.example", "/")):
        anon_client.cookies.clear()
        csrf = page_csrf_token(anon_client.get("/login").text)
        form = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD, "csrf_token": csrf, "next": target}
        response = anon_client.post("/login", data=form, follow_redirects=False)
        assert response.headers["location"] == expected


def test_wrong_password_or_user_is_refused(anon_client: TestClient, admin: User) -> None:
    csrf = page_csrf_token(anon_client.get("/login").text)
    for username, password in ((ADMIN_USERNAME, "wrong password"), ("nobody", ADMIN_PASSWORD)):
        response = anon_client.post(
            "/login", data={"username": username, "password": password, "csrf_token": csrf}
        )
        assert response.status_code == 400 and "Wrong username or password" in response.text
    assert anon_client.get("/account", follow_redirects=False).status_code == 303


def test_login_form_needs_its_csrf_token(anon_client: TestClient, admin: User) -> None:
    anon_client.get("/login")
    form = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD, "csrf_token": "forged"}
    assert anon_client.post("/login", data=form).status_code == 403


def test_session_cookie_is_secure_over_https(data_dir, admin: User) -> None:
    with TestClient(create_app(), base_url="https://testserver") as https_client:
        assert "secure" in https_client.get("/login").headers["set-cookie"].lower()


def test_changing_the_password_ends_sessions(client: TestClient) -> None:
    from app.services.users import get_user_by_name, set_password

    with Session(get_engine()) as session:
        set_password(session, get_user_by_name(session, ADMIN_USERNAME), "a brand new password")
    assert client.get("/account", follow_redirects=False).status_code == 303


def test_csrf_is_checked_on_state_changing_requests(client: TestClient) -> None:
    right = client.headers.pop("X-CSRF-Token")
    assert client.post("/api/v1/tokens", json={"name": "x"}).status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": right}).status_code == 201
    # A plain form may carry it as a field; a multipart upload must send the header.
    assert client.post("/account/tokens", data={"name": "form", "csrf_token": right}).status_code == 200
    assert client.post("/account/tokens", data={"name": "form", "csrf_token": "wrong"}).status_code == 403
    upload = client.post("/account/tokens", data={"csrf_token": right}, files={"f": ("a.txt", b"x")})
    assert upload.status_code == 403 and "X-CSRF-Token" in upload.json()["detail"]
    assert client.get("/account").status_code == 200  # reads need none


def test_api_token_lifecycle(client: TestClient, anon_client: TestClient) -> None:
    created = client.post("/api/v1/tokens", json={"name": "laptop CLI"})
    assert created.status_code == 201
    raw = created.json()["token"]
    assert raw.startswith("tb_") and len(raw) == 3 + 43
    # Stored hashed; the list shows the prefix only.
    with Session(get_engine()) as session:
        stored = session.exec(select(ApiToken)).one()
    assert stored.token_hash == hash_api_token(raw) and raw not in (stored.prefix, stored.token_hash)
    listed = client.get("/api/v1/tokens").json()
    assert [t["name"] for t in listed] == ["laptop CLI"] and "token" not in listed[0]
    assert raw.startswith(listed[0]["prefix"]) and listed[0]["last_used_at"] is None

    # A bearer token works without any cookie or CSRF token, on the API only.
    bearer = {"Authorization": f"Bearer {raw}"}
    assert anon_client.get("/api/v1/tokens", headers=bearer).status_code == 200
    second = anon_client.post("/api/v1/tokens", json={"name": "script"}, headers=bearer)
    assert second.status_code == 201
    assert anon_client.get("/account", headers=bearer, follow_redirects=False).status_code == 303
    assert client.get("/api/v1/tokens").json()[-1]["last_used_at"] is not None

    assert anon_client.delete(f"/api/v1/tokens/{stored.id}", headers=bearer).status_code == 204
    assert anon_client.get("/api/v1/tokens", headers=bearer).status_code == 401
    assert anon_client.get("/api/v1/tokens", headers={"Authorization": "Bearer tb_nonsense"}).status_code == 401
    assert client.delete(f"/api/v1/tokens/{stored.id}").status_code == 404


def test_account_page_shows_a_new_token_once(client: TestClient) -> None:
    assert "No API tokens yet" in client.get("/account").text
    fragment = client.post("/account/tokens", data={"name": "ci"}, headers={"HX-Request": "true"}).text
    raw = re.search(r'value="(tb_[^"]+)"', fragment).group(1)
    assert "<html" not in fragment and "copy it now" in fragment
    page = client.get("/account").text
    assert raw not in page and raw[:12] in page
    token_id = client.get("/api/v1/tokens").json()[0]["id"]
    assert "No API tokens yet" in client.delete(f"/account/tokens/{token_id}").text
    empty_name = client.post("/account/tokens", data={"name": " "})
    assert "Name the token" in empty_name.text


def test_cli_creates_an_admin_and_the_api_client_uses_a_token(data_dir, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from app.cli import cli
    from app.cli.client import api_client
    from tests.live import app_in_thread

    runner = CliRunner()
    result = runner.invoke(cli, ["user", "create", "--admin", "root", "--password-stdin"], input="long enough pw\n")
    assert result.exit_code == 0, result.output
    assert runner.invoke(cli, ["user", "create", "root", "--password-stdin"], input="long enough pw\n").exit_code == 1
    assert runner.invoke(cli, ["user", "create", "bob", "--password-stdin"], input="short\n").exit_code == 1

    with app_in_thread() as port:
        with TestClient(create_app()) as browser:
            log_in(browser, "root", "long enough pw")
            raw = browser.post("/api/v1/tokens", json={"name": "cli"}).json()["token"]
        monkeypatch.setenv("TUNEBOARD_URL", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("TUNEBOARD_TOKEN", raising=False)
        with pytest.raises(typer.Exit):
            api_client()
        monkeypatch.setenv("TUNEBOARD_TOKEN", raw)
        with api_client() as http:
            assert [t["name"] for t in http.get("/api/v1/tokens").json()] == ["cli"]
            with pytest.raises(typer.Exit) as refused:
                http.delete("/api/v1/tokens/999")
            assert refused.value.exit_code == 1
