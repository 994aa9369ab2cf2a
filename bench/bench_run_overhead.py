"""Overhead of the panel: submit → first logged step, through the panel (POST /api/v1/runs → Celery
→ worker claim → run folder → llamafactory-cli) against `llamafactory-cli train` run directly on the
same YAML, tiny model, same machine. Target: ≤ 1 s added.

"First logged step" is the first line of trainer_log.jsonl on disk (both ways); for the panel we
also print when the first metric reached the app (what the dashboard shows).

    .venv/bin/python bench/bench_run_overhead.py [--rounds 3] [--broker redis://127.0.0.1:6379/11]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import Session  # noqa: E402

from app.db import get_engine  # noqa: E402
from app.settings import PROJECT_ROOT, get_settings  # noqa: E402
from tests.factories import run_config_factory  # noqa: E402
from tests.live import standalone_panel  # noqa: E402

POLL_S = 0.01
TIMEOUT_S = 300.0
# A short run: the bench measures the start, not the training.
PARAMS = {"num_train_epochs": 1.0, "val_size": 0.0, "eval_strategy": "no", "save_steps": 1000}


def wait_for_first_line(path: Path, started: float) -> float:
    while not (path.is_file() and path.stat().st_size > 0):
        if time.monotonic() - started > TIMEOUT_S:
            raise TimeoutError(f"no line in {path}")
        time.sleep(POLL_S)
    return time.monotonic() - started


def trainer_spawned_after(worker: psutil.Process, started: float) -> float:
    """Seconds from `started` until the worker's llamafactory-cli child is seen (polled every
    10 ms: psutil's create_time() is only as precise as the boot time, about a second)."""
    while True:
        for child in worker.children(recursive=True):
            try:
                if any("train.yaml" in part for part in child.cmdline()):
                    return time.monotonic() - started
            except psutil.Error:
                continue
        if time.monotonic() - started > TIMEOUT_S:
            raise TimeoutError("the worker started no trainer")
        time.sleep(POLL_S)


def panel_round(panel, config_id: int) -> tuple[float, float, float, Path]:
    """Submit → first trainer_log line, → first metric in the app, and submit → trainer process start."""
    started = time.monotonic()
    run = panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()
    run_dir = panel.data_dir / "runs" / str(run["id"])
    spawned = trainer_spawned_after(psutil.Process(panel.processes["worker"].pid), started)
    first_line = wait_for_first_line(run_dir / "output" / "trainer_log.jsonl", started)
    while not panel.api.get(f"/api/v1/runs/{run['id']}/metrics").json():
        time.sleep(POLL_S)
    first_metric = time.monotonic() - started
    while panel.api.get(f"/api/v1/runs/{run['id']}").json()["status"] not in ("succeeded", "failed", "cancelled", "lost"):
        time.sleep(0.2)
    return first_line, first_metric, spawned, run_dir


def direct_round(template_dir: Path, work: Path) -> float:
    """`llamafactory-cli train` on a copy of the panel's run folder (same YAML, data, env)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(template_dir / "dataset_info.json", work)
    shutil.copytree(template_dir / "data", work / "data")
    config = yaml.safe_load((template_dir / "train.yaml").read_text())
    config.update(output_dir=str(work / "output"), dataset_dir=str(work))
    (work / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    settings = get_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBOARD_")}
    env.update(LLAMABOARD_ENABLED="1", LLAMABOARD_WORKDIR=str(work / "output"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    started = time.monotonic()
    process = subprocess.Popen([settings.llamafactory_cli, "train", "train.yaml"], cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_line = wait_for_first_line(work / "output" / "trainer_log.jsonl", started)
    process.wait()
    return first_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", default=None, help="redis://…; default: the embedded transport")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        with standalone_panel(root, broker_url=args.broker) as panel:
            model = root / "models" / "tiny"
            subprocess.run([get_settings().train_python, str(PROJECT_ROOT / "workers/envscripts/demo_model.py"),
                            str(model)], check=True, capture_output=True)
            with Session(get_engine()) as session:
                config_id = run_config_factory(session, str(model), rows=40, params=PARAMS).id
            *_, template = panel_round(panel, config_id)  # warm-up: caches, imports, the worker's first task
            direct, through_panel, to_app, spawn = [], [], [], []
            for index in range(args.rounds):
                direct.append(direct_round(template, root / "direct" / str(index)))
                line, metric, spawned, _ = panel_round(panel, config_id)
                through_panel.append(line)
                to_app.append(metric)
                spawn.append(spawned)
                print(f"round {index + 1}: direct {direct[-1]:.2f} s, panel {line:.2f} s (trainer started "
                      f"{spawned:.2f} s after submit; first metric in the app {metric:.2f} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    d, p, m, sp = (statistics.median(x) for x in (direct, through_panel, to_app, spawn))
    print(f"broker: {args.broker or 'embedded (SQLite)'}; medians of {args.rounds} rounds")
    print(f"submit → first trainer_log line: direct {d:.2f} s, through the panel {p:.2f} s")
    print(f"added by the panel: {p - d:+.2f} s (target ≤ 1.00 s); ratio panel/direct {p / d:.2f}")
    print(f"submit → first metric stored in the app: {m:.2f} s ({m - d:+.2f} s over direct's first line)")
    # Independent of how fast the trainer itself starts (noisy on a busy machine): the panel's own
    # share is the time from submit until it has launched llamafactory-cli.
    print(f"submit → llamafactory-cli launched by the worker: {sp:.2f} s (the panel's own share; target ≤ 1 s)")
    print(f"load average during the bench: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
