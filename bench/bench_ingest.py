"""Benchmark the streaming dataset ingester against `datasets.load_dataset("json")`.

    .venv/bin/python bench/bench_ingest.py [--size-mb 1024] [--keep DIR] [--skip-datasets]

Generates a ~size-MiB Alpaca JSON array in a temp dir (deleted afterwards), then in a fresh
subprocess feeds it the way an upload is fed: the dataset service's IncomingFile (validator, hash,
and the stored copy written to a data dir of its own) in the web layer's hand-off chunks
(app/web/uploads.py FEED_BYTES). It reports throughput and the child's peak RSS (ru_maxrss via
wait4), then times `datasets.load_dataset("json", data_files=...)` in a subprocess of the training
env (.envs/train/bin/python) and prints the ratio. Both runs read the file from the page cache (it
was just written). bench/bench_upload.py measures the whole HTTP upload.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / ".envs" / "train" / "bin" / "python"

WORDS = (
    "the a model data train learn token answer question explain write summary list code python function "
    "value error result example context system user assistant because therefore however first second "
    "finally number table chart review improve translate story poem email letter recipe plan travel "
    "history science music health money market customer product design energy climate water city"
).split()
NON_ASCII = "café naïve résumé Übermaß 東京 数据集 模型 训练 привет мир ½ — “quoted” ✓".split()


def _text(rng: random.Random, lo: int, hi: int, non_ascii: bool) -> str:
    n = rng.randint(lo, hi)
    words = rng.choices(WORDS, k=n)
    if non_ascii and n:
        for _ in range(max(1, n // 15)):
            words[rng.randrange(n)] = rng.choice(NON_ASCII)
    return " ".join(words)


def generate(path: Path, size_mb: int, seed: int = 1234) -> tuple[int, int]:
    """Write an Alpaca JSON array of about size_mb MiB; return (bytes, rows)."""
    rng = random.Random(seed)
    pool = 4093  # prime-sized pools, combined with the row index so rows are distinct
    instr = [_text(rng, 8, 30, i % 10 == 0) for i in range(pool)]
    inputs = [_text(rng, 0, 40, i % 10 == 0) if i % 3 else "" for i in range(pool)]
    outputs = [_text(rng, 40, 220, i % 10 == 0) + "\n\n" + _text(rng, 5, 40, False) for i in range(pool)]
    systems = [_text(rng, 5, 20, False) for _ in range(97)]
    target = size_mb * 1024 * 1024
    dumps = json.dumps
    written = 0
    rows = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n")
        written += 2
        first = True
        while written < target:
            parts = []
            for _ in range(5000):
                i = rows
                row = {
                    "instruction": f"({i}) {instr[i % pool]}",
                    "input": inputs[(i * 7) % pool],
                    "output": outputs[(i * 13) % pool],
                }
                if i % 20 == 0:
                    row["system"] = systems[i % 97]
                if i % 33 == 0:
                    row["history"] = [[instr[(i + 1) % pool], outputs[(i + 2) % pool][:200]]]
                parts.append(dumps(row, ensure_ascii=False))
                rows += 1
            s = ("" if first else ",\n") + ",\n".join(parts)
            first = False
            f.write(s)
            written += len(s.encode("utf-8"))
        f.write("\n]\n")
    return path.stat().st_size, rows


INGEST_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
os.environ["TUNEBOARD_DATA_DIR"] = sys.argv[3]
from app.services.datasets import IncomingFile, UploadOptions
from app.web.uploads import FEED_BYTES
t = time.perf_counter()
incoming = IncomingFile(UploadOptions(), os.path.basename(sys.argv[1]))
with open(sys.argv[1], "rb", buffering=0) as source:
    while chunk := source.read(FEED_BYTES):
        incoming.write(chunk)
r = incoming.finish()
dt = time.perf_counter() - t
incoming.discard()
print(json.dumps({"seconds": dt, "rows": r.rows, "bytes": r.bytes, "ok": r.ok, "issues": r.issue_counts,
                  "prompt_chars": r.prompt_chars.__dict__, "response_chars": r.response_chars.__dict__,
                  "sample": len(r.sample), "sha256": r.sha256}))
"""

DATASETS_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import datasets
t = time.perf_counter()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[2])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "import_seconds": t - t0, "rows": ds.num_rows, "version": datasets.__version__}))
"""


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, float, float, float]:
    """Run a child; return (its JSON output, wall seconds, peak RSS MiB, CPU seconds user+sys)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {err.decode(errors='replace')[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    return res, wall, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime  # ru_maxrss is KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="approximate file size in MiB (default 1024)")
    ap.add_argument("--keep", help="directory to write the file into and keep (default: temp dir, deleted)")
    ap.add_argument("--skip-datasets", action="store_true", help="do not run datasets.load_dataset")
    args = ap.parse_args()

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "alpaca_bench.json"
    try:
        t = time.perf_counter()
        if path.exists() and args.keep:
            size, rows = path.stat().st_size, None
        else:
            size, rows = generate(path, args.size_mb)
        print(f"dataset: {path} {size / 1e6:.1f} MB ({size / 2**20:.0f} MiB), rows={rows}, "
              f"generated in {time.perf_counter() - t:.1f}s")
        print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")

        load = os.getloadavg()[0]
        res, wall, rss, cpu = run_child([sys.executable, "-c", INGEST_CHILD, str(path), str(ROOT), str(tmp / "data")])
        mbps = size / 1e6 / res["seconds"]
        print(f"ingest : {res['seconds']:.2f}s  {mbps:.1f} MB/s  peak RSS {rss:.0f} MiB  rows={res['rows']} "
              f"ok={res['ok']} issues={res['issues']}")
        print(f"         child CPU {cpu:.2f}s (= {size / 1e6 / cpu:.1f} MB/s per CPU-second; wall includes any "
              f"contention - load average before the run: {load:.2f})")
        print(f"         prompt_chars={res['prompt_chars']}")
        print(f"         response_chars={res['response_chars']}")
        ok_speed, ok_rss = mbps >= 50, rss < 300
        print(f"targets: >=50 MB/s {'PASS' if ok_speed else 'FAIL'}; peak RSS <300 MiB {'PASS' if ok_rss else 'FAIL'}")

        if args.skip_datasets:
            print("datasets: skipped (--skip-datasets)")
        elif not TRAIN_PY.exists():
            print(f"datasets: SKIPPED - training env python not found at {TRAIN_PY} (build the training env first)")
        else:
            cache = tmp / "hf_cache"
            env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            try:
                dres, dwall, drss, dcpu = run_child([str(TRAIN_PY), "-c", DATASETS_CHILD, str(path), str(cache)], env)
            except RuntimeError as e:
                print(f"datasets: FAILED - {e}")
            else:
                dmbps = size / 1e6 / dres["seconds"]
                print(f"datasets {dres['version']}: load_dataset {dres['seconds']:.2f}s  {dmbps:.1f} MB/s  "
                      f"peak RSS {drss:.0f} MiB  rows={dres['rows']} (import {dres['import_seconds']:.1f}s, "
                      f"child CPU {dcpu:.1f}s)")
                print(f"ratio  : ingest is {dres['seconds'] / res['seconds']:.2f}x the speed of load_dataset "
                      f"(time ratio load_dataset/ingest), RSS ratio {drss / rss:.1f}x")
                if dres["rows"] != res["rows"]:
                    print(f"WARNING: row counts differ: ingest {res['rows']} vs datasets {dres['rows']}")
            shutil.rmtree(cache, ignore_errors=True)
        return 0 if (ok_speed and ok_rss) else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
