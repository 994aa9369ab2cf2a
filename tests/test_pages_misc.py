"""The other pages as the browser gets them (real app, real SQLite): the favicon, sizes and
numbers for people, any dataset row rendered, the deploy form's adapter picker and what a
stopped deployment's row offers, the doctor's feedback and its hints, and the account page's
password change and expiring tokens, each linked to the gateway keys."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.main import create_app
from app.models import ApiToken
from app.models.base import utcnow
from app.models.deployment import Deployment, DeploymentStatus, InferenceServer
from app.services import datasets as dataset_service
from app.settings import get_settings
from app.templating import filesize, number
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in
from tests.factories import alpaca_rows, dataset_factory, finished_run_factory, model_factory
from tests.test_deploy import base_model, write_adapter, write_checkpoint  # noqa: F401  (base_model: the fixture)

PAGES = ("/runs", "/runs/compare", "/configs", "/configs/new", "/datasets", "/deployments", "/playground",
         "/models", "/workers", "/account")


def test_every_page_names_a_favicon_that_is_served(client) -> None:
    for page in PAGES:
        html = client.get(page).text
        icon = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', html)
        assert icon, page
    served = client.get(icon.group(1))
    assert served.status_code == 200 and served.headers["content-type"].startswith("image/svg+xml")
    assert client.get("/login").status_code in (200, 303)  # and the anonymous pages have it too
    anonymous = TestClient(create_app())
    with anonymous:
        assert 'rel="icon"' in anonymous.get("/login").text


def test_every_page_starts_with_a_skip_link(client) -> None:
    for page in PAGES:
        html = client.get(page).text
        first_link = re.search(r"<a [^>]*>", html.split("<body", 1)[1]).group(0)
        assert 'class="skip-link"' in first_link, page
    datasets = client.get("/datasets").text
    assert '<a class="skip-link" href="#dropzone">Skip to the dataset upload</a>' in datasets
    zone = re.search(r'<div class="dropzone" id="dropzone"[^>]*>', datasets).group(0)
    assert 'tabindex="0"' in zone and 'role="button"' in zone


# --------------------------------------------------------------------------- numbers for people
@pytest.mark.parametrize(("raw", "shown"), [
    (6.50616455078125, "6.506"), (936898338816.0, "936,898,338,816"), (0.0001234, "1.23e-04"), (61.234, "61.23"),
    (3.0, "3"), (12, "12"), (12345.678, "12,346"), (None, "—"), ("text", "text"),
])
def test_numbers_are_formatted(raw, shown) -> None:
    assert number(raw) == shown


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0 B"), (812, "812 B"), (41_300, "40.3 KiB"), (6_826_230, "6.51 MiB"), (209_715_200, "200 MiB"),
    (2 * 1024**3, "2 GiB"),
])
def test_sizes_are_formatted(size, shown) -> None:
    assert filesize(size) == shown


def test_a_small_dataset_is_not_zero_mib(client, session) -> None:
    dataset = dataset_factory(session, "tiny", alpaca_rows(3))
    assert dataset.size_bytes < 1024
    listing = client.get("/datasets").text
    assert f"<td>{dataset.size_bytes} B</td>" in listing and "0.0 MiB" not in listing
    detail = client.get(f"/datasets/{dataset.id}").text
    assert f"{dataset.size_bytes} B" in detail
    mean = dataset.report["prompt_chars"]["mean"]
    assert f"mean {number(mean)}," in detail


# --------------------------------------------------------------------------- any row renders
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_any_row_of_the_file_is_read(session, client, jsonl) -> None:
    rows = alpaca_rows(40, prefix="far")
    dataset = dataset_factory(session, "forty", rows, jsonl=jsonl)
    for row in (1, 10, 11, 25, 40):
        assert dataset_service.read_row(dataset, row) == rows[row - 1]
    for row in (0, 41):
        with pytest.raises(dataset_service.DatasetError, match="between 1 and 40"):
            dataset_service.read_row(dataset, row)
    model_factory(session, "/models/any")  # the tokens form needs a model
    page = client.get(f"/datasets/{dataset.id}").text
    field = re.search(r'<input type="number" id="tok-row"[^>]*>', page).group(0)
    assert 'max="40"' in field and "1 to 40" in page


@pytest.mark.slow
def test_a_row_past_the_preview_renders_through_the_template(client, session, tiny_model) -> None:
    model = model_factory(session, str(tiny_model), name="tiny")
    dataset = dataset_factory(session, "deep", alpaca_rows(30, prefix="deep"))
    fragment = client.get(f"/datasets/{dataset.id}/tokens",
                          params={"model_id": model.id, "template": "qwen", "row": 27, "cutoff_len": 256}).text
    assert "Row 27 as the model sees it" in fragment
    assert "deep 26: say hi" in fragment and "<mark>hi 26" in fragment


# --------------------------------------------------------------------------- deployments
@pytest.fixture
def deployable(session: Session, tmp_path: Path, base_model: str):  # noqa: F811
    model_factory(session, base_model)
    out = write_adapter(tmp_path / "run-out", base_model)
    for step in (5, 10):
        write_checkpoint(out / f"checkpoint-{step}", base_model)
    checkpoints = [{"name": f"checkpoint-{s}", "step": s, "complete": True} for s in (5, 10)]
    long_name = "a run with a name long enough to be cut off in a narrow picker " * 2
    first = finished_run_factory(session, str(out), base_model, name="first", checkpoints=checkpoints)
    second = finished_run_factory(session, str(out), base_model, name=long_name.strip(), status="cancelled",
                                  checkpoints=checkpoints[:1])
    return first, second


def test_the_adapter_is_picked_from_what_the_run_stored(client, deployable) -> None:
    first, second = deployable
    page = client.get(f"/deployments?run_id={first.id}").text
    picker = re.search(r'<select id="deploy-checkpoint" name="checkpoint">(.*?)</select>', page, re.S).group(1)
    assert re.findall(r'<option value="([^"]*)"', picker) == ["", "checkpoint-10", "checkpoint-5"]
    assert "final adapter" in picker and "checkpoint-10 (step 10)" in picker
    run_picker = re.search(r'<div style="grid-column: 1 / -1">\s*<label for="deploy-run">', page)
    assert run_picker  # the whole width of the form
    assert f">{second.name} — #{second.id}, cancelled</option>" in page  # the whole name
    # Choosing another run asks for its adapters only.
    fragment = client.get(f"/deployments/adapters?run_id={second.id}").text
    assert fragment.lstrip().startswith('<div id="deploy-adapter">')
    assert re.findall(r'<option value="([^"]*)"', fragment) == ["checkpoint-5"]  # cancelled: no final adapter


def _stopped(session: Session, run_id: int, name: str) -> Deployment:
    server = InferenceServer(base_model_path="/models/x", status="stopped")
    session.add(server)
    session.flush()
    deployment = Deployment(name=name, run_id=run_id, server_id=server.id, status=DeploymentStatus.stopped,
                            lora_name=name, stopped_at=utcnow())
    session.add(deployment)
    session.commit()
    return deployment


def test_a_stopped_deployment_can_be_removed_or_redeployed_from_its_row(client, session, deployable) -> None:
    first, _ = deployable
    stopped = _stopped(session, first.id, "old-numbers").id
    page = client.get("/deployments").text
    row = re.search(rf'<tr id="deployment-{stopped}".*?</tr>', page, re.S).group(0)
    assert "Undeploy" not in row and "Redeploy" in row and "Remove" in row

    redeployed = client.post(f"/deployments/{stopped}/redeploy")
    assert redeployed.status_code == 200
    session.expire_all()
    again = session.exec(select(Deployment).where(Deployment.name == "old-numbers", Deployment.id != stopped)).one()
    assert (again.run_id, again.checkpoint, again.status) == (first.id, None, DeploymentStatus.pending)
    assert f'id="deployment-{again.id}"' in redeployed.text

    removed = client.post(f"/deployments/{stopped}/remove")
    assert removed.status_code == 200 and f'id="deployment-{stopped}"' not in removed.text
    session.expire_all()
    assert session.get(Deployment, stopped) is None
    refused = client.post(f"/deployments/{again.id}/remove")  # an active one is undeployed first
    assert "undeploy it first" in refused.text and session.get(Deployment, again.id) is not None


# --------------------------------------------------------------------------- workers
def _beat(client, **extra) -> None:
    headers = {"Authorization": f"Bearer {get_settings().worker_token}"}
    body = {"worker_id": "box", "hostname": "box", "cpu_train_slots": 1, **extra}
    assert client.post("/internal/v1/workers/heartbeat", headers=headers, json=body).status_code == 200


def test_run_doctor_again_says_it_is_running_until_the_report_comes(client) -> None:
    checks = [{"name": "training env", "status": "warning", "detail": "`torch` is a CPU build",
               "fix": "install it with `pip install torch` <b>now</b>"}]
    _beat(client, doctor={"checks": checks, "facts": {}, "created_at": "2026-12-01T10:00:00+00:00"})
    page = client.get("/workers").text
    assert "<code>torch</code> is a CPU build" in page
    assert "install it with <code>pip install torch</code> &lt;b&gt;now&lt;/b&gt;" in page  # code, never markup
    assert "data-doctor-pending" not in page

    asked = client.post("/workers/box/doctor").text
    assert "data-doctor-pending" in asked and "Running the doctor" in asked
    assert re.search(r"<button[^>]*disabled[^>]*>Run doctor again</button>", asked)
    _beat(client)  # a heartbeat without the report: still waiting
    assert "data-doctor-pending" in client.get("/workers").text
    _beat(client, doctor={"checks": [], "facts": {}, "created_at": "2026-12-01T10:01:00+00:00"})
    answered = client.get("/workers").text
    assert "data-doctor-pending" not in answered and "All checks passed" in answered


# --------------------------------------------------------------------------- account
def test_password_change_keeps_this_session_and_ends_the_others(client, data_dir) -> None:
    other = TestClient(create_app())
    with other:
        log_in(other, ADMIN_USERNAME, ADMIN_PASSWORD)
        assert other.get("/account", follow_redirects=False).status_code == 200

        wrong = client.post("/account/password", data={
            "current_password": "not it", "new_password": "a new long password", "new_password_again": "a new long password"})
        field = re.search(r'<input type="password" id="current_password"[^>]*>', wrong.text).group(0)
        assert "That is not your current password." in wrong.text and 'aria-invalid="true"' in field
        differ = client.post("/account/password", data={
            "current_password": ADMIN_PASSWORD, "new_password": "a new long password", "new_password_again": "another"})
        assert "The two new passwords differ." in differ.text

        changed = client.post("/account/password", data={
            "current_password": ADMIN_PASSWORD, "new_password": "a new long password",
            "new_password_again": "a new long password"})
        assert 'id="password-changed"' in changed.text
        assert client.get("/account", follow_redirects=False).status_code == 200  # this browser stays in
        assert other.get("/account", follow_redirects=False).status_code == 303  # the other is logged out
        log_in(other, ADMIN_USERNAME, "a new long password")


def test_tokens_expire(client, session, anon_client) -> None:
    page = client.get("/account").text
    assert '<a href="/deployments#gateway-keys" id="link-gateway-keys">' in page
    assert '<a href="/account#tokens" id="link-personal-tokens">' in client.get("/deployments").text
    options = re.findall(r'<option value="(\d*)">([^<]+)</option>',
                         re.search(r'<select id="token-expires".*?</select>', page, re.S).group(0))
    assert ("30", "30 days") in options and ("", "never") in options

    created = client.post("/account/tokens", data={"name": "laptop", "expires_in_days": "30"}).text
    raw = re.search(r'id="new-token" class="mono" value="([^"]+)"', created).group(1)
    token = session.exec(select(ApiToken).where(ApiToken.name == "laptop")).one()
    assert timedelta(days=29, hours=23) < token.expires_at.replace(tzinfo=None) - utcnow().replace(tzinfo=None) <= timedelta(days=30)
    bearer = {"Authorization": f"Bearer {raw}"}
    assert anon_client.get("/api/v1/runs", headers=bearer).status_code == 200

    token.expires_at = utcnow() - timedelta(seconds=1)
    session.add(token)
    session.commit()
    assert anon_client.get("/api/v1/runs", headers=bearer).status_code == 401
    listed = client.get("/account").text
    assert re.search(r'<span class="badge failed">expired</span>', listed)

    by_api = client.post("/api/v1/tokens", json={"name": "ci", "expires_in_days": 7}).json()
    assert by_api["expires_at"] is not None
    assert client.post("/api/v1/tokens", json={"name": "never"}).json()["expires_at"] is None
    assert client.post("/api/v1/tokens", json={"name": "bad", "expires_in_days": 0}).status_code == 422
    key = client.post("/api/v1/gateway-keys", json={"name": "eval", "expires_in_days": 90}).json()
    assert key["expires_at"] is not None
