"""The skeleton: health, pages, OpenAPI, database pragmas and migrations."""

from __future__ import annotations

from sqlalchemy import text
from sqlmodel import Session

from app.db import get_engine


def test_health_is_open(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_lists_the_json_api(client) -> None:
    schema = client.get("/api/v1/openapi.json").json()
    assert schema["info"]["title"] == "Tuneboard"
    assert client.get("/api/docs").status_code == 200


def test_sqlite_runs_in_wal_with_foreign_keys(client) -> None:
    with Session(get_engine()) as session:
        assert session.exec(text("PRAGMA journal_mode")).one()[0] == "wal"
        assert session.exec(text("PRAGMA foreign_keys")).one()[0] == 1
        assert session.exec(text("PRAGMA busy_timeout")).one()[0] == 5000


def test_vendored_scripts_are_served(client) -> None:
    for name in ("htmx-2.0.11.min.js", "htmx-ext-sse-2.2.4.min.js", "uPlot-1.6.32.iife.min.js"):
        response = client.get(f"/static/vendor/{name}")
        assert response.status_code == 200 and len(response.content) > 1000


def test_migrations_match_the_models(client) -> None:
    """The schema Alembic builds at start-up is exactly what the models declare."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with get_engine().connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == []


def test_home_leads_to_the_runs(client) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/runs"


def test_docker_compose_runs_web_redis_and_a_gpu_worker_as_separate_hosts() -> None:
    import yaml

    from app.settings import PROJECT_ROOT

    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"caddy", "redis", "web", "gpu-worker"}
    web, worker = services["web"], services["gpu-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and worker["build"]["args"]["FLAVOUR"] == "cuda"
    # No shared filesystem: each has a data volume of its own; only the read-only models are alike.
    data_volumes = [{v for v in service["volumes"] if v.endswith(":/data")} for service in (web, worker)]
    assert data_volumes == [{"panel-data:/data"}, {"worker-data:/data"}]
    assert worker["environment"]["TUNEBOARD_ADVERTISE_HOST"] == "gpu-worker"
    assert worker["environment"]["TUNEBOARD_BROKER_URL"].endswith("@redis:6379/0")
    assert "--requirepass" in " ".join(services["redis"]["command"])
