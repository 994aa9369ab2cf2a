"""Artifact transfer through the panel against plain HTTP on the same machine and link.

    .venv/bin/python bench/bench_artifacts.py [--size-mb 500] [--rounds 3]

A checkpoint folder holding one random file of SIZE_MB travels through the real panel (uvicorn
on loopback, no worker) with workers/artifacts: `upload_folder` (hash, resumable upload, the
panel's verification and commit, the manifest) and `fetch_manifest` into an empty cache (ranged
download, verification, the folder materialized). The baseline is the same file sent with one
plain HTTP PUT to a minimal streaming endpoint (raw ASGI under the same uvicorn, writing the body
to disk) and read back with one plain GET, by the same httpx client. Rounds alternate the paths;
each path's best round counts. Prints MB/s of each and the ratios (target ≥ 0.8), and the rate of
one sha256 pass over the file (a file this big goes through an upload session: the worker and the
panel each make that pass as the bytes go by, not before sending).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 1 << 20
TARGET_RATIO = 0.8


async def baseline_app(scope, receive, send) -> None:
    """PUT /file writes the streamed body to $BASELINE_FILE; GET /file streams it back."""
    if scope["type"] != "http":
        return
    path = os.environ["BASELINE_FILE"]
    if scope["method"] == "PUT":
        with open(path, "wb") as out:
            more = True
            while more:
                message = await receive()
                out.write(message.get("body", b""))
                more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    if not os.path.exists(path):  # the readiness probe, before the first PUT
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = os.path.getsize(path)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(size).encode()), (b"content-type", b"application/octet-stream")]})
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _file_chunks(path: Path):
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def start_baseline(work: Path) -> tuple[subprocess.Popen, str]:
    from tests.live import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench_artifacts:baseline_app", "--app-dir", str(ROOT / "bench"),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "BASELINE_FILE": str(work / "baseline.bin")}, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.head(f"{url}/file", timeout=1)
            return server, url
        except httpx.TransportError:
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from sqlmodel import Session

    from app.db import get_engine
    from app.services import artifacts as artifact_service
    from app.settings import get_settings
    from tests.live import standalone_panel
    from tests.test_artifacts import make_run
    from workers.artifacts import fetch_manifest, upload_folder
    from workers.reporter import Reporter

    work = Path(tempfile.mkdtemp(prefix="bench-artifacts-"))
    checkpoint = work / "output" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    source = checkpoint / "adapter_model.safetensors"
    with source.open("wb") as out:
        for _ in range(args.size_mb):
            out.write(os.urandom(1_000_000))
    (checkpoint / "trainer_state.json").write_text('{"global_step": 500}')  # "complete"
    megabytes = source.stat().st_size / 1e6
    seconds: dict[str, list[float]] = {"upload": [], "put": [], "fetch": [], "get": [], "sha256": []}
    baseline, baseline_url = start_baseline(work)
    try:
        with standalone_panel(work / "panel", worker=False) as panel, httpx.Client(timeout=600) as plain:
            reporter = Reporter(get_settings().model_copy(update={"app_url": panel.url}), timeout_s=600)
            with Session(get_engine()) as session:
                for _ in range(args.rounds):
                    run = make_run(session, f"bench-{time.monotonic_ns()}")
                    started = time.perf_counter()
                    manifest = upload_folder(reporter, run.id, run.attempt, "bench", checkpoint, "checkpoint-500", 500)
                    seconds["upload"].append(time.perf_counter() - started)

                    started = time.perf_counter()
                    response = plain.put(f"{baseline_url}/file", content=_file_chunks(source),
                                         headers={"Content-Length": str(source.stat().st_size)})
                    seconds["put"].append(time.perf_counter() - started)
                    assert response.status_code == 201, response.text

                    cache = work / "worker-cache"
                    started = time.perf_counter()
                    folder = fetch_manifest(reporter, manifest, cache)
                    seconds["fetch"].append(time.perf_counter() - started)
                    assert (folder / source.name).stat().st_size == source.stat().st_size

                    target = work / "downloaded.bin"
                    started = time.perf_counter()
                    with plain.stream("GET", f"{baseline_url}/file") as response, target.open("wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                    seconds["get"].append(time.perf_counter() - started)
                    assert target.stat().st_size == source.stat().st_size

                    started = time.perf_counter()
                    with source.open("rb") as stream:
                        hashlib.file_digest(stream, "sha256")
                    seconds["sha256"].append(time.perf_counter() - started)

                    # The next round starts from an empty store and cache again.
                    artifact_service.delete_run_artifacts(session, run.id)
                    shutil.rmtree(cache)
                    target.unlink()
            reporter.close()
    finally:
        baseline.terminate()
        baseline.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    rate = {path: round(megabytes / min(times), 1) for path, times in seconds.items()}
    ratios = {"upload_vs_put": round(rate["upload"] / rate["put"], 3), "fetch_vs_get": round(rate["fetch"] / rate["get"], 3)}
    print(json.dumps({
        "file_mb": round(megabytes, 1), "rounds": args.rounds,
        "mb_per_s": rate, "seconds": {path: [round(t, 2) for t in times] for path, times in seconds.items()},
        "ratios": ratios, "target": TARGET_RATIO,
    }, indent=2))
    return 0 if min(ratios.values()) >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
