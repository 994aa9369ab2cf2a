"""Fuzzing a live panel, shared by tests/test_fuzz.py (bounded, CI) and bench/bench_fuzz.py (longer).

Schema-driven: schemathesis against the panel's OpenAPI schema, zero server errors, zero schema
violations. Structural (`fuzz_structure`): inputs shaped differently from what any schema says, in
families (nesting depth, escapes, encodings, enormous rows, enormous key counts, YAML features),
generated at random from a seed and sent to `POST /api/v1/datasets` and `POST /api/v1/configs/import`:
each must get a 4xx naming the row or line it failed at, store nothing, and leave the panel up.

Two passes of the `schemathesis run` CLI: /api/v1 with a personal API token, and the
OpenAI-compatible gateway (/v1) with a gateway key. The panel runs without a worker: the
operations that queue training (POST /runs, resume, retry, again) or a vLLM server
(POST /deployments) are fuzzed like the others, and their tasks just stay queued.

Skipped, with the reason: GET /api/v1/runs/{run_id}/events — a server-sent event stream that by
design stays open while a run is queued or running (the fuzzer queues runs), so every such request
would end in the fuzzer's read timeout; tests/test_runs_live.py and the fault tests drive it.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sqlmodel import Session, select

from app.db import get_engine
from app.models import ApiToken, User
from app.services.users import create_token
from tests.factories import dataset_factory, finished_run_factory, run_config_factory
from tests.test_deploy import write_adapter
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
        # Its adapter goes into the artifact store, so the folder must hold one.
        adapter = write_adapter(panel.data_dir.parent / "fuzz-adapter", str(model_dir))
        finished_run_factory(session, str(adapter), str(model_dir))
        admin = session.exec(select(User).where(User.username == panel.username)).one()
        raws = []
        for token_id, kind in zip(FUZZER_TOKEN_IDS, ("api", "gateway"), strict=True):
            token, raw = create_token(session, admin, f"fuzzer-{kind}", kind=kind)
            session.delete(token)
            session.flush()
            session.add(ApiToken(**{**token.model_dump(), "id": token_id}))
            session.commit()
            raws.append(raw)
    warm_up(panel)
    return raws[0], raws[1]


def warm_up(panel: LivePanel) -> None:
    """The first config check asks the training env for LLaMA-Factory's templates and argument
    names (seconds to a minute on a busy 2-core machine; cached after): pay it before the clock."""
    panel.api.get("/datasets/templates", timeout=300)
    panel.api.post("/api/v1/configs/estimate", json={"name": "warm-up"}, timeout=300).raise_for_status()


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


# ------------------------------------------------------------------------ structural attacks

FAMILIES = ("nesting", "escapes", "encodings", "huge_rows", "key_counts", "yaml")
REFUSALS = (400, 413, 415, 422)
GOOD_ROW = {"instruction": "say hi", "input": "", "output": "hi"}
ROW_LIMIT = 32 * 1024 * 1024  # DatasetIngest's max_row_bytes


@dataclass(frozen=True)
class HostileInput:
    """One structural attack: what is sent where, and what its refusal must name (a regex)."""

    family: str
    name: str
    target: str  # "dataset": POST /api/v1/datasets; "config": POST /api/v1/configs/import
    body: bytes
    where: str
    as_file: bool = True  # a config sent as a YAML file upload rather than a JSON {"yaml": ...} body


def _dataset(rng: random.Random, family: str, name: str, bad_row: bytes, where: str | None = None) -> HostileInput:
    """`bad_row` (JSON text) after 0-4 good rows, in a JSON array or JSON Lines; the refusal names its row."""
    before = rng.randint(0, 4)
    good = [json.dumps({**GOOD_ROW, "instruction": f"say hi {i}"}).encode() for i in range(before + 1)]
    rows = [*good[:before], bad_row, good[before]]
    jsonl = rng.random() < 0.5 and b"\n" not in bad_row
    body = b"\n".join(rows) + b"\n" if jsonl else b"[" + b",".join(rows) + b"]"
    return HostileInput(family, f"{name} ({'jsonl' if jsonl else 'json'})", "dataset", body,
                        where or rf"\brow {before + 1}\b")


def _config(family: str, name: str, lines: list[str], bad_line: int | None, where: str | None = None,
            encoding: str = "utf-8") -> HostileInput:
    """A YAML file whose refusal names line `bad_line` (1-based) or matches `where`."""
    text = "\n".join(lines) + "\n"
    return HostileInput(family, name, "config", text.encode(encoding, "surrogatepass"),
                        where or rf"\bline {bad_line}\b")


def _config_lines(rng: random.Random) -> list[str]:
    """A few plain LLaMA-Factory lines to put an attack among."""
    lines = ["stage: sft", "finetuning_type: lora", "template: qwen", "learning_rate: 1.0e-4", "lora_rank: 8"]
    return lines[:rng.randint(1, len(lines))]


def _nesting(rng: random.Random) -> HostileInput:
    depth = rng.choice([65, 300, 990, 5000, 200_000])
    if rng.random() < 0.5:
        opening, closing = (b"[", b"]") if rng.random() < 0.5 else (b'{"a": ', b"}")
        inner = opening * depth + (b"1" if opening != b"[" else b"") + closing * depth
        return _dataset(rng, "nesting", f"a field {depth} levels deep", b'{"instruction": "q", "output": "a",'
                        b' "meta": ' + inner + b"}")
    lines = _config_lines(rng)
    depth = rng.choice([9, 40, 5000])
    if rng.random() < 0.5:
        lines.append("report_to: " + "[" * depth + "]" * depth)
        return _config("nesting", f"a flow list {depth} deep", lines, len(lines))
    block = [("  " * level) + f"k{level}:" for level in range(min(depth, 60))]
    lines += block
    return _config("nesting", "block mappings 60 deep", lines, len(lines) - len(block) + 9)


def _escapes(rng: random.Random) -> HostileInput:
    escape = rng.choice(["\\udc00", "\\ud800", "\\uDBFF x", "\\udfff\\ud800", "\\uD834"])
    spot = rng.choice(["value", "key", "message"])
    if spot == "value":
        row = '{"instruction": "q", "input": "", "output": "a ' + escape + '"}'
    elif spot == "key":
        row = '{"instruction": "q", "output": "a", "' + escape + '": "x"}'
    else:
        row = '{"conversations": [{"from": "human", "value": "q' + escape + '"}, {"from": "gpt", "value": "a"}]}'
    if rng.random() < 0.7:
        return _dataset(rng, "escapes", f"{escape} in a {spot}", row.encode())
    lines = _config_lines(rng)
    if rng.random() < 0.5:
        lines.append(f'run_name: "{escape}"')
        return _config("escapes", f"YAML escape {escape}", lines, len(lines))
    body = json.dumps({"yaml": "\n".join(lines)})[:-2] + escape + '"}'
    return HostileInput("escapes", f"JSON body escape {escape}", "config", body.encode(), r"\bline 1\b",
                        as_file=False)


_BAD_UTF8 = (b"\xff", b"\xe9", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80")


def _encodings(rng: random.Random) -> HostileInput:
    encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", None])
    if rng.random() < 0.5:
        if encoding is not None:
            body = json.dumps([GOOD_ROW] * rng.randint(1, 5)).encode(encoding)
            return HostileInput("encodings", encoding, "dataset", body, r"UTF-(16|32)")
        bad = rng.choice(_BAD_UTF8)
        return _dataset(rng, "encodings", f"invalid UTF-8 {bad!r}", b'{"instruction": "q", "output": "a' + bad + b'"}')
    lines = _config_lines(rng)
    if encoding is not None:
        return _config("encodings", f"YAML in {encoding}", lines, None, r"UTF-(16|32)", encoding=encoding)
    bad = rng.choice(_BAD_UTF8)
    body = ("\n".join([*lines, "run_name: x"]) + "\n").encode().replace(b"run_name: x", b"run_name: " + bad)
    return HostileInput("encodings", f"YAML with {bad!r}", "config", body, rf"\bline {len(lines) + 1}\b")


def _huge_rows(rng: random.Random) -> HostileInput:
    if rng.random() < 0.5:
        size = ROW_LIMIT + rng.randint(1, 1024 * 1024)
        return _dataset(rng, "huge_rows", f"one row of {size} bytes",
                        json.dumps({**GOOD_ROW, "output": "x" * size}).encode())
    lines = _config_lines(rng)
    if rng.random() < 0.5:
        lines.append("run_name: " + "x" * rng.randint(70_000, 200_000))
        return _config("huge_rows", "one value over the parameters' cap", lines, None, r"run_name is the largest")
    lines += [f"# {'x' * 1000}"] * rng.randint(300, 600)
    return _config("huge_rows", "a YAML over the size cap", lines, None, r"over the limit of 262144")


def _key_counts(rng: random.Random) -> HostileInput:
    if rng.random() < 0.6:
        shape = rng.choice(["one row", "spread", "long key"])
        if shape == "one row":
            keys = rng.randint(1001, 20_000)
            return _dataset(rng, "key_counts", f"{keys} keys in a row",
                            json.dumps({**GOOD_ROW, **{f"k{i}": i for i in range(keys)}}).encode())
        if shape == "long key":
            length = rng.randint(1025, 100_000)
            return _dataset(rng, "key_counts", f"a key of {length} characters",
                            json.dumps({**GOOD_ROW, "k" * length: 1}).encode())
        rows = [json.dumps({**GOOD_ROW, **{f"r{row}k{i}": "v" for i in range(300)}}) for row in range(6)]
        return HostileInput("key_counts", "300 new keys per row", "dataset", f"[{','.join(rows)}]".encode(),
                            r"\brow 4\b")
    keys = rng.randint(513, 20_000)
    return _config("key_counts", f"{keys} keys", [f"k{i}: {i}" for i in range(keys)], None,
                   rf"{keys} parameters: LLaMA-Factory has fewer than 512 arguments")


_TAGS = ("!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/object:object {}",
         "!!binary aGVsbG8=", "!!set {a: null}", "!!timestamp 2001-12-14", "!!omap [a: 1]", "!local value",
         "!<tag:example.com,2000:app/x> value")


def _yaml(rng: random.Random) -> HostileInput:
    lines = _config_lines(rng)
    feature = rng.choice(["anchors", "merge keys", "tags", "documents"])
    width = rng.randint(8, 12)
    if feature == "anchors":
        lines.append(f"l0: &l0 [{', '.join(['lol'] * width)}]")
        for level in range(1, rng.randint(5, 8) + 1):
            lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
        return _config("yaml", f"a billion laughs, {width} wide", lines, len(lines))
    if feature == "merge keys":
        lines.append("m0: &m0 {a: 1, b: 2, c: 3}")
        for level in range(1, rng.randint(5, 7) + 1):
            lines.append(f"m{level}: &m{level} {{<<: [{', '.join([f'*m{level - 1}'] * width)}]}}")
        return _config("yaml", f"merge keys {width} wide", lines, len(lines))
    if feature == "tags":
        tag = rng.choice(_TAGS)
        lines.append(f"run_name: {tag}")
        return _config("yaml", f"tag {tag.split()[0]}", lines, len(lines))
    documents = rng.randint(2, 5)
    second = len(lines) + 1
    lines += ["---", *(["stage: pt", "---"] * (documents - 2)), "stage: sft"]
    return _config("yaml", f"{documents} documents", lines, second)


GENERATORS: dict[str, Callable[[random.Random], HostileInput]] = {
    "nesting": _nesting, "escapes": _escapes, "encodings": _encodings, "huge_rows": _huge_rows,
    "key_counts": _key_counts, "yaml": _yaml,
}


def hostile_inputs(rng: random.Random, per_family: int) -> list[HostileInput]:
    return [GENERATORS[family](rng) for family in FAMILIES for _ in range(per_family)]


@dataclass
class StructuralResult:
    by_family: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.failures


def _send(api: httpx.Client, case: HostileInput) -> httpx.Response:
    if case.target == "dataset":
        return api.post("/api/v1/datasets", files={"file": ("hostile.json", case.body)}, timeout=120)
    if case.as_file:
        return api.post("/api/v1/configs/import", files={"file": ("hostile.yaml", case.body)}, timeout=120)
    return api.post("/api/v1/configs/import", content=case.body, headers={"Content-Type": "application/json"},
                    timeout=120)


def _stored(panel: LivePanel) -> tuple:
    """What a refused input must not change: the rows the API lists and the dataset folders."""
    folder = panel.data_dir / "datasets"  # <id>/ of each dataset, and .incoming/ (uploads on their way)
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []
    return (panel.api.get("/api/v1/datasets").json(), panel.api.get("/api/v1/configs").json(),
            [name for name in files if name != ".incoming"])


def _problem(case: HostileInput, response: httpx.Response) -> str | None:
    if response.status_code not in REFUSALS:
        return f"answered {response.status_code}: {response.text[:300]}"
    try:
        detail = json.dumps(response.json(), ensure_ascii=False)
    except ValueError:
        return f"answered {response.status_code} with no JSON: {response.text[:300]}"
    if not re.search(case.where, detail):
        return f"the refusal does not name {case.where!r}: {detail[:300]}"
    return None


def fuzz_structure(panel: LivePanel, *, per_family: int, seed: int) -> StructuralResult:
    """Every family `per_family` times, drawn from `seed`; one failure line per case that did not
    get a 4xx naming its row or line, that stored something, or after which the panel was down."""
    warm_up(panel)
    result = StructuralResult()
    before = _stored(panel)
    for case in hostile_inputs(random.Random(seed), per_family):
        result.by_family[case.family] += 1
        try:
            problem = _problem(case, _send(panel.api, case))
        except httpx.TransportError as error:
            problem = f"no answer: {error!r}"
        if problem is None and _stored(panel) != before:
            problem = "something was stored"
        if panel.api.get("/healthz").status_code != 200:
            problem = (problem or "") + "; the panel is down"
        if problem:
            result.failures.append(f"{case.family} / {case.name}: {problem}")
    return result
