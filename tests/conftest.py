"""Shared fixtures: every test gets its own data dir, a real SQLite file (WAL) migrated by
Alembic, and a client of the real app."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.db import get_engine
from app.main import create_app
from app.models.user import UserRole
from app.services.users import create_user
from app.settings import get_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _clear_caches() -> None:
    get_settings.cache_clear()
    get_engine.cache_clear()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data = tmp_path / "data"
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("TUNEBOARD_ENVIRONMENT", "test")
    monkeypatch.setenv("TUNEBOARD_DATA_DIR", str(data))
    monkeypatch.setenv("TUNEBOARD_MODEL_ROOTS", f'["{models}"]')
    monkeypatch.delenv("TUNEBOARD_BROKER_URL", raising=False)
    monkeypatch.delenv("TUNEBOARD_DATABASE_URL", raising=False)
    _clear_caches()
    yield data
    get_engine().dispose()
    _clear_caches()


ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "correct horse battery staple"
_CSRF_IN_PAGE = re.compile(r'"X-CSRF-Token": "([^"]+)"|name="csrf_token" value="([^"]+)"')


def page_csrf_token(html: str) -> str:
    """The CSRF token a page carries (base.html's htmx header or a form's hidden field)."""
    match = _CSRF_IN_PAGE.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1) or match.group(2)


def log_in(test_client: TestClient, username: str, password: str) -> None:
    """Log in through the login form, then send the session's CSRF header on every request."""
    csrf = page_csrf_token(test_client.get("/login").text)
    response = test_client.post(
        "/login", data={"username": username, "password": password, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    test_client.headers["X-CSRF-Token"] = page_csrf_token(test_client.get("/account").text)


@pytest.fixture
def anon_client(data_dir: Path) -> Iterator[TestClient]:
    """A browser that has not logged in."""
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    """Logged in as an admin, sending the CSRF header by default (like base.html's htmx)."""
    with TestClient(create_app()) as test_client:
        with Session(get_engine()) as db_session:
            create_user(db_session, ADMIN_USERNAME, ADMIN_PASSWORD, role=UserRole.admin)
        log_in(test_client, ADMIN_USERNAME, ADMIN_PASSWORD)
        yield test_client


@pytest.fixture
def session(client: TestClient) -> Iterator[Session]:
    with Session(get_engine()) as db_session:
        yield db_session


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2 demo model, built once per test session with the training env."""
    from app.demo import build_demo_model

    target = tmp_path_factory.mktemp("tiny_model")
    build_demo_model(target)
    return target


@pytest.fixture(scope="session")
def trained_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter: `llamafactory-cli train` on the tiny model, once per test session
    (16 rows, 1 epoch, ~10 s). The folder holds the final adapter and checkpoint-2/checkpoint-4."""
    from tests.factories import train_tiny_adapter

    return train_tiny_adapter(tiny_model, tmp_path_factory.mktemp("trained_adapter"))
