#!/usr/bin/env python3
"""GPU proof (issue 9): the panel's worker path against raw `llamafactory-cli train` on the same YAML,
and the usual LoRA config against the panel's recommended GPU defaults, in one call on a GPU machine.

Run with the APP's Python deps importable (the orchestrator starts the real app and Celery worker
through tests/live.py); the trainer runs in its own environment:

    # GPU machine (wheels carried in .whl/lf and .whl/app; see docs/benchmarks.md)
    PYTHONPATH=/tmp/app python3 bench/gpu/gpu_bench.py --train-site /tmp/lf --work .bench-gpu \
        --out $OUT --phases setup,compare,panel
    # this CPU machine: the same code path on the tiny demo model, a few steps
    .venv/bin/python bench/gpu/gpu_bench.py --cpu-smoke --work /tmp/gpu-smoke --out /tmp/gpu-smoke/out

Phases (comma-separated, in this order): setup (bf16 matmul rate, models, data, token counts,
`tuneboard doctor`), compare (usual vs recommended, 0.5B and 7B shapes, raw CLI), panel (Celery
task → run folder → llamafactory-cli with metrics reported to a live app, then the CLI directly on
the run's own train.yaml), multi (two 1-GPU runs at once and one 2-GPU torchrun run, through the
worker; needs 2 GPUs).

Real tokens: `include_num_input_tokens_seen: non_padding` (attention-mask sum) is exact for unpacked
batches; packed sequences are padded with mask 1, so a packed run's count is scaled by the share of
real tokens in LLaMA-Factory's own packing of the dataset (bench/gpu/token_stats.py).
Rates use the arrival time of each trainer_log.jsonl line (polled every 20 ms) and skip the first
steps (warm-up). MFU = 6 × N × real tokens/s / measured bf16 matmul rate, N = parameters in matrix
products (all but an untied input embedding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.services.llamafactory_params import GPU_DEFAULTS  # noqa: E402

POLL_S = 0.02
DATASET = "alpaca_bench"

# The usual starting config (LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, as people
# copy it), and what every measured run shares.
COMMON: dict[str, Any] = {
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
    "template": "qwen", "cutoff_len": 1024, "max_samples": 100000, "overwrite_cache": True,
    "preprocessing_num_workers": 16, "dataloader_num_workers": 4, "logging_steps": 1, "save_steps": 100000,
    "plot_loss": True, "overwrite_output_dir": True, "learning_rate": 1.0e-4, "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1, "bf16": True, "val_size": 0.0, "eval_strategy": "no", "report_to": "none",
    "include_num_input_tokens_seen": "non_padding", "seed": 42,
}
USUAL = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8}
# The panel's recommended GPU defaults (the form's, app/services/llamafactory_params.py): packed
# sequences, no activation recomputation, Liger's fused kernels; 4 packed sequences × 3 accumulation
# ≈ the usual 32 × ~425 tokens per optimizer step, so the loss curves compare at equal tokens and
# equal steps per token.
RECOMMENDED = dict(GPU_DEFAULTS)
# The same 12 packed sequences per optimizer step in one micro-batch: what fills the card on a small model.
SMALL_MODEL = {"per_device_train_batch_size": 12, "gradient_accumulation_steps": 1}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- environment
class Env:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work = args.work.resolve()
        self.out = args.out.resolve()
        self.smoke = args.cpu_smoke
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results: dict[str, Any] = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        if args.train_site:  # GPU machine: the trainer's packages live in a --target dir
            bin_dir = self.work / "bin"
            bin_dir.mkdir(exist_ok=True)
            site = Path(args.train_site).resolve()
            self.train_python = str(bin_dir / "python")
            self.cli = str(bin_dir / "llamafactory-cli")
            # The worker drops PYTHONPATH from the trainer's environment: the wrappers set it.
            Path(self.train_python).write_text(f'#!/bin/sh\nPYTHONPATH={site} exec python3 "$@"\n')
            Path(self.cli).write_text(
                f"#!/bin/sh\nPYTHONPATH={site} exec python3 -c "
                "'import sys; from llamafactory.cli import main; sys.argv[0] = \"llamafactory-cli\"; sys.exit(main())'"
                ' "$@"\n'
            )
            for path in (self.train_python, self.cli):
                os.chmod(path, 0o755)
        else:
            from app.settings import get_settings

            self.train_python = get_settings().train_python
            self.cli = get_settings().llamafactory_cli
        os.environ["TUNEBOARD_TRAIN_PYTHON"] = self.train_python
        os.environ["TUNEBOARD_LLAMAFACTORY_CLI"] = self.cli
        os.environ["RECORD_VRAM"] = "1"  # LLaMA-Factory adds peak memory to trainer_log.jsonl
        os.environ["HF_HUB_OFFLINE"] = "1"

    def save(self, key: str, value: Any) -> None:
        self.results[key] = value
        self.results_path.write_text(json.dumps(self.results, indent=1))

    @property
    def assets(self) -> Path:
        return self.work / "assets"

    def model(self, shape: str) -> Path:
        return self.assets / "models" / shape


# --------------------------------------------------------------------------- setup
MATMUL = """
import json, torch
n = {n}
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(5): a @ b
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); a @ b; end.record(); torch.cuda.synchronize(); times.append(start.elapsed_time(end) / 1e3)
times.sort()
print(json.dumps({{"n": n, "tflops": 2 * n**3 / times[len(times) // 2] / 1e12,
                  "device": torch.cuda.get_device_name(0), "torch": torch.__version__}}))
"""


def run_json(command: list[str], timeout: float = 900) -> list[dict[str, Any]]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def phase_setup(env: Env, shapes: list[str], rows: int) -> None:
    log("assets: tiny model and dataset")
    run_json([env.train_python, str(ROOT / "bench/gpu/make_assets.py"), str(env.assets), "--shapes", "tiny",
              "--device", "cpu", "--rows", str(rows)])
    data_dir = env.assets / "data"
    (data_dir / "dataset_info.json").write_text(json.dumps({DATASET: {"file_name": f"{DATASET}.json"}}))
    stats = subprocess.Popen(
        [env.train_python, str(ROOT / "bench/gpu/token_stats.py"), str(env.model("tiny")), str(data_dir), DATASET,
         str(COMMON["cutoff_len"])], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # LLaMA-Factory refuses several GPUs without torchrun
    )
    if not env.smoke:
        log("bf16 matmul 8192³")
        [matmul] = run_json([env.train_python, "-c", MATMUL.format(n=8192)])
        env.save("matmul", matmul)
        log(f"matmul: {matmul['tflops']:.1f} TFLOP/s on {matmul['device']}")
    log(f"assets: models {shapes}")
    models = run_json([env.train_python, str(ROOT / "bench/gpu/make_assets.py"), str(env.assets), "--shapes",
                       ",".join(shapes), "--device", "cpu" if env.smoke else "cuda"])
    env.save("models", {m["model"]: m for m in models if "model" in m})
    env.save("tokens", json.loads(stats.communicate(timeout=900)[0].strip().splitlines()[-1]))
    log(f"dataset: {env.results['tokens']}")
    doctor = subprocess.run([sys.executable, "-m", "app.cli", "doctor"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300, env={**os.environ, "TUNEBOARD_DATA_DIR": str(env.work / "doctor")})
    (env.out / "doctor.txt").write_text(doctor.stdout + doctor.stderr)
    log("doctor:\n" + doctor.stdout[-4000:] + doctor.stderr[-2000:])


# --------------------------------------------------------------------------- one training run
class LogTail:
    """trainer_log.jsonl lines with the time each one appeared on disk (same for both paths)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        if not chunk:
            return
        now = time.monotonic()
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            if raw.strip():
                self.lines.append((now, json.loads(raw)))


class GpuSampler(threading.Thread):
    def __init__(self, gpu_ids: list[int]) -> None:
        super().__init__(daemon=True)
        self.gpu_ids, self.samples, self.stop = gpu_ids, [], threading.Event()

    def run(self) -> None:
        from workers.gpus import gpu_stats

        while not self.stop.wait(0.5):
            try:
                stats = gpu_stats(self.gpu_ids)
            except Exception:  # no NVML (CPU smoke)
                return
            if stats:
                self.samples.append((time.monotonic(), [g.utilization for g in stats], [g.memory_used_mib for g in stats]))


def summarize(tail: LogTail, started: float, share: float, matmul_params: int | None, tflops: float | None,
              sampler: GpuSampler | None = None) -> dict[str, Any]:
    train = [(t, line) for t, line in tail.lines if "loss" in line and "total_tokens" in line]
    if len(train) < 3:
        return {"error": f"only {len(train)} logged steps", "lines": len(tail.lines)}
    skip = max(2, len(train) // 6)
    (t0, first), (t1, last) = train[skip], train[-1]
    rate = (last["total_tokens"] - first["total_tokens"]) * share / (t1 - t0)
    result: dict[str, Any] = {
        "steps": last["current_steps"], "first_line_s": round(tail.lines[0][0] - started, 2),
        "real_tokens_per_s": round(rate, 1), "steady_s": round(t1 - t0, 1), "steady_steps": len(train) - 1 - skip,
        "real_tokens": round(last["total_tokens"] * share), "final_loss": last["loss"],
        "curve": [[round(line["total_tokens"] * share), line["loss"]] for _, line in train],
        "vram_reserved_gib": max((line.get("vram_reserved", 0) for _, line in train), default=None),
    }
    if matmul_params and tflops:
        result["mfu"] = round(6 * matmul_params * rate / (tflops * 1e12), 4)
    if sampler and sampler.samples:
        steady = [u for ts, u, _ in sampler.samples if t0 <= ts <= t1] or [u for _, u, _ in sampler.samples]
        result["gpu_util"] = round(statistics.mean(statistics.mean(u) for u in steady), 1)
    return result


def trainer_env(output_dir: Path, gpu_ids: list[int]) -> dict[str, str]:
    """What the worker gives llamafactory-cli (workers/training.py), for the direct runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBOARD_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.pop("FORCE_TORCHRUN", None)
    env.update({
        "PATH": f"{Path(os.environ['TUNEBOARD_LLAMAFACTORY_CLI']).parent}{os.pathsep}{env.get('PATH', '')}",
        "LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": str(output_dir), "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids)),
    })
    if len(gpu_ids) > 1:
        env["FORCE_TORCHRUN"] = "1"
    return env


def direct_run(env: Env, name: str, config: dict[str, Any], run_dir: Path, shape: str, gpu_ids: list[int],
               timeout_s: float) -> dict[str, Any]:
    """`llamafactory-cli train train.yaml` in run_dir (which holds dataset_info.json and data/)."""
    output_dir = run_dir / "output"
    shutil.rmtree(output_dir, ignore_errors=True)
    config = {**config, "output_dir": str(output_dir), "dataset_dir": str(run_dir)}
    (run_dir / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tail = LogTail(output_dir / "trainer_log.jsonl")
    sampler = GpuSampler(gpu_ids)
    sampler.start()
    started = time.monotonic()
    with (run_dir / f"{name}.log").open("wb") as stdout:
        process = subprocess.Popen([env.cli, "train", "train.yaml"], cwd=run_dir, env=trainer_env(output_dir, gpu_ids),
                                   stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        while process.poll() is None and time.monotonic() - started < timeout_s:
            tail.poll()
            time.sleep(POLL_S)
        if process.poll() is None:
            os.killpg(process.pid, 9)
        code = process.wait()
    tail.poll()
    sampler.stop.set()
    result = summarize(tail, started, share_for(env, config), *mfu_inputs(env, shape), sampler)
    result.update(exit_code=code, wall_s=round(time.monotonic() - started, 1))
    if code != 0:
        result["log_tail"] = (run_dir / f"{name}.log").read_text(errors="replace")[-2500:]
    return result


def share_for(env: Env, config: dict[str, Any]) -> float:
    return env.results["tokens"]["packed_real_share"] if config.get("packing") else 1.0


def mfu_inputs(env: Env, shape: str) -> tuple[int | None, float | None]:
    model = env.results.get("models", {}).get(shape, {})
    return model.get("matmul_params"), env.results.get("matmul", {}).get("tflops")


def fresh_run_dir(env: Env, name: str) -> Path:
    run_dir = env.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "data").mkdir(parents=True)
    shutil.copy(env.assets / "data" / f"{DATASET}.json", run_dir / "data")
    (run_dir / "dataset_info.json").write_text(json.dumps({DATASET: {"file_name": f"data/{DATASET}.json"}}))
    return run_dir


def report(name: str, result: dict[str, Any]) -> None:
    keys = ("exit_code", "steps", "real_tokens_per_s", "mfu", "gpu_util", "first_line_s", "final_loss",
            "vram_reserved_gib", "steady_s", "error")
    log(f"{name}: " + ", ".join(f"{k}={result[k]}" for k in keys if k in result))
    if result.get("log_tail") or result.get("error"):
        print(result.get("log_tail", ""), flush=True)


# --------------------------------------------------------------------------- usual vs recommended
def steps_for(env: Env, config: dict[str, Any], tokens: int) -> int:
    """Optimizer steps that cover `tokens` real tokens with this batch shape."""
    stats = env.results["tokens"]
    per_sequence = config["cutoff_len"] + 1 if config.get("packing") else min(stats["mean"], config["cutoff_len"])
    share = share_for(env, config)
    per_step = per_sequence * share * config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
    return max(4, round(tokens / per_step))


def phase_compare(env: Env, plan: list[tuple[str, str, dict[str, Any], int]], timeout_s: float) -> None:
    for name, shape, overrides, tokens in plan:
        config = {**COMMON, **overrides, "model_name_or_path": str(env.model(shape)), "dataset": DATASET}
        config["max_steps"] = steps_for(env, config, tokens)
        log(f"{name}: {shape}, max_steps {config['max_steps']} (≈{tokens} real tokens)")
        result = direct_run(env, name, config, fresh_run_dir(env, name), shape, [0], timeout_s)
        if result["exit_code"] != 0 and config.get("enable_liger_kernel"):
            # The carried Liger wheel may not fit this torch/transformers: measure without it.
            report(f"{name} (Liger)", result)
            env.save(f"{name}_liger_failed", result)
            RECOMMENDED["enable_liger_kernel"] = False
            config["enable_liger_kernel"] = False
            result = direct_run(env, name, config, fresh_run_dir(env, name), shape, [0], timeout_s)
        result["config"] = {k: v for k, v in config.items() if k not in COMMON or k == "max_steps"}
        env.save(name, result)
        report(name, result)


# --------------------------------------------------------------------------- the worker path
@contextmanager
def live_panel(env: Env, gpus: str, extra: dict[str, str] | None = None):
    from tests.live import standalone_panel

    root = env.work / f"panel-{gpus.replace(',', '')}"
    shutil.rmtree(root, ignore_errors=True)
    # running_panel passes no TUNEBOARD_* variable of ours through: name the trainer's commands.
    trainer = {key: os.environ[key] for key in ("TUNEBOARD_TRAIN_PYTHON", "TUNEBOARD_LLAMAFACTORY_CLI")}
    with standalone_panel(root, env={"TUNEBOARD_WORKER_GPUS": gpus, **trainer, **(extra or {})}) as panel:
        deadline = time.monotonic() + 60
        want = 0 if gpus == "none" else len(gpus.split(","))
        while not any(len(w.get("gpus") or []) >= want for w in panel.api.get("/api/v1/workers").json()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker with {want} GPU(s) came online:\n{panel.log()}")
            time.sleep(0.2)
        yield panel


def panel_config(env: Env, shape: str, params: dict[str, Any], gpus: int, name: str) -> int:
    """The model, the dataset (through the upload's own validation and storage) and a config."""
    from sqlmodel import Session, select

    from app.db import get_engine
    from app.models import Dataset, ModelEntry, TrainConfig
    from tests.factories import dataset_factory

    rows = json.loads((env.assets / "data" / f"{DATASET}.json").read_text())
    path = str(env.model(shape))
    with Session(get_engine()) as session:
        model = session.exec(select(ModelEntry).where(ModelEntry.path == path)).first()
        if model is None:
            from app.wire import model_fingerprint

            # The fingerprint: the scheduler sends a run only to a worker that holds this very folder.
            model = ModelEntry(name=f"{shape}-model", path=path, model_type="qwen2",
                               fingerprint=model_fingerprint(Path(path)) or "")
            session.add(model)
            session.commit()
        # One upload of the bench data per panel (the app refuses the same file twice).
        dataset = session.exec(select(Dataset)).first() or dataset_factory(session, f"{name}-data", rows)
        config = TrainConfig(name=name, model_id=model.id, dataset_ids=[dataset.id], gpus=gpus,
                             params={**COMMON, **params})
        session.add(config)
        session.commit()
        return config.id


def panel_run(env: Env, panel, config_id: int, shape: str, share: float, gpu_count: int,
              timeout_s: float) -> tuple[dict[str, Any], Path]:
    """Submit through the API; measure from the run folder's trainer_log.jsonl like direct_run."""
    started = time.monotonic()
    run = panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()
    run_dir = panel.data_dir / "runs" / str(run["id"])
    tail = LogTail(run_dir / "output" / "trainer_log.jsonl")
    sampler = GpuSampler(list(range(gpu_count)))
    sampler.start()
    first_metric = None
    status = run["status"]
    next_check = 0.0
    while time.monotonic() - started < timeout_s:
        tail.poll()
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.25
            status = panel.api.get(f"/api/v1/runs/{run['id']}").json()["status"]
            if first_metric is None and tail.lines and panel.api.get(f"/api/v1/runs/{run['id']}/metrics").json():
                first_metric = round(time.monotonic() - started, 2)
            if status in ("succeeded", "failed", "cancelled", "lost"):
                break
        time.sleep(POLL_S)
    tail.poll()
    sampler.stop.set()
    result = summarize(tail, started, share, *mfu_inputs(env, shape), sampler)
    metrics = panel.api.get(f"/api/v1/runs/{run['id']}/metrics").json()
    result.update(run_id=run["id"], status=status, first_metric_in_app_s=first_metric,
                  metrics_in_app=len(metrics), wall_s=round(time.monotonic() - started, 1))
    if status != "succeeded":
        result["log_tail"] = (run_dir / "stdout.log").read_text(errors="replace")[-2500:] if (run_dir / "stdout.log").is_file() else panel.log()
    return result, run_dir


def phase_panel(env: Env, shape: str, params: dict[str, Any], timeout_s: float) -> None:
    share = share_for(env, params)
    with live_panel(env, "none" if env.smoke else "0") as panel:
        config_id = panel_config(env, shape, params, 0 if env.smoke else 1, f"bench-{shape}")
        log(f"worker path: {shape} {params}")
        through_worker, run_dir = panel_run(env, panel, config_id, shape, share, 1, timeout_s)
        env.save("panel_worker", through_worker)
        report("panel_worker", through_worker)
    # The same YAML the worker ran, with its data, in a fresh folder: the raw CLI.
    config, direct_dir = raw_copy(env, "panel_direct", run_dir)
    log("raw CLI on the worker's train.yaml")
    direct = direct_run(env, "panel_direct", config, direct_dir, shape, [] if env.smoke else [0], timeout_s)
    env.save("panel_direct", direct)
    report("panel_direct", direct)
    if "real_tokens_per_s" in direct and "real_tokens_per_s" in through_worker:
        ratio = through_worker["real_tokens_per_s"] / direct["real_tokens_per_s"]
        env.save("panel_ratio", round(ratio, 4))
        log(f"worker/direct real tokens/s ratio: {ratio:.4f} (target ≥ 0.99)")


# --------------------------------------------------------------------------- two GPUs
def phase_multi(env: Env, shape: str, params: dict[str, Any], timeout_s: float) -> None:
    share = share_for(env, params)
    with live_panel(env, "0,1") as panel:
        one = panel_config(env, shape, params, 1, "one-gpu")
        two = panel_config(env, shape, params, 2, "two-gpu")
        log("1 GPU alone")
        alone, _ = panel_run(env, panel, one, shape, share, 1, timeout_s)
        env.save("multi_alone", alone)
        report("multi_alone", alone)
        log("two 1-GPU runs at once")
        results: dict[str, Any] = {}
        threads = [threading.Thread(target=lambda key=key: results.__setitem__(
            key, panel_run(env, panel, one, shape, share, 2, timeout_s)[0])) for key in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for key, value in results.items():
            env.save(f"multi_pair_{key}", value)
            report(f"multi_pair_{key}", value)
        log("one 2-GPU run (torchrun)")
        both, _ = panel_run(env, panel, two, shape, share, 2, timeout_s)
        env.save("multi_torchrun", both)
        report("multi_torchrun", both)


# --------------------------------------------------------------------------- issue 19: the automatic micro-batch
def _split_of(run_dir: Path) -> list[int]:
    config = yaml.safe_load((run_dir / "train.yaml").read_text())
    return [config["per_device_train_batch_size"], config["gradient_accumulation_steps"]]


def auto_run(env: Env, panel, config_id: int, shape: str, share: float, timeout_s: float,
             name: str) -> tuple[dict[str, Any], Path]:
    """One run through the panel with the automatic micro-batch, and what the panel recorded of it."""
    result, run_dir = panel_run(env, panel, config_id, shape, share, 1, timeout_s)
    run = panel.api.get(f"/api/v1/runs/{result['run_id']}").raise_for_status().json()
    plan = run["batch_plan"]
    result.update(split=_split_of(run_dir), plan=plan, results=run["results"],
                  probe_s=(plan.get("probe") or {}).get("probe_s"),
                  probe_log=[line["line"] for line in panel.api.get(f"/api/v1/runs/{run['id']}/logs").json()
                             if line["line"].startswith("probe [")][-16:])
    env.save(name, result)
    report(name, result)
    choice = (plan.get("choice") or {}).get("batch") or {}
    log(f"{name}: split {result['split']} ({choice.get('source')}): {choice.get('reason')}")
    for key in ("estimate", "estimate_probe", "measured", "errors", "fallback"):
        if plan.get(key):
            log(f"{name}: {key} {json.dumps(plan[key])}")
    return result, run_dir


def seed_oversized_split(smoke: bool) -> int:
    """The fallback demonstration: the newest probe cache entry is told that a micro-batch M fits
    when, by its own measurements, M needs 1.3× the GPU's memory and M / 2 fits well. A run of M
    sequences per step then really runs out of memory at its first step. Returns M."""
    from sqlmodel import Session, select

    from app.db import get_engine
    from app.models import BatchProbe

    with Session(get_engine()) as session:
        probe = session.exec(select(BatchProbe).order_by(BatchProbe.id.desc())).first()
        fitted = [m for m in probe.measurements if m.get("ok")]
        last, prev = fitted[-1], fitted[-2]
        slope = (last["peak_reserved_mib"] - prev["peak_reserved_mib"]) / (last["micro"] - prev["micro"])
        budget = probe.total_mib * 0.9 - probe.overhead_mib
        # The smallest even M that needs 1.25× the GPU; M / 2 (where it falls back) must fit.
        micro = 8 if smoke else 2 * math.ceil((1.25 * probe.total_mib - probe.base_mib) / slope / 2)
        if not smoke and probe.base_mib + micro // 2 * slope > budget:
            log(f"fallback: {micro // 2} would not fit either (slope {slope:.0f} MiB): no demonstration")
        probe.measurements = [*probe.measurements, {**last, "micro": micro, "peak_reserved_mib": probe.total_mib * 0.5,
                                                    "fb_s": last["fb_s"] * micro / last["micro"]}]
        session.add(probe)
        session.commit()
        log(f"fallback: the cache now says {micro} fits (slope {slope:.0f} MiB per sequence, base {probe.base_mib:.0f})")
        return micro


def raw_copy(env: Env, name: str, run_dir: Path) -> tuple[dict[str, Any], Path]:
    """A worker run's own train.yaml and data in a fresh folder, for the raw CLI."""
    config = yaml.safe_load((run_dir / "train.yaml").read_text())
    direct_dir = fresh_run_dir(env, name)
    shutil.copy(run_dir / "dataset_info.json", direct_dir / "dataset_info.json")
    shutil.rmtree(direct_dir / "data")
    shutil.copytree(run_dir / "data", direct_dir / "data")
    return config, direct_dir


def spread(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": round(statistics.median(values), 1), "min": min(values), "max": max(values),
            "spread": round((max(values) - min(values)) / statistics.median(values), 4)}


def interleaved(env: Env, panel, shape: str, config_id: int, share: float, run_dir: Path, order: str,
                timeout_s: float) -> None:
    """Worker path against the raw CLI on the same train.yaml, interleaved (`order`: R = raw CLI, W =
    through the panel, after the cached run that was W0), while the panel runs in both cases: the
    medians, their ratio, the spread. Host-bound shapes vary by ±10 % between runs of either path."""
    smoke = env.smoke
    worker = [env.results[f"auto_{shape}_cache"].get("real_tokens_per_s")]
    raw: list[float | None] = []
    for index, kind in enumerate(order, start=1):
        if kind == "R":
            config, direct_dir = raw_copy(env, f"auto_{shape}_raw{index}", run_dir)
            log(f"{shape} interleaved {index}/{len(order)}: raw CLI ({config['per_device_train_batch_size']} × "
                f"{config['gradient_accumulation_steps']})")
            result = direct_run(env, f"auto_{shape}_raw{index}", config, direct_dir, shape, [] if smoke else [0], timeout_s)
            env.save(f"auto_{shape}_raw{index}", result)
            report(f"auto_{shape}_raw{index}", result)
            raw.append(result.get("real_tokens_per_s"))
        else:
            log(f"{shape} interleaved {index}/{len(order)}: through the panel")
            result, _ = auto_run(env, panel, config_id, shape, share, timeout_s, f"auto_{shape}_worker{index}")
            worker.append(result.get("real_tokens_per_s"))
    if None in worker or None in raw or not raw:
        log(f"{shape}: a run of the interleaved series measured nothing (worker {worker}, raw {raw})")
        return
    summary = {"order": "W" + order, "worker": spread(worker), "raw": spread(raw)}
    summary["ratio_of_medians"] = round(summary["worker"]["median"] / summary["raw"]["median"], 4)
    # The default config (the automatic split) against the best raw tokens/s at the same sequences per step.
    summary["default_vs_best_raw_median"] = summary["ratio_of_medians"]
    summary["default_vs_best_raw_run"] = round(summary["worker"]["median"] / max(raw), 4)
    env.save(f"auto_{shape}_interleaved", summary)
    log(f"{shape}: worker {summary['worker']} raw {summary['raw']} ratio of medians {summary['ratio_of_medians']}")


def phase_auto(env: Env, shapes: list[str], timeout_s: float, fallback: bool, order: str) -> None:
    """The panel's default GPU config (4 × 3 with the automatic micro-batch) through the worker: a first
    run probes, a second one takes the cached choice; then the raw CLI on the second run's YAML
    interleaved with more runs through the panel (`order`), and (fallback) a real out-of-memory error
    at a split the cache wrongly says fits."""
    smoke = env.smoke
    extra = {"TUNEBOARD_PROBE_CPU": "1"} if smoke else {}
    with live_panel(env, "none" if smoke else "0", extra) as panel:
        for shape in shapes:
            params = {**RECOMMENDED, "num_train_epochs": 1.0}
            if smoke:
                params.update(per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=6)
            elif shape == "7b":
                params["max_samples"] = 1000  # ~35 steps of 12 packs: one epoch in ~30 s
            config_id = panel_config(env, shape, params, 0 if smoke else 1, f"auto-{shape}")
            config = panel.api.get(f"/api/v1/configs/{config_id}").raise_for_status().json()
            stats = panel.api.get(f"/api/v1/datasets/{config['dataset_ids'][0]}/stats", params={
                "model_id": config["model_id"], "template": "qwen", "cutoff_len": config["params"]["cutoff_len"]}, timeout=600)
            log(f"{shape}: token stats {stats.status_code}, mean {stats.json().get('total_tokens', {}).get('mean')}")
            estimate = panel.api.post("/api/v1/configs/estimate", json={
                "name": "x", "model_id": config["model_id"], "dataset_ids": config["dataset_ids"],
                "gpus": config["gpus"], "params": config["params"]}, timeout=300).json()
            env.save(f"auto_{shape}_form_estimate", estimate.get("speed"))
            log(f"{shape}: form estimate before any probe: {json.dumps(estimate.get('speed'))}")
            share = share_for(env, params)
            auto_run(env, panel, config_id, shape, share, timeout_s, f"auto_{shape}_probe")
            _, run_dir = auto_run(env, panel, config_id, shape, share, timeout_s, f"auto_{shape}_cache")
            interleaved(env, panel, shape, config_id, share, run_dir, order, timeout_s)
        env.save("batch_probes", panel.api.get("/api/v1/batch-probes").json())
        if fallback:
            shape = shapes[0]
            micro = seed_oversized_split(smoke)
            params = {**RECOMMENDED, "per_device_train_batch_size": micro, "gradient_accumulation_steps": 1,
                      "max_steps": 5}
            config_id = panel_config(env, shape, params, 0 if smoke else 1, f"fallback-{shape}")
            auto_run(env, panel, config_id, shape, share_for(env, params), timeout_s, f"auto_{shape}_fallback")
    summary = []
    for shape in shapes:
        for kind in ("probe", "cache"):
            r = env.results.get(f"auto_{shape}_{kind}", {})
            plan = r.get("plan") or {}
            summary.append(
                f"{shape:5} {kind:6} split {r.get('split')} tok/s {r.get('real_tokens_per_s')} probe_s {r.get('probe_s')} "
                f"est {json.dumps(plan.get('estimate'))} est_probe {json.dumps(plan.get('estimate_probe'))} "
                f"measured {json.dumps(plan.get('measured'))} errors {json.dumps(plan.get('errors'))}")
        summary.append(f"{shape:5} interleaved {json.dumps(env.results.get(f'auto_{shape}_interleaved'))}")
    log("auto summary:\n" + "\n".join(summary))


# --------------------------------------------------------------------------- issue 17: evaluation throughput
def phase_eval(env: Env, shape: str, rows: int, max_new_tokens: int, timeout_s: float) -> None:
    """LLaMA-Factory's predict through the panel (POST /api/v1/evaluations → scheduler → worker →
    `llamafactory-cli train` with do_predict on a GPU → predictions scored and uploaded) on the first
    `rows` bench rows, then `llamafactory-cli train` directly on the predict.yaml the worker wrote;
    rows/s over the whole job and over LLaMA-Factory's predict_runtime. vLLM's backend needs the
    serving env's vllm, which this machine may lack: then it is recorded as not run."""
    from app.settings import get_settings
    from tests.factories import dataset_factory

    data = json.loads((env.assets / "data" / f"{DATASET}.json").read_text())[:rows]
    with live_panel(env, "none" if env.smoke else "0") as panel:
        from sqlmodel import Session

        from app.db import get_engine
        from app.models import ModelEntry
        from app.wire import model_fingerprint

        path = env.model(shape)
        with Session(get_engine()) as session:
            model = ModelEntry(name=f"{shape}-model", path=str(path), model_type="qwen2",
                               fingerprint=model_fingerprint(path) or "")
            session.add(model)
            session.commit()
            model_id = model.id
            dataset_id = dataset_factory(session, "eval-rows", data).id
        body = {"model_id": model_id, "dataset_id": dataset_id, "max_rows": rows, "max_new_tokens": max_new_tokens,
                "template": "qwen", "cutoff_len": COMMON["cutoff_len"], "gpus": 0 if env.smoke else 1,
                "backend": "llamafactory"}
        started = time.monotonic()
        created = panel.api.post("/api/v1/evaluations", json=body)
        created.raise_for_status()
        evaluation_id = created.json()["id"]
        while (job := panel.api.get(f"/api/v1/evaluations/{evaluation_id}").json())["status"] not in (
                "succeeded", "failed", "cancelled", "lost"):
            if time.monotonic() - started > timeout_s:
                break
            time.sleep(0.2)
        submit_to_end = time.monotonic() - started
        result = {k: job.get(k) for k in ("status", "status_reason", "rows_evaluated", "elapsed_s", "generate_s",
                                          "metrics", "backend", "max_new_tokens")}
        result["submit_to_end_s"] = round(submit_to_end, 2)
        if job["status"] == "succeeded":
            n = job["rows_evaluated"]
            result.update(rows_per_s_job=round(n / job["elapsed_s"], 3), rows_per_s_predict=round(n / job["generate_s"], 3),
                          rows_per_s_submit_to_end=round(n / submit_to_end, 3))
        env.save("eval_panel_llamafactory", result)
        log(f"eval through the panel (LLaMA-Factory predict): {json.dumps(result)}")
        folder = get_settings().path("evaluations", str(evaluation_id))
        if job["status"] != "succeeded":
            print(panel.log()[-4000:], flush=True)
            return
        # The very predict.yaml the worker wrote, straight to the CLI, with the worker's environment.
        text = (folder / "predict.yaml").read_text().replace(str(folder / "output"), str(folder / "cli-output"))
        cli_yaml = folder / "predict-cli.yaml"
        cli_yaml.write_text(text)
        cli_env = {**trainer_env(folder / "cli-output", [] if env.smoke else [0])}
        for key in ("LLAMABOARD_ENABLED", "LLAMABOARD_WORKDIR"):
            cli_env.pop(key)
        started = time.monotonic()
        done = subprocess.run([env.cli, "train", str(cli_yaml)], cwd=folder, capture_output=True, text=True,
                              env=cli_env, timeout=timeout_s)
        wall = time.monotonic() - started
        if done.returncode != 0:
            env.save("eval_cli_llamafactory", {"exit_code": done.returncode, "log_tail": done.stderr[-3000:]})
            print(done.stderr[-3000:], flush=True)
            return
        cli = json.loads((folder / "cli-output" / "predict_results.json").read_text())
        n = result["rows_evaluated"]
        direct = {"wall_s": round(wall, 2), "predict_runtime": cli.get("predict_runtime"),
                  "rows_per_s_job": round(n / wall, 3), "rows_per_s_predict": round(n / cli["predict_runtime"], 3),
                  "metrics": {k: v for k, v in cli.items() if k.startswith("predict_")}}
        env.save("eval_cli_llamafactory", direct)
        ratios = {"job": round(result["rows_per_s_job"] / direct["rows_per_s_job"], 4),
                  "predict_runtime": round(result["rows_per_s_predict"] / direct["rows_per_s_predict"], 4)}
        env.save("eval_ratio_panel_vs_cli", ratios)
        log(f"eval raw CLI: {json.dumps(direct)}; panel / CLI rows/s {json.dumps(ratios)} (target ≥ 0.98)")
    # The serving env's python where one is set up, else this machine's own.
    serve_python = get_settings().serve_python if Path(get_settings().serve_python).is_file() else sys.executable
    found = subprocess.run([serve_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    env.save("eval_vllm", {"python": serve_python, "importable": found.returncode == 0,
                           "detail": (found.stdout or found.stderr)[-300:]})
    log(f"vllm on this machine: {env.results['eval_vllm']}")


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="models, data and run folders (kept between calls)")
    parser.add_argument("--out", type=Path, required=True, help="results.json, doctor.txt")
    parser.add_argument("--train-site", help="the trainer's --target site dir (GPU machine); default: .envs/train")
    parser.add_argument("--phases", default="setup,compare,panel")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, a few steps, no GPU")
    parser.add_argument("--only", default="", help="compare: run only these names (comma-separated)")
    parser.add_argument("--panel-shape", default="7b")
    parser.add_argument("--shapes", default="", help="setup: build only these model shapes")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per training run")
    parser.add_argument("--no-liger", action="store_true", help="the recommended config without Liger kernels")
    parser.add_argument("--auto-shapes", default="0.5b", help="auto: the shapes to run (issue 19)")
    parser.add_argument("--fallback", action="store_true", help="auto: also the out-of-memory fallback run")
    parser.add_argument("--order", default="RWR", help="auto: raw CLI (R) and panel (W) runs after the cached one")
    parser.add_argument("--eval-rows", type=int, default=1000, help="eval: rows evaluated")
    parser.add_argument("--eval-new-tokens", type=int, default=32, help="eval: max_new_tokens")
    args = parser.parse_args()
    if args.no_liger:
        RECOMMENDED["enable_liger_kernel"] = False
    env = Env(args)
    phases = args.phases.split(",")
    if args.cpu_smoke:
        # A busy 2-core machine: short sequences, small batches, a few steps.
        COMMON.update(bf16=False, cutoff_len=256, preprocessing_num_workers=2, dataloader_num_workers=0)
        RECOMMENDED.pop("enable_liger_kernel")  # Triton kernels: GPU only
        small = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
        shapes, rows = ["tiny"], 200
        plan = [("usual_tiny", "tiny", {**USUAL, **small}, 3000),
                ("recommended_tiny", "tiny", {**RECOMMENDED, **small, "per_device_train_batch_size": 1}, 3000)]
        panel_shape, panel_params = "tiny", {**RECOMMENDED, **small, "max_steps": 4}
    else:
        shapes, rows = ["0.5b", "7b"], 4000
        plan = [
            ("usual_0.5b", "0.5b", USUAL, 300_000),
            ("recommended_0.5b", "0.5b", RECOMMENDED, 300_000),
            ("usual_7b", "7b", USUAL, 200_000),
            ("recommended_7b", "7b", RECOMMENDED, 200_000),
            ("recommended_0.5b_b16", "0.5b", {**RECOMMENDED, "per_device_train_batch_size": 16,
                                              "gradient_accumulation_steps": 1}, 1_600_000),
            ("recommended_0.5b_noliger", "0.5b", {**RECOMMENDED, "enable_liger_kernel": False}, 300_000),
            ("recommended_0.5b_b12", "0.5b", {**RECOMMENDED, **SMALL_MODEL}, 300_000),
            ("recommended_0.5b_b12_long", "0.5b", {**RECOMMENDED, **SMALL_MODEL}, 1_600_000),
        ]
        panel_shape = args.panel_shape
        panel_params = {**RECOMMENDED, "max_steps": 24 if panel_shape == "7b" else 120}
    if args.only:
        plan = [p for p in plan if p[0] in args.only.split(",")]
    if args.shapes:
        shapes = args.shapes.split(",")
    if "setup" in phases:
        phase_setup(env, shapes, rows)
    if "compare" in phases:
        phase_compare(env, plan, args.timeout)
    if "panel" in phases:
        phase_panel(env, panel_shape, panel_params, args.timeout)
    if "auto" in phases:
        phase_auto(env, ["tiny"] if args.cpu_smoke else args.auto_shapes.split(","), args.timeout, args.fallback,
                   args.order)
    if "eval" in phases:
        phase_eval(env, "tiny" if args.cpu_smoke else "0.5b", args.eval_rows, args.eval_new_tokens, args.timeout)
    if "multi" in phases:
        phase_multi(env, "0.5b", {**RECOMMENDED, **SMALL_MODEL, "max_steps": 120}, args.timeout)
    log("done")


if __name__ == "__main__":
    main()
