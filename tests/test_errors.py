"""A service's refusal, answered by the one handler in app.main: JSON under /api and /internal (with
its status, detail and, for a form, the field), a message for the page's flash region to htmx, and
an error page to a browser. The same refusal reads the same from every route that meets it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.models import TrainConfig
from app.settings import get_settings
from tests.factories import run_config_factory
from tests.test_runs import start

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
HTMX = {"HX-Request": "true", "Accept": "*/*"}


@pytest.fixture
def config(session: Session) -> TrainConfig:
    return run_config_factory(session)


@pytest.fixture
def cancelled_run(client: TestClient, config: TrainConfig) -> int:
    run_id = start(client, config.id)["id"]
    assert client.post(f"/api/v1/runs/{run_id}/cancel").json()["status"] == "cancelled"
    return run_id


def test_a_refusal_over_the_api_is_json_with_its_status_detail_and_field(client: TestClient) -> None:
    refused = client.post("/api/v1/models", json={"path": "/etc", "name": "etc"})
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    body = refused.json()
    assert set(body) == {"detail", "field"} and body["field"] == "path"
    assert "outside the allowed folders" in body["detail"]

    # A browser asking the API still gets JSON: the path decides, not the Accept header.
    missing = client.get("/api/v1/runs/999", headers=BROWSER)
    assert (missing.status_code, missing.json()) == (404, {"detail": "run 999 not found"})


def test_a_refusal_without_a_field_has_no_field_key(client: TestClient, cancelled_run: int) -> None:
    again = client.post(f"/api/v1/runs/{cancelled_run}/cancel")
    assert again.status_code == 409
    assert again.json() == {"detail": f"run {cancelled_run} is already cancelled: there is nothing to cancel"}


def test_a_refused_config_lists_its_errors_by_field(client: TestClient) -> None:
    refused = client.post("/api/v1/configs/import", json={"yaml": "a: [1, 2", "name": "broken"})
    assert refused.status_code == 422
    body = refused.json()
    assert body["field"] == "yaml" and "not valid YAML" in body["detail"]
    assert body["errors"] == [{"field": "yaml", "message": body["detail"]}]


def test_htmx_gets_the_refusal_as_a_message_for_the_flash_region(client: TestClient, cancelled_run: int) -> None:
    page = client.get(f"/runs/{cancelled_run}", headers=BROWSER).text
    assert '<div id="flash"' in page  # where app.js puts what HX-Retarget points to

    refused = client.post(f"/runs/{cancelled_run}/cancel", headers=HTMX)
    assert refused.status_code == 409
    assert refused.headers["HX-Retarget"] == "#flash" and refused.headers["HX-Reswap"] == "innerHTML"
    message = refused.text.strip()
    assert message.startswith("<p") and 'role="alert"' in message and "<html" not in message
    assert f"run {cancelled_run} is already cancelled: there is nothing to cancel" in message


def test_a_browser_gets_an_error_page_in_the_panels_layout(client: TestClient, cancelled_run: int) -> None:
    missing = client.get("/runs/999", headers=BROWSER)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "<h1>Not found</h1>" in missing.text and "run 999 not found" in missing.text
    assert 'href="/runs"' in missing.text  # the navigation: the way on from here

    refused = client.post(f"/runs/{cancelled_run}/cancel", headers=BROWSER)
    assert refused.status_code == 409 and "<h1>Not now</h1>" in refused.text
    assert "there is nothing to cancel" in refused.text


def test_a_missing_run_is_404_on_every_page_and_api_route_that_reads_it(client: TestClient) -> None:
    for url in ("/runs/999", "/runs/999/header", "/runs/999/artifacts", "/runs/999/log.txt",
                "/runs/999/download", "/api/v1/runs/999", "/api/v1/runs/999/yaml", "/api/v1/runs/999/metrics",
                "/api/v1/runs/999/logs", "/api/v1/runs/999/checkpoints", "/api/v1/runs/999/artifacts",
                "/api/v1/runs/999/download"):
        answer = client.get(url)
        assert (answer.status_code, answer.json()) == (404, {"detail": "run 999 not found"}), url
    for url in ("/runs/999/cancel", "/runs/999/resume", "/api/v1/runs/999/cancel", "/api/v1/runs/999/retry"):
        answer = client.post(url)
        assert (answer.status_code, answer.json()) == (404, {"detail": "run 999 not found"}), url


def test_every_area_answers_its_missing_things_the_same_way(client: TestClient) -> None:
    pages = {"/configs/999": "config 999 not found", "/configs/999/edit": "config 999 not found"}
    api = {"/api/v1/configs/999": "config 999 not found", "/api/v1/configs/999/yaml": "config 999 not found",
           "/api/v1/models/999": "model 999 not found", "/api/v1/workers/nowhere": "no worker named 'nowhere'"}
    for url, detail in {**pages, **api}.items():
        answer = client.get(url)
        assert (answer.status_code, answer.json()) == (404, {"detail": detail}), url
    for url, detail in pages.items():
        page = client.get(url, headers=BROWSER)
        assert page.status_code == 404 and "<h1>Not found</h1>" in page.text and detail in page.text, url
    for url, detail in {"/workers/nowhere/doctor": "no worker named 'nowhere'",
                        "/models/999/delete": "model 999 not found"}.items():
        answer = client.post(url, headers=HTMX)
        assert answer.status_code == 404 and answer.headers["HX-Retarget"] == "#flash", url
        assert detail.replace("'", "&#39;") in answer.text, url
    revoked = client.delete("/api/v1/tokens/999")
    assert (revoked.status_code, revoked.json()) == (404, {"detail": "no live API token 999 of yours"})


def test_the_worker_channel_gets_json_refusals_too(client: TestClient, cancelled_run: int) -> None:
    worker = {"Authorization": f"Bearer {get_settings().worker_token}"}
    blob = "0" * 64
    assert client.get(f"/internal/v1/blobs/{blob}", headers=worker).json() == {
        "detail": f"blob {blob} is not in the store"}
    late = client.post(f"/internal/v1/runs/{cancelled_run}/events", headers=worker,
                       json={"attempt": 1, "worker_id": "w1"})
    assert late.status_code == 409  # the worker stops the process of an attempt the panel ended
    assert late.json() == {"detail": f"run {cancelled_run} attempt 1 is over (the run is at attempt 1, cancelled):"
                                     " stop its process"}
    manifest = client.get(f"/internal/v1/runs/{cancelled_run}/artifacts/adapter", headers=worker)
    assert manifest.status_code == 404 and manifest.json() == {"detail": f"run {cancelled_run} has no artifact 'adapter'"}
