"""Schemathesis against a live panel's OpenAPI schema, shared by tests/test_fuzz.py (bounded, CI)
and bench/bench_fuzz.py (longer): zero server errors, zero schema violations.

Two passes of the `schemathesis run` CLI: /api/v1 with a personal API token, and the
OpenAI-compatible gateway (/v1) with a gateway key. The panel runs without a worker: the
operations that queue training (POST /runs, resume, retry, again) or a vLLM server
(POST /deployments) are fuzzed like the others, and their tasks just stay queued.

Skipped, with the reason: GET /api/v1/runs/{run_id}/events — a server-sent event stream that by
design stays open while a run is queued or running (the fuzzer queues runs), so every such request
would end in the fuzzer's read timeout; tests/test_runs_live.py and the fault tests drive it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, select

from app.db import get_engine
from app.models import ApiToken, User
from app.services.users import create_token
from tests.factories import dataset_factory, finished_run_factory, run_config_factory
from tests.live import LivePanel

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
# Crashes, answers that contradict the schema, and auth that is not enforced. Left out: checks
# that judge API design rather than correctness (negative_data_rejection: e.g. "1" accepted for
# an integer query parameter, as FastAPI does; positive_data_acceptance: schema-valid bodies that
# name rows which do not exist are rightly refused).
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,ignored_auth,use_after_free"
)
EVENT_STREAM = "^/api/v1/runs/\\{run_id\\}/events$"
# Token ids the fuzzer is unlikely to draw, so DELETE /tokens/{id} cannot revoke its own.
FUZZER_TOKEN_IDS = (987_651, 987_652)


@dataclass
class FuzzResult:
    returncode: int
    operations: int = 0
    test_cases: int = 0
    failures: int = 0
    errors: int = 0
    outputs: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and self.failures == 0 and self.errors == 0

    def add(self, returncode: int, output: str) -> None:
        self.returncode = self.returncode or returncode
        self.outputs.append(output)
        self.operations += _number(r"Tested: (\d+)", output)
        self.test_cases += _number(r"(\d+) generated", output)
        self.failures += _number(r"found (\d+) unique failures", output)
        self.errors += _number(r"(\d+) errored", output)


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else 0


def seed_rows(panel: LivePanel, model_dir: Path) -> tuple[str, str]:
    """Rows for the fuzzer to find (a model, datasets, a config, a finished run) and its two
    credentials: a personal API token and a gateway key."""
    with Session(get_engine()) as session:
        run_config_factory(session, str(model_dir), name="fuzz")
        dataset_factory(session, "fuzz-extra")
        finished_run_factory(session, str(panel.data_dir / "runs" / "fuzz-output"), str(model_dir))
        admin = session.exec(select(User).where(User.username == panel.username)).one()
        raws = []
        for token_id, kind in zip(FUZZER_TOKEN_IDS, ("api", "gateway"), strict=True):
            token, raw = create_token(session, admin, f"fuzzer-{kind}", kind=kind)
            session.delete(token)
            session.flush()
            session.add(ApiToken(**{**token.model_dump(), "id": token_id}))
            session.commit()
            raws.append(raw)
    # The first config check lists LLaMA-Factory's templates in the training env (seconds to a
    # minute on a busy 2-core machine; cached after): pay it before the clock starts.
    panel.api.get("/datasets/templates", timeout=300)
    return raws[0], raws[1]


def fuzz(panel: LivePanel, report_dir: Path, *, max_examples: int, max_time_s: int, seed: int = 1) -> FuzzResult:
    """The /api/v1 pass gets most of the time budget; the gateway (2 operations) the rest."""
    api_token, gateway_key = seed_rows(panel, panel.data_dir.parent / "models")
    result = FuzzResult(0)
    passes = [
        (api_token, ["--include-path-regex", "^/api/v1/", "--exclude-path-regex", EVENT_STREAM],
         max(1, max_time_s * 4 // 5)),
        (gateway_key, ["--include-path-regex", "^/v1/"], max(1, max_time_s // 5)),
    ]
    # Loaded from a file: the schema needs a login (the API token), the gateway pass sends its key.
    report_dir.mkdir(parents=True, exist_ok=True)
    schema = report_dir / "openapi.json"
    schema.write_bytes(panel.api.get("/api/v1/openapi.json").raise_for_status().content)
    for index, (credential, selection, seconds) in enumerate(passes):
        command = [
            SCHEMATHESIS, "run", str(schema), "--url", panel.url, *selection,
            "--header", f"Authorization: Bearer {credential}",
            "--checks", CHECKS, "--max-examples", str(max_examples), "--max-time", str(seconds),
            "--seed", str(seed), "--workers", "1", "--request-timeout", "60",
            "--report", "junit,ndjson", "--report-dir", str(report_dir / f"pass-{index}"),
            "--suppress-health-check", "all", "--no-color",
        ]
        ran = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 3 + 180, check=False)
        result.add(ran.returncode, ran.stdout + ran.stderr)
    return result
