"""Page speed with a full panel: 1,000 runs (each with metric points, log lines and their events)
and 300 configs in the database, the real web app (uvicorn) on loopback, one logged-in browser
asking for each list and detail page in turn. Prints p50 and p95 per page against the target
(p95 < 100 ms).

    .venv/bin/python bench/bench_pages.py [--runs 1000] [--configs 300] [--requests 40]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, insert  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from app.db import get_engine  # noqa: E402
from app.models import ModelEntry, Run, RunEvent, RunMetric, TrainConfig  # noqa: E402
from app.models.artifact import RunArtifact  # noqa: E402
from app.models.base import utcnow  # noqa: E402
from app.services import configs as config_service  # noqa: E402
from app.services.llamafactory_params import default_params  # noqa: E402
from tests.factories import alpaca_rows, dataset_factory  # noqa: E402
from tests.live import standalone_panel  # noqa: E402

TARGET_P95_MS = 100.0
METRIC_POINTS = 100  # per run: a run of 100 logged steps
LOG_LINES = 200  # per run
WARMUP = 3


def seed(models_dir: Path, run_count: int, config_count: int) -> dict[str, int]:
    """Rows as the services would leave them, written in bulk (seeding is not what is measured)."""
    engine = get_engine()
    with Session(engine) as session:
        folder = models_dir / "bench-model"
        folder.mkdir(parents=True, exist_ok=True)
        model = ModelEntry(name="bench-model", path=str(folder), model_type="qwen2", suggested_template="qwen")
        session.add(model)
        session.commit()
        datasets = [dataset_factory(session, f"bench-data-{i}", alpaca_rows(200, prefix=f"d{i}")) for i in range(3)]
        dataset_id = datasets[0].id
        params = default_params(0)
        session.execute(insert(TrainConfig), [
            {"name": f"bench-config-{i}", "version": 1, "model_id": model.id, "params": params,
             "dataset_ids": [datasets[i % 3].id], "gpus": 0, "frozen": True, "description": "",
             "created_at": utcnow()}
            for i in range(config_count)
        ])
        session.commit()
        config = session.get(TrainConfig, 1)
        train_yaml = config_service.render_train_yaml(
            config, output_dir="{OUTPUT_DIR}", dataset_dir="{DATASET_DIR}", dataset_names=[datasets[0].name], gpus=0)
        lineage = {"model": {"id": model.id, "name": model.name, "path": model.path},
                   "datasets": [{"id": d.id, "name": d.name, "rows": d.row_count, "sha256": d.sha256}
                                for d in datasets[:1]]}
        results = {"train_loss": 1.2345678, "train_runtime": 61.234, "total_flos": 936898338816.0,
                   "train_samples_per_second": 6.50616455078125, "eval_loss": 1.3456789, "epoch": 3.0}
        statuses = ["succeeded"] * 8 + ["failed", "cancelled"]
        session.execute(insert(Run), [
            {"name": f"bench-run-{i}", "config_id": 1 + i % config_count, "status": statuses[i % 10],
             "status_reason": "", "attempt": 1, "gpus_requested": 0, "gpu_ids": [], "cancel_requested": False,
             "train_yaml": train_yaml, "lineage": lineage, "current_step": METRIC_POINTS,
             "total_steps": METRIC_POINTS, "epoch": 3.0, "percentage": 100.0, "elapsed_s": 61.0,
             "results": results, "checkpoints": [{"name": f"checkpoint-{s}", "step": s, "complete": True}
                                                  for s in (50, 100)],
             "created_at": utcnow()}
            for i in range(run_count)
        ])
        session.commit()
        for run_id in range(1, run_count + 1):
            session.execute(insert(RunMetric), [
                {"run_id": run_id, "attempt": 1, "step": step, "epoch": 3.0 * step / METRIC_POINTS,
                 "loss": 2.0 - step / METRIC_POINTS, "learning_rate": 1e-4, "tokens_per_s": 900.0 + step,
                 "total_tokens": 1000 * step, "elapsed_s": 0.6 * step,
                 "eval_loss": 1.9 - step / METRIC_POINTS if step % 25 == 0 else None}
                for step in range(1, METRIC_POINTS + 1)
            ])
            lines = [f"[INFO|trainer.py:{n}] step {n} of run {run_id}: {'x' * 60}" for n in range(LOG_LINES)]
            events = [{"run_id": run_id, "kind": "status", "data": {"status": "queued", "attempt": 1},
                       "created_at": utcnow()}]
            events += [{"run_id": run_id, "kind": "metric", "data": {"step": step, "loss": 1.0},
                        "created_at": utcnow()} for step in range(1, METRIC_POINTS + 1)]
            events += [{"run_id": run_id, "kind": "log", "log_key": RunEvent.log_key_of(1, "stdout", 100 * n),
                        "data": {"attempt": 1, "source": "stdout", "offset": 100 * n, "line": line},
                        "created_at": utcnow()} for n, line in enumerate(lines)]
            session.execute(insert(RunEvent), events)
            if statuses[(run_id - 1) % 10] == "succeeded":  # what the deploy form lists
                session.execute(insert(RunArtifact), [
                    {"run_id": run_id, "name": name, "step": step, "attempt": 1, "digest": f"{run_id:064x}",
                     "size": 1 << 20, "created_at": utcnow()}
                    for name, step in (("adapter", None), ("checkpoint-50", 50), ("checkpoint-100", 100))
                ])
            if run_id % 100 == 0:
                session.commit()
        session.commit()
        # One run changed since the runs table's cursor: what its poller fetches every 2 s.
        cursor = session.exec(select(func.max(RunEvent.id))).one()
        session.add(RunEvent(run_id=run_count, kind="progress", data={"current_step": METRIC_POINTS}))
        session.commit()
    return {"run": run_count // 2, "config": config_count // 2, "dataset": dataset_id, "cursor": cursor,
            "top": run_count}


def measure(client, path: str, requests: int) -> list[float]:
    for _ in range(WARMUP):
        client.get(path).raise_for_status()
    timings = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path)
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return timings


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--configs", type=int, default=300)
    parser.add_argument("--requests", type=int, default=40, help="timed requests per page")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tuneboard-bench-pages-"))
    with standalone_panel(root, worker=False) as panel:
        started = time.perf_counter()
        ids = seed(root / "models", args.runs, args.configs)
        print(f"seeded {args.runs} runs ({METRIC_POINTS} metric points and {LOG_LINES} log lines each) and "
              f"{args.configs} configs in {time.perf_counter() - started:.0f} s", flush=True)
        compare = "&".join(f"ids={i}" for i in random.Random(1).sample(range(1, args.runs + 1), 3))
        pages = {
            "/runs": "/runs",
            "/runs/rows (poll, 1 changed)": f"/runs/rows?after={ids['cursor']}&top={ids['top']}",
            "/runs/{id}": f"/runs/{ids['run']}",
            "/runs/{id}/log.txt": f"/runs/{ids['run']}/log.txt",
            "/runs/compare (3 runs)": f"/runs/compare?{compare}",
            "/configs": "/configs",
            "/configs/{id}": f"/configs/{ids['config']}",
            "/configs/{id}/edit": f"/configs/{ids['config']}/edit",
            "/configs/new": "/configs/new",
            "/datasets": "/datasets",
            "/datasets/{id}": f"/datasets/{ids['dataset']}",
            "/deployments": "/deployments",
            "/playground": "/playground",
            "/models": "/models",
            "/workers": "/workers",
            "/account": "/account",
        }
        results = {}
        for label, path in pages.items():
            timings = measure(panel.api, path, args.requests)
            results[label] = {"p50_ms": round(statistics.median(timings), 1), "p95_ms": round(p95(timings), 1)}
            mark = "ok " if results[label]["p95_ms"] < TARGET_P95_MS else "SLOW"
            print(f"{mark} {label:<30} p50 {results[label]['p50_ms']:7.1f} ms   p95 {results[label]['p95_ms']:7.1f} ms",
                  flush=True)
    slow = [label for label, r in results.items() if r["p95_ms"] >= TARGET_P95_MS]
    print(json.dumps({"target_p95_ms": TARGET_P95_MS, "pages": results, "slow": slow}))
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
