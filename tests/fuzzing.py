"""Schemathesis against a live panel's OpenAPI schema, shared by tests/test_fuzz.py (bounded, CI)
and bench/bench_fuzz.py (longer): zero server errors, zero schema violations.

The panel runs without a worker: operations that queue training (POST /runs, resume, retry,
again) or a vLLM server (POST /deployments) are fuzzed like any other, their tasks stay queued
and nothing trains or serves. Nothing is excluded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from app.db import get_engine
from tests.factories import dataset_factory, finished_run_factory, run_config_factory
from tests.live import LivePanel

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
# Crashes and answers that contradict the schema. Checks that judge API design rather than
# correctness (negative_data_rejection: e.g. an integer id accepted as a numeric string;
# positive_data_acceptance: schema-valid bodies naming rows that do not exist, 404 is right)
# are not what the issue asks for.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,ignored_auth,use_after_free"
)


@dataclass
class FuzzResult:
    returncode: int
    operations: int
    test_cases: int
    failures: list[str]
    output: str


def seed_rows(panel: LivePanel, model_dir: Path) -> None:
    """Rows for the fuzzer to find by id 1: a dataset, a model, a config, a finished run."""
    with Session(get_engine()) as session:
        run_config_factory(session, str(model_dir), name="fuzz")
        dataset_factory(session, "fuzz-extra")
        finished_run_factory(session, str(panel.data_dir / "runs" / "fuzz-output"), str(model_dir))


def fuzz(panel: LivePanel, report_dir: Path, *, max_examples: int, max_time_s: int, seed: int = 1) -> FuzzResult:
    report_dir.mkdir(parents=True, exist_ok=True)
    command = [
        SCHEMATHESIS, "run", f"{panel.url}/api/v1/openapi.json",
        "--header", f"Authorization: Bearer {panel.token}",
        "--checks", CHECKS, "--max-examples", str(max_examples), "--max-time", str(max_time_s),
        "--seed", str(seed), "--workers", "1", "--request-timeout", "30",
        "--report", "ndjson,junit", "--report-dir", str(report_dir),
        "--suppress-health-check", "all", "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=max_time_s * 3 + 120, check=False)
    output = result.stdout + result.stderr
    return FuzzResult(result.returncode, *_summary(report_dir), output)


def _summary(report_dir: Path) -> tuple[int, int, list[str]]:
    operations: set[str] = set()
    cases = 0
    failures: list[str] = []
    for path in report_dir.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if "ScenarioFinished" in event:
                finished = event["ScenarioFinished"]
                operations.add(finished.get("recorder", {}).get("label", ""))
    return len(operations), cases, failures
