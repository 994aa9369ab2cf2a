"""Shared fixtures: every test gets its own data dir, a real SQLite file (WAL) migrated by
Alembic, and a client of the real app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.db import get_engine
from app.main import create_app
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


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def session(client: TestClient) -> Iterator[Session]:
    with Session(get_engine()) as db_session:
        yield db_session
