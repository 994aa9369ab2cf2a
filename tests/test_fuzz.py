"""Fuzzing the live panel, bounded for CI (deterministic seeds). Schemathesis against its OpenAPI
schema, authenticated (about a minute and a half): zero server errors, zero schema violations. The
structural families (nesting, escapes, encodings, enormous rows and key counts, YAML features):
each attack a 4xx naming its row or line, nothing stored, the panel up. The longer run is
bench/bench_fuzz.py; what is fuzzed and what is skipped (and why) is in tests/fuzzing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from tests.fuzzing import FAMILIES, fuzz, fuzz_structure
from tests.live import LivePanel, live_panel  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)
def test_the_api_survives_the_fuzzer_and_answers_as_its_schema_says(live_panel: LivePanel, tmp_path: Path) -> None:
    result = fuzz(live_panel, tmp_path / "fuzz", max_examples=3, max_time_s=80, seed=7)
    report = "\n".join(result.outputs)[-12000:]
    assert result.clean, report
    assert result.operations >= 50 and result.test_cases > 100, report
    assert "Traceback" not in live_panel.log("web", 200_000), live_panel.log("web")


@pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)
def test_structural_attacks_get_a_4xx_naming_their_row_or_line(live_panel: LivePanel) -> None:
    result = fuzz_structure(live_panel, per_family=3, seed=7)
    assert result.clean, "\n".join(result.failures)
    assert set(result.by_family) == set(FAMILIES) and sum(result.by_family.values()) == 3 * len(FAMILIES)
    assert "Traceback" not in live_panel.log("web", 200_000), live_panel.log("web")


def test_the_schema_and_the_docs_need_a_login(anon_client, client, session) -> None:
    assert anon_client.get("/api/v1/openapi.json").status_code == 401
    docs = anon_client.get("/api/docs", follow_redirects=False)
    assert docs.status_code == 303 and docs.headers["location"].startswith("/login")
    assert client.get("/api/docs").status_code == 200
    from app.models import User
    from app.services.users import create_token

    _token, raw = create_token(session, session.exec(select(User)).first(), "schema")
    schema = anon_client.get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {raw}"})
    assert schema.status_code == 200 and "/api/v1/runs" in schema.json()["paths"]


def test_an_id_beyond_64_bits_is_refused_not_a_crash(client) -> None:
    """Found by the fuzzer: SQLite raised OverflowError (500) on ids above 2^63 - 1."""
    for path in ("/api/v1/runs/9223372036854775808", "/api/v1/datasets/314284403142575456256/download"):
        response = client.get(path)
        assert response.status_code == 422 and "out of range" in response.json()["detail"]


def test_a_malformed_multipart_upload_is_refused_not_a_crash(client) -> None:
    """Found by the fuzzer: python-multipart's parse error escaped as a 500."""
    body = b"--b\r\n[{'x': []}]--b--\r\n"
    response = client.post("/api/v1/datasets", content=body,
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "malformed multipart body" in response.json()["detail"]
    assert client.get("/api/v1/datasets").json() == []
