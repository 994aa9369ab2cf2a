"""Upload throughput and the server's peak RSS for `POST /api/v1/datasets` end to end: a real
uvicorn server (own data dir), an httpx client streaming an Alpaca JSON file of SIZE_MB.

    .venv/bin/python bench/bench_upload.py [SIZE_MB]      (default 512)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.serving import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_file(path: Path, size_mb: int) -> int:
    rows = 0
    with open(path, "w") as out:
        out.write("[")
        while out.tell() < size_mb * 1024 * 1024:
            row = {"instruction": f"Explain item {rows} in two sentences, please.", "input": "x" * (rows % 200),
                   "output": f"Item {rows} is a thing. " * 20}
            out.write(("," if rows else "") + json.dumps(row))
            rows += 1
        out.write("]")
    return rows


def main() -> None:
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    data = work / "rows.json"
    rows = make_file(data, size_mb)
    env = {**os.environ, "TUNEBOARD_DATA_DIR": str(work / "data"), "TUNEBOARD_MAX_UPLOAD_BYTES": str(4 << 30)}
    subprocess.run([sys.executable, "-m", "app.cli", "user", "create", "--admin", "bench", "--password-stdin"],
                   input="bench password\n", text=True, env=env, cwd=ROOT, check=True, capture_output=True)
    token = subprocess.run(
        [sys.executable, "-c", "from sqlmodel import Session; from app.db import get_engine; "
         "from app.services.users import get_user_by_name, create_token; s = Session(get_engine()); "
         "print(create_token(s, get_user_by_name(s, 'bench'), 'bench')[1])"],
        env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                               "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        process = psutil.Process(server.pid)
        baseline = process.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        started = time.perf_counter()
        with open(data, "rb") as stream:
            response = httpx.post(f"{url}/api/v1/datasets", headers={"Authorization": f"Bearer {token}"},
                                  data={"name": "bench"}, files={"file": ("rows.json", stream)}, timeout=3600)
        elapsed = time.perf_counter() - started
        done.set()
        assert response.status_code == 201, response.text
        mb = data.stat().st_size / 1e6
        print(json.dumps({"file_mb": round(mb, 1), "rows": rows, "seconds": round(elapsed, 2),
                          "mb_per_s": round(mb / elapsed, 1), "server_rss_before_mb": round(baseline / 1e6),
                          "server_rss_peak_mb": round(peak[0] / 1e6)}))
    finally:
        server.terminate()
        server.wait(10)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
