"""The automatic micro-batch, and the speed and memory estimates shown before a run starts.

A config says how many sequences go into one optimizer step (per_device_train_batch_size ×
gradient_accumulation_steps × GPUs); with `auto_batch` on, a GPU run keeps that number and the
worker trains with the split of it that fills the GPU: the loss curve stays the same and the speed
does not (a 0.5B model trains 3.2× faster at 12 × 1 than at 4 × 3 on an H200, docs/benchmarks.md).

The split comes from a short probe (workers/envscripts/batch_probe.py: one process, a few training
steps per micro-batch on synthetic full-length sequences, peak memory from torch's counters). The
panel keeps what probes measured in `BatchProbe`, keyed by what sets memory and speed: the model's
shape, the GPU type, the sequence length, packing, the LoRA and memory settings. At a claim the
panel puts the cached choice in the RunSpec, or asks the worker to probe; the worker posts the
measurements, the panel stores them and answers with the choice. An out-of-memory error in a run's
first steps makes the worker train again at the next smaller split, once, and report it here (the
cache learns that size did not fit). The arithmetic lives in workers/envscripts/microbatch.py,
shared with the probe.

Estimates (the config form, the config page before Start): peak GPU memory and time per epoch on the
GPU type the scheduler would use, from past runs of the same key when there are some, else from the
probe cache, else from a formula; each run keeps the estimate it was shown and what it measured, and
the form says how far past estimates were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Session, col, select

from app.models import BatchProbe, Dataset, ModelEntry, Run, RunEvent, RunStatus, TrainConfig, Worker
from app.models.base import utcnow
from app.services.run_events import hub
from app.settings import get_settings
from app.wire import (
    DATASET_DIR_PLACEHOLDER,
    OUTPUT_DIR_PLACEHOLDER,
    BatchChoice,
    BatchFallback,
    FinishRequest,
    ProbeReport,
    ProbeRequest,
)
from workers.envscripts import microbatch

log = logging.getLogger(__name__)

# LLaMA-Factory's defaults where a config leaves a key out.
DEFAULT_CUTOFF_LEN = 2048
# The arguments that change a step's memory or speed (with the model's shape and the GPU type).
MEMORY_KEYS = (
    "stage", "finetuning_type", "lora_rank", "lora_target", "lora_dropout", "additional_target", "use_dora",
    "use_rslora", "pissa_init", "quantization_bit", "quantization_method", "double_quantization",
    "enable_liger_kernel", "disable_gradient_checkpointing", "bf16", "fp16", "pure_bf16", "flash_attn", "optim",
    "use_unsloth", "freeze_trainable_layers", "freeze_trainable_modules", "train_from_scratch", "upcast_layernorm",
    "upcast_lmhead_output", "shift_attn", "rope_scaling", "neat_packing",
)
# config.json keys that name a model rather than shape it.
SHAPE_IGNORED = frozenset({"_name_or_path", "transformers_version", "use_cache", "bos_token_id", "eos_token_id",
                           "pad_token_id", "task_specific_params", "name_or_path"})
# Packing fills LLaMA-Factory's packs this well (greedy knapsack; 99.7 % measured on the bench data).
PACKING_FILL = 0.99
# LLaMA-Factory's dataset.map batches: packs never span two of them.
PACKING_CHUNK = 1000
# Larger steps are refused by the config checks (configs.MAX_EFFECTIVE_BATCH); nothing here goes past.
MAX_STEP = 4096
HISTORY_RUNS = 200  # finished runs looked at for past measurements and past estimates' errors
ACCURACY_RUNS = 10

# The formula, used when neither a past run nor a probe knows the key. bf16 dense matrix rates in
# TFLOP/s: measured (8192³ torch.matmul, docs/benchmarks.md) for H100/H200, datasheets × 0.8 otherwise.
GPU_TFLOPS = (("H200", 780.0), ("GH200", 780.0), ("H100", 760.0), ("H800", 760.0), ("A100", 250.0),
              ("A800", 250.0), ("L40S", 290.0), ("L40", 145.0), ("A6000", 120.0), ("4090", 130.0),
              ("3090", 55.0), ("A10", 100.0), ("L4", 95.0), ("V100", 100.0), ("T4", 50.0))
UNKNOWN_GPU_TFLOPS = 100.0
# A run's training loop starts slower than it goes on (first steps, data loader workers): ~2.5 s in
# train_runtime on an H200 for the 0.5B and 7B shapes. Past runs' figures already hold it.
LOOP_START_S = 2.5
# Share of that rate a LoRA step reaches, for a model of hidden size ≥ 3584 (Qwen2.5-7B shape: 51 % of
# 4N FLOPs per token on an H200); smaller models fill the GPU less, in proportion to their width
# (0.5B: 14 %).
FORMULA_EFFICIENCY = 0.5
FORMULA_FULL_WIDTH = 3584


# --------------------------------------------------------------------------- keys and shapes
def run_args(train_yaml: str) -> dict[str, Any]:
    """A run's YAML as a mapping (its run-folder placeholders left as text)."""
    text = train_yaml.replace(OUTPUT_DIR_PLACEHOLDER, "OUTPUT_DIR").replace(DATASET_DIR_PLACEHOLDER, "DATASET_DIR")
    try:
        args = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return args if isinstance(args, dict) else {}


def model_config(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config.json (multimodal configs nest it)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) and "hidden_size" in inner else config


def shape_digest(model_path: str | None, fallback: str = "") -> str:
    config = model_config(model_path)
    if config is None:
        return f"fingerprint:{fallback}"
    shape = {k: v for k, v in sorted(config.items()) if k not in SHAPE_IGNORED}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cutoff_len(args: dict[str, Any]) -> int:
    value = args.get("cutoff_len")
    return value if isinstance(value, int) and value > 0 else DEFAULT_CUTOFF_LEN


def packs(args: dict[str, Any]) -> bool:
    if args.get("neat_packing"):
        return True
    packing = args.get("packing")
    return bool(packing) if packing is not None else args.get("stage") == "pt"


def seq_len(args: dict[str, Any]) -> int:
    """The sequence length of a full micro-batch: cutoff_len (LLaMA-Factory packs rows of up to
    cutoff_len - 1 tokens into sequences padded to cutoff_len; unpacked, the longest row)."""
    return cutoff_len(args)


def step_per_device(args: dict[str, Any]) -> int:
    """Sequences per optimizer step on one GPU: per_device_train_batch_size × gradient_accumulation_steps."""
    batch = args.get("per_device_train_batch_size") or 8  # transformers' default
    accumulation = args.get("gradient_accumulation_steps") or 1
    try:
        return int(batch) * int(accumulation)
    except (TypeError, ValueError):
        return 0


def key_fields(args: dict[str, Any], shape: str, device: str) -> dict[str, Any]:
    return {"model_shape": shape, "device": device, "cutoff_len": cutoff_len(args), "packing": packs(args),
            **{key: args.get(key) for key in MEMORY_KEYS}}


def probe_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def auto_off_reason(auto_batch: bool, args: dict[str, Any], gpus: int) -> str | None:
    """Why a run keeps its config's split (None: the automatic micro-batch applies)."""
    if not auto_batch:
        return "the config's automatic micro-batch is off"
    if gpus == 0 and not get_settings().probe_cpu:
        return "a CPU run trains with the config's split"
    if args.get("deepspeed"):
        return "DeepSpeed runs keep the config's split"
    if (args.get("stage") or "sft") != "sft":
        return f"the probe measures SFT steps; stage {args.get('stage')} keeps the config's split"
    return None


def split_text(micro: int, accumulation: int, gpus: int = 1) -> str:
    return f"{micro} × {accumulation}" + (f" × {gpus} GPUs" if gpus > 1 else "")


def _gib(mib: float | None) -> str:
    return f"{mib / 1024:.1f} GiB" if mib is not None else "?"


def _budget(probe: BatchProbe) -> float:
    return microbatch.memory_budget_mib(probe.total_mib, probe.overhead_mib, get_settings().probe_margin)


# --------------------------------------------------------------------------- the choice
def _measurements(probe: BatchProbe) -> list[dict[str, Any]]:
    return [dict(m) for m in probe.measurements]


def choice_from_probe(probe: BatchProbe, step: int, config_split: tuple[int, int], source: str) -> BatchChoice:
    """The fastest split of `step` that the probe says fits, with the reason in words."""
    measurements = _measurements(probe)
    budget = _budget(probe)
    chosen = microbatch.choose(measurements, step, budget, probe.seq_len)
    where = (f"{round((1 - get_settings().probe_margin) * 100)} % of the {_gib(probe.total_mib)} of the "
             f"{probe.gpu_name or 'device'}")
    if chosen["micro"] is None:
        failed = microbatch.smallest_failure(measurements)
        why = "even one sequence ran out of memory" if failed == 1 else "no split fitted"
        return BatchChoice(per_device_train_batch_size=config_split[0], gradient_accumulation_steps=config_split[1],
                           source="config", reason=f"{why} in {where}: the config's {split_text(*config_split)} "
                                                   "is kept")
    micro, accumulation = chosen["micro"], chosen["accumulation"]
    others = {o["micro"]: o for o in chosen["options"] if o["fits"]}
    compare = ""
    own = others.get(config_split[0])
    if own is not None and config_split[0] != micro and own["tokens_per_s"] > 0:
        compare = (f"; the config's {split_text(*config_split)}: {own['tokens_per_s']:,.0f} tokens/s, "
                   f"{chosen['tokens_per_s'] / own['tokens_per_s']:.2f}× slower")
    larger = [o for o in chosen["options"] if o["micro"] > micro]
    limit = ""
    if larger and not larger[0]["fits"]:
        limit = f"; {larger[0]['micro']} would take {_gib(larger[0]['peak_reserved_mib'])}"
    elif microbatch.smallest_failure(measurements) is not None and micro < step:
        limit = f"; {microbatch.smallest_failure(measurements)} ran out of memory"
    reason = (f"{split_text(micro, accumulation)}: the fastest split of {step} sequences per optimizer step that "
              f"fits in {where} (peak {_gib(chosen['peak_reserved_mib'])}, {chosen['tokens_per_s']:,.0f} tokens/s "
              f"{'per GPU' if probe.gpu_name != 'CPU' else 'on the CPU'}{compare}{limit})")
    return BatchChoice(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                       source=source, reason=reason, fallbacks=chosen["fallbacks"])


def _config_split(args: dict[str, Any]) -> tuple[int, int]:
    batch, accumulation = args.get("per_device_train_batch_size") or 8, args.get("gradient_accumulation_steps") or 1
    return (batch if isinstance(batch, int) else 8), (accumulation if isinstance(accumulation, int) else 1)


def _device_of(session: Session, run: Run) -> tuple[str, float | None]:
    """The GPU type (name) the run was dispatched to and its memory; "cpu" for a CPU run."""
    if not run.gpus_requested:
        return "cpu", None
    worker = session.get(Worker, run.worker_id or run.dispatched_worker_id or "")
    gpus = {int(g.get("index", -1)): g for g in (worker.gpus if worker else [])}
    first = gpus.get(run.gpu_ids[0]) if run.gpu_ids else next(iter(gpus.values()), None)
    if not first:
        return "unknown GPU", None
    return str(first.get("name") or "unknown GPU"), float(first.get("memory_total_mib") or 0) or None


def _model_path(run: Run) -> str:
    return str((run.lineage.get("model") or {}).get("path") or "")


def _model_fingerprint(session: Session, run: Run) -> str:
    model = session.get(ModelEntry, (run.lineage.get("model") or {}).get("id") or -1)
    return model.fingerprint if model else ""


def claim_plan(session: Session, run: Run) -> tuple[BatchChoice | None, ProbeRequest | None]:
    """At a claim: the split the attempt trains with (the cache's, or an earlier attempt's), or a
    probe to run first; None, None where the config's split applies. Updates run.batch_plan."""
    args = run_args(run.train_yaml)
    config = session.get(TrainConfig, run.config_id)
    plan = dict(run.batch_plan or {})
    off = auto_off_reason(bool(config and config.auto_batch), args, run.gpus_requested)
    if off is not None:
        plan.update(auto=False, reason=off)
        _save_plan(session, run, plan, notify=False)
        return None, None
    step = step_per_device(args)
    if not 1 <= step <= MAX_STEP:
        plan.update(auto=False, reason=f"a step of {step} sequences is past what the probe takes")
        _save_plan(session, run, plan, notify=False)
        return None, None
    device, _total = _device_of(session, run)
    fields = key_fields(args, shape_digest(_model_path(run), _model_fingerprint(session, run)), device)
    key = probe_key(fields)
    earlier_key = plan.get("key")
    plan.update(auto=True, key=key, device=device, shape=fields["model_shape"], step=step, gpus=max(run.gpus_requested, 1),
                seq_len=seq_len(args), config_split=list(_config_split(args)))
    earlier = plan.get("choice")
    if earlier and earlier_key == key and earlier.get("step") == step:
        choice = BatchChoice(**{**earlier["batch"], "source": "earlier attempt",
                                "reason": f"as the earlier attempt: {earlier['batch']['reason']}"})
        plan["state"] = "chosen"
        _save_plan(session, run, plan, notify=False)
        return choice, None
    probe = session.exec(select(BatchProbe).where(BatchProbe.key == key)).first()
    if probe is not None and microbatch.covers(_measurements(probe), step, _budget(probe)):
        choice = choice_from_probe(probe, step, _config_split(args), "cache")
        choice.reason = f"from the probe cache (probe {probe.id}, run {probe.run_id}): {choice.reason}"
        _chosen(session, run, plan, choice, probe)
        return choice, None
    settings = get_settings()
    plan.update(state="probing", probe_asked_at=utcnow().isoformat())
    _save_plan(session, run, plan, notify=False)
    cpu = device == "cpu"
    return None, ProbeRequest(step=step, margin=settings.probe_margin, timed_steps=settings.probe_timed_steps,
                              warmup_steps=1, device="cpu" if cpu else "auto",
                              memory_limit_mib=settings.probe_cpu_memory_mib if cpu else None)


def _chosen(session: Session, run: Run, plan: dict[str, Any], choice: BatchChoice, probe: BatchProbe | None) -> None:
    plan["state"] = "chosen"
    plan["choice"] = {"step": plan.get("step"), "batch": choice.model_dump()}
    if probe is not None:
        found = microbatch.options(_measurements(probe), int(plan.get("step") or 1), _budget(probe), probe.seq_len)
        predicted = next((o for o in found if o["micro"] == choice.per_device_train_batch_size), None)
        plan["predicted"] = predicted and {k: predicted[k] for k in ("peak_reserved_mib", "peak_allocated_mib",
                                                                      "step_s", "tokens_per_s")}
        plan["probe_id"] = probe.id
        config = session.get(TrainConfig, run.config_id)
        if config is not None:  # the estimate again, now from the probe, on the GPU the run got
            device, total = _device_of(session, run)
            plan["estimate_probe"] = _estimate_summary(_config_estimate(session, config, run.gpus_requested, device, total))
    _save_plan(session, run, plan)


def _save_plan(session: Session, run: Run, plan: dict[str, Any], *, notify: bool = True) -> None:
    run.batch_plan = dict(plan)  # a new dict: the JSON column notices
    session.add(run)
    if notify:
        session.add(RunEvent(run_id=run.id, kind="status",
                             data={"status": run.status.value, "batch": plan.get("state")}))
    session.commit()
    session.refresh(run)
    if notify:
        hub.notify(run.id)


def _claimed_run(session: Session, run_id: int, attempt: int) -> Run:
    from app.services.runs import CLAIMED, RunConflict, RunNotFound

    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found (deleted)")
    session.refresh(run)
    if run.attempt != attempt or run.status not in CLAIMED:
        raise RunConflict(f"run {run_id} attempt {attempt} is over (the run is at attempt {run.attempt}, "
                          f"{run.status.value})")
    return run


def record_probe(session: Session, run_id: int, report: ProbeReport) -> BatchChoice:
    """A worker's probe result: stored in the cache, answered with the split to train with."""
    run = _claimed_run(session, run_id, report.attempt)
    plan = dict(run.batch_plan or {})
    args = run_args(run.train_yaml)
    config_split = _config_split(args)
    step = int(plan.get("step") or step_per_device(args))
    plan["probe"] = {"ok": report.ok, "probe_s": report.probe_s, "load_s": report.load_s, "device": report.device,
                     "sizes": [m.micro for m in report.measurements], "error": report.error}
    if not report.ok or not plan.get("key"):
        choice = BatchChoice(per_device_train_batch_size=config_split[0], gradient_accumulation_steps=config_split[1],
                             source="config", reason=f"the probe failed ({(report.error or 'no result')[-300:]}): "
                                                     f"the config's {split_text(*config_split)} is kept")
        _chosen(session, run, plan, choice, None)
        return choice
    probe = session.exec(select(BatchProbe).where(BatchProbe.key == plan["key"])).first() or BatchProbe(key=plan["key"])
    probe.key_fields = key_fields(args, shape_digest(_model_path(run), _model_fingerprint(session, run)),
                                  str(plan.get("device") or report.device))
    probe.gpu_name = report.device if report.device != "cpu" else "CPU"
    probe.total_mib, probe.overhead_mib, probe.base_mib = report.total_mib, report.overhead_mib, report.base_mib
    probe.seq_len = report.seq_len or seq_len(args)
    probe.measurements = [m.model_dump(exclude_none=True) for m in report.measurements]
    probe.probe_s, probe.load_s, probe.versions = report.probe_s, report.load_s, dict(report.versions)
    probe.worker_id, probe.run_id, probe.updated_at = report.worker_id, run.id, utcnow()
    session.add(probe)
    session.commit()
    session.refresh(probe)
    choice = choice_from_probe(probe, step, config_split, "probe")
    choice.reason = f"probed in {report.probe_s:.0f} s: {choice.reason}"
    _chosen(session, run, plan, choice, probe)
    return choice


def record_fallback(session: Session, run_id: int, report: BatchFallback) -> None:
    """The trainer ran out of memory at `failed_micro`: the run trains again at the smaller split,
    and the cache learns that the size did not fit."""
    run = _claimed_run(session, run_id, report.attempt)
    plan = dict(run.batch_plan or {})
    plan["fallback"] = {"failed_micro": report.failed_micro, "micro": report.per_device_train_batch_size,
                        "accumulation": report.gradient_accumulation_steps, "logged_steps": report.logged_steps,
                        "reason": report.reason}
    choice = BatchChoice(
        per_device_train_batch_size=report.per_device_train_batch_size,
        gradient_accumulation_steps=report.gradient_accumulation_steps, source="fallback",
        reason=(f"{split_text(report.per_device_train_batch_size, report.gradient_accumulation_steps)}: "
                f"{report.failed_micro} ran out of memory after {report.logged_steps} logged step(s), "
                "so the run started again one size smaller"),
        fallbacks=[m for m in ((plan.get("choice") or {}).get("batch") or {}).get("fallbacks", [])
                   if m < report.per_device_train_batch_size],
    )
    plan["choice"] = {"step": plan.get("step"), "batch": choice.model_dump()}
    plan.pop("predicted", None)
    if plan.get("key"):
        probe = session.exec(select(BatchProbe).where(BatchProbe.key == plan["key"])).first()
        if probe is not None:
            probe.measurements = [*probe.measurements, {"micro": report.failed_micro, "ok": False,
                                                        "error": f"out of memory in run {run.id}"}]
            probe.updated_at = utcnow()
            session.add(probe)
    _save_plan(session, run, plan)


def record_finish(session: Session, run_id: int, report: FinishRequest) -> None:
    """What the attempt measured (peak memory, time per epoch), and how far its estimates were."""
    run = session.get(Run, run_id)
    if run is None:
        return
    session.refresh(run)
    plan = dict(run.batch_plan or {})
    results = report.results or {}
    measured: dict[str, Any] = {}
    if report.peak_memory.get("reserved_mib"):
        measured["peak_reserved_mib"] = round(report.peak_memory["reserved_mib"], 1)
        measured["peak_allocated_mib"] = round(report.peak_memory.get("allocated_mib") or 0, 1)
    runtime, epoch = results.get("train_runtime"), results.get("epoch")
    steps = run.current_step or 0
    if isinstance(runtime, (int, float)) and runtime > 0 and isinstance(epoch, (int, float)) and epoch > 0:
        measured["epoch_s"] = round(runtime / epoch, 2)
        measured["train_runtime_s"] = round(runtime, 2)
        if steps:
            measured["step_s"] = round(runtime / steps, 4)
        measured["epochs"] = epoch
    if not measured:
        return
    choice = ((plan.get("choice") or {}).get("batch") or {})
    measured["micro"] = choice.get("per_device_train_batch_size") or _config_split(run_args(run.train_yaml))[0]
    plan["measured"] = measured
    errors = {}
    for name in ("estimate", "estimate_probe"):
        estimate = plan.get(name) or {}
        if estimate.get("micro") not in (None, measured["micro"]):
            continue  # it estimated another split (the run fell back): no like-for-like figure
        error = {}
        if estimate.get("peak_mem_mib") and measured.get("peak_reserved_mib"):
            error["memory"] = round(estimate["peak_mem_mib"] / measured["peak_reserved_mib"] - 1, 4)
        if estimate.get("epoch_s") and measured.get("epoch_s"):
            error["epoch"] = round(estimate["epoch_s"] / measured["epoch_s"] - 1, 4)
        if error:
            errors[name] = {**error, "source": estimate.get("source")}
    plan["errors"] = errors
    run.batch_plan = plan
    session.add(run)
    session.commit()


# --------------------------------------------------------------------------- estimates
def _tflops(device: str) -> float:
    name = device.upper()
    return next((rate for tag, rate in GPU_TFLOPS if tag in name), UNKNOWN_GPU_TFLOPS)


def formula_params(config: dict[str, Any]) -> dict[str, float]:
    """Parameter counts of a decoder from its config.json: all, those in matrix products, and
    LoRA's (rank 1, every linear layer of every block)."""
    c = _text_config(config)
    h, layers = int(c.get("hidden_size") or 0), int(c.get("num_hidden_layers") or 0)
    inter = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (h // heads if heads else 0))
    vocab = int(c.get("vocab_size") or 0)
    q, kvd = heads * head_dim, kv * head_dim
    per_layer = h * q + 2 * h * kvd + q * h + 3 * h * inter
    tied = bool(c.get("tie_word_embeddings"))
    total = layers * per_layer + vocab * h * (1 if tied else 2)
    lora_rank1 = layers * ((h + q) + 2 * (h + kvd) + (q + h) + 2 * (h + inter) + (inter + h))
    return {"params": float(total), "matmul": float(total - (0 if tied else vocab * h)), "lora_rank1": float(lora_rank1),
            "hidden": float(h), "layers": float(layers), "intermediate": float(inter), "vocab": float(vocab)}


def formula_memory_mib(config: dict[str, Any], args: dict[str, Any], micro: int) -> float:
    """Peak reserved memory of a training step of `micro` full sequences: weights, trainable
    parameters with their gradients and Adam states, activations kept for the backward pass (per
    token per layer ≈ 10 × intermediate + 4 × hidden bytes in bf16 with Liger, measured on Qwen2.5
    shapes), the logits when Liger's fused loss is off."""
    p = formula_params(config)
    wide = 2.0 if (args.get("bf16") or args.get("fp16")) else 4.0
    bits = args.get("quantization_bit")
    weight_bytes = {4: 0.55, 8: 1.05}.get(bits, wide) if isinstance(bits, int) else wide
    full = args.get("finetuning_type") in ("full", "freeze")
    if full:  # fp32 weights and gradients, Adam's two moments
        weights = p["params"] * 16.0
    else:  # the frozen base, and LoRA's fp32 weights, gradients and Adam moments
        weights = p["params"] * weight_bytes + p["lora_rank1"] * int(args.get("lora_rank") or 8) * 16.0
    tokens = micro * seq_len(args)
    layer = (10 * p["intermediate"] + 4 * p["hidden"]) * (wide / 2)
    liger = bool(args.get("enable_liger_kernel"))
    if not liger:
        layer *= 1.3
    if args.get("disable_gradient_checkpointing"):
        activations = tokens * p["layers"] * layer
    else:
        activations = tokens * (p["layers"] * 2 * p["hidden"] * (wide / 2) + layer)
    logits = 0.0 if liger else tokens * p["vocab"] * 10.0
    return (weights + activations + logits) * 1.05 / (1024 * 1024) + 600  # + allocator slack, kernels' workspaces


def formula_step_s(config: dict[str, Any], args: dict[str, Any], micro: int, device: str) -> float:
    """Forward + backward of one micro-batch: 4N FLOPs per token for LoRA (no weight gradients of
    the frozen base), 6N for full fine-tuning, 2N more with gradient checkpointing, plus attention,
    at a share of the GPU's rate that grows with the model's width."""
    p = formula_params(config)
    full = args.get("finetuning_type") in ("full", "freeze")
    per_token = (6 if full else 4) * p["matmul"]
    if not args.get("disable_gradient_checkpointing"):
        per_token += 2 * p["matmul"]
    per_token += 6 * seq_len(args) * p["hidden"] * p["layers"]
    efficiency = FORMULA_EFFICIENCY * min(1.0, p["hidden"] / FORMULA_FULL_WIDTH)
    return micro * seq_len(args) * per_token / (_tflops(device) * 1e12 * efficiency)


def _token_lengths(session: Session, dataset_ids: list[int], model_id: int | None, template: str | None) -> list[int]:
    """Measured token lengths (prompt + response, with the template) of the datasets' samples."""
    lengths: list[int] = []
    for dataset_id in dataset_ids:
        dataset = session.get(Dataset, dataset_id)
        stats = ((dataset.report or {}).get("token_stats") or {}) if dataset else {}
        same_model = [key for key in stats if key.startswith(f"{model_id}:")]
        for key in dict.fromkeys([f"{model_id}:{template}", *same_model, *stats]):
            pairs = [pair for pair in (stats.get(key) or {}).get("lengths") or [] if pair]
            if pairs:
                lengths += [int(p) + int(r) for p, r in pairs]
                break
    return lengths


def packed_share(lengths: list[int], cutoff: int) -> float:
    """Packs per row: LLaMA-Factory's greedy knapsack on the measured lengths, in its map batches of
    PACKING_CHUNK rows (with packing it lowers cutoff_len by one: rows are cut to it, packs hold it)."""
    if not lengths:
        return 0.0
    import bisect

    capacity = max(1, cutoff - 1)
    total = 0
    for start in range(0, len(lengths), PACKING_CHUNK):
        numbers = sorted(min(n, capacity) for n in lengths[start:start + PACKING_CHUNK])
        while numbers:
            room = capacity
            while True:
                index = bisect.bisect(numbers, room) - 1
                if index < 0:
                    break
                room -= numbers.pop(index)
            total += 1
    return total / len(lengths)


def padded_share(lengths: list[int], cutoff: int, micro: int, seed: int = 0) -> float:
    """Unpacked: the mean padded length of a random micro-batch (each pads to its longest row,
    rounded up to 8) over cutoff_len."""
    if not lengths:
        return 1.0
    rows = [min(n, cutoff) for n in lengths]
    random.Random(seed).shuffle(rows)
    padded = [min(cutoff, math.ceil(max(rows[i:i + micro]) / 8) * 8) * len(rows[i:i + micro])
              for i in range(0, len(rows), micro)]
    return sum(padded) / (len(rows) * cutoff)


def _past_measurements(session: Session, key: str) -> list[dict[str, Any]]:
    rows = session.exec(
        select(Run.id, Run.batch_plan).where(col(Run.status).in_([RunStatus.succeeded, RunStatus.cancelled]))
        .order_by(col(Run.id).desc()).limit(HISTORY_RUNS)
    ).all()
    return [{"run_id": run_id, **plan["measured"]} for run_id, plan in rows
            if (plan or {}).get("key") == key and (plan or {}).get("measured", {}).get("step_s")]


def landing_device(session: Session, gpus: int) -> tuple[str | None, float | None, str | None]:
    """The GPU type (and memory) of the worker the scheduler would send a run of `gpus` GPUs to."""
    from app.services.form_defaults import landing_worker
    from app.services.workers import online_workers

    if gpus == 0:
        return "cpu", None, None
    worker = landing_worker(online_workers(session), gpus)
    if worker is None or not worker.gpus:
        return None, None, None
    first = worker.gpus[0]
    return str(first.get("name") or "unknown GPU"), float(first.get("memory_total_mib") or 0) or None, worker.id


def speed_estimate(session: Session, **kwargs: Any) -> dict[str, Any]:
    """Peak memory, the split, time per epoch and in total before launch (see the module's doc). It runs
    on the form's input as typed: a value of the wrong type gives a note, never an error."""
    try:
        return _speed_estimate(session, **kwargs)
    except (TypeError, ValueError, ArithmeticError) as error:
        log.info("no speed estimate: %s", error)
        return {"note": f"no speed estimate for these values ({type(error).__name__})", "gpus": kwargs.get("gpus", 0),
                "step": 0, "step_per_gpu": 0, "auto": kwargs.get("auto_batch")}


def _speed_estimate(session: Session, *, model_id: int | None, dataset_ids: list[int], params: dict[str, Any],
                    gpus: int, auto_batch: bool, base: dict[str, Any], previous_step: int | None = None,
                    device: str | None = None, device_total_mib: float | None = None) -> dict[str, Any]:
    settings = get_settings()
    world = max(gpus, 1)
    step = step_per_device(params)
    result: dict[str, Any] = {"gpus": gpus, "step": step * world, "step_per_gpu": step, "auto": auto_batch,
                              "config_split": list(_config_split(params)), "source": None}
    learning_rate = params.get("learning_rate")
    if (isinstance(previous_step, int) and 0 < previous_step <= MAX_STEP and 0 < step * world != previous_step
            and isinstance(learning_rate, (int, float)) and learning_rate > 0):
        suggested = learning_rate * math.sqrt(step * world / previous_step)
        result["lr_hint"] = (f"The optimizer step went from {previous_step} to {step * world} sequences. By the "
                             f"square-root rule the learning rate {learning_rate:.3g} would become {suggested:.3g} "
                             "(a hint: nothing is changed for you).")
    worker_id = None
    if device is None:
        device, device_total_mib, worker_id = landing_device(session, gpus)
    result.update(device=device, device_total_mib=device_total_mib, worker_id=worker_id)
    model = session.get(ModelEntry, model_id) if model_id else None
    if not 1 <= step * world <= MAX_STEP:
        result["note"] = f"the optimizer step must be 1 to {MAX_STEP} sequences"
        return result
    if model is None or not base.get("train_samples"):
        result["note"] = "choose a model and a dataset for speed and memory estimates"
        return result
    if device is None:
        result["note"] = f"no online worker has {world} GPU(s): no GPU type to estimate for"
        return result
    args = {**params, "bf16": params.get("bf16") and gpus > 0, "fp16": params.get("fp16") and gpus > 0}
    key_shape = shape_digest(model.path, model.fingerprint)
    key = probe_key(key_fields(args, key_shape, device))
    off = auto_off_reason(auto_batch, args, gpus)
    micro, accumulation = _config_split(params)
    length = seq_len(args)
    lengths = _token_lengths(session, dataset_ids, model_id, params.get("template"))
    cutoff = cutoff_len(args)
    tokens = float(base.get("tokens_per_epoch") or 0)
    if packs(args):
        share = packed_share(lengths, cutoff)
        sequences = base["train_samples"] * share if share else tokens / (cutoff * PACKING_FILL)
    else:
        sequences = float(base["train_samples"])
    sequences = max(1.0, sequences)
    steps_per_epoch = max(1, math.ceil(sequences / (step * world)))
    probe = session.exec(select(BatchProbe).where(BatchProbe.key == key)).first()
    predicted = None
    if probe is not None and microbatch.covers(_measurements(probe), step, _budget(probe)):
        if off is None:
            chosen = microbatch.choose(_measurements(probe), step, _budget(probe), probe.seq_len)
            if chosen["micro"] is not None:
                micro, accumulation = chosen["micro"], chosen["accumulation"]
        predicted = next((o for o in microbatch.options(_measurements(probe), step, _budget(probe), probe.seq_len)
                          if o["micro"] == micro), None)
    past = [m for m in _past_measurements(session, key) if m.get("micro") == micro]
    source, peak, step_s = None, None, None
    if past:
        latest = past[0]
        source = f"past run {latest['run_id']}"
        peak = latest.get("peak_reserved_mib")
        # Its time per optimizer step, scaled by this config's sequences per step.
        past_step = (session.get(Run, latest["run_id"]).batch_plan or {}).get("step") or step
        step_s = latest["step_s"] * step / past_step
    if predicted is not None:
        peak = peak or predicted["peak_reserved_mib"]
        if step_s is None:
            # The passes' time at this split, as the trainer's own loop measured it in the probe.
            fb = predicted["fb_s"] * (1.0 if packs(args) else padded_share(lengths, cutoff, micro))
            step_s = ((accumulation * fb + microbatch.optimizer_step_s(_measurements(probe)))
                      * microbatch.loop_factor(_measurements(probe)))
            factor, runs = probe_calibration(session, device, key_shape)
            source = f"probe {probe.id} on {probe.gpu_name}"
            if factor is not None:
                step_s *= factor
                source += f", × {factor:.2f} (what {runs} past run(s) here measured ÷ what their probe predicted)"
    config = model_config(model.path)
    if source is None and config is not None and device != "cpu":
        source = "formula (rough: no probe or past run of this model, settings and GPU yet)"
        if off is None and device_total_mib:
            budget = microbatch.memory_budget_mib(device_total_mib, 700, settings.probe_margin)
            fitting = [d for d in microbatch.divisors(step) if formula_memory_mib(config, args, d) <= budget]
            if fitting:
                micro, accumulation = fitting[-1], step // fitting[-1]
        peak = formula_memory_mib(config, args, micro)
        fb = formula_step_s(config, args, micro, device) * (1.0 if packs(args) else padded_share(lengths, cutoff, micro))
        step_s = accumulation * fb
    result.update(micro=micro, accumulation=accumulation, split_auto=off is None, auto_off=off, source=source,
                  seq_len=length, sequences_per_epoch=round(sequences), steps_per_epoch=steps_per_epoch,
                  packed=packs(args))
    if source is None:
        result["note"] = ("no past run or probe of this model and settings on this device yet" if device == "cpu"
                          else "the model's config.json is not readable here: no formula estimate")
    if peak is not None and device != "cpu":
        result["peak_mem_mib"] = round(peak, 1)
    if step_s:
        epochs = params.get("num_train_epochs") or 0
        epochs = float(epochs) if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) else 0.0
        max_steps = params.get("max_steps")
        start = 0.0 if source.startswith("past run") else LOOP_START_S
        epoch_s = (steps_per_epoch * step_s + _eval_s(base, params, step_s, step, steps_per_epoch)
                   + start / max(1.0, float(epochs)))
        total = (max_steps * step_s if isinstance(max_steps, int) and max_steps > 0 else epoch_s * epochs)
        result.update(step_s=round(step_s, 4), epoch_s=round(epoch_s, 1), total_s=round(total, 1),
                      tokens_per_s=round(step * world * length / step_s) if packs(args) else None)
    result["accuracy"] = accuracy(session, device)
    return result


def probe_calibration(session: Session, device: str, shape: str) -> tuple[float | None, int]:
    """The median of measured ÷ probe-predicted time per optimizer step over past runs of this model
    shape on this device (with other settings: those of the same key are used directly)."""
    rows = session.exec(
        select(Run.batch_plan).where(col(Run.status).in_([RunStatus.succeeded, RunStatus.cancelled]))
        .order_by(col(Run.id).desc()).limit(HISTORY_RUNS)
    ).all()
    ratios = []
    for plan in rows:
        plan = plan or {}
        predicted, measured = (plan.get("predicted") or {}).get("step_s"), (plan.get("measured") or {}).get("step_s")
        if (plan.get("device") == device and plan.get("shape") == shape and predicted and measured
                and not plan.get("fallback")):
            ratios.append(min(2.0, max(0.5, measured / predicted)))
        if len(ratios) >= ACCURACY_RUNS:
            break
    if not ratios:
        return None, 0
    ratios.sort()
    return ratios[len(ratios) // 2], len(ratios)


def _eval_s(base: dict[str, Any], params: dict[str, Any], step_s: float, step: int, steps_per_epoch: int) -> float:
    """Evaluation passes of one epoch: forward only (a third of a training step's work per row)."""
    strategy = params.get("eval_strategy") or "no"
    eval_rows = base.get("eval_samples") or 0
    if strategy == "no" or not eval_rows:
        return 0.0
    evals = 1 if strategy == "epoch" else steps_per_epoch / max(1, int(params.get("eval_steps") or 500))
    per_row = step_s / max(step, 1) / 3
    return evals * eval_rows * per_row


def accuracy(session: Session, device: str | None) -> dict[str, Any] | None:
    """How far the estimates shown before launch were from what the last runs on this device measured."""
    rows = session.exec(
        select(Run.id, Run.batch_plan).where(col(Run.status).in_([RunStatus.succeeded, RunStatus.cancelled]))
        .order_by(col(Run.id).desc()).limit(HISTORY_RUNS)
    ).all()
    found = []
    for run_id, plan in rows:
        plan = plan or {}
        error = (plan.get("errors") or {}).get("estimate")
        if error and plan.get("device") == device:
            found.append({"run_id": run_id, **error})
        if len(found) >= ACCURACY_RUNS:
            break
    if not found:
        return None
    memory = [f["memory"] for f in found if "memory" in f]
    epoch = [f["epoch"] for f in found if "epoch" in f]
    return {"runs": [f["run_id"] for f in found], "memory": memory, "epoch": epoch, "details": found,
            "memory_range": [min(memory), max(memory)] if memory else None,
            "epoch_range": [min(epoch), max(epoch)] if epoch else None}


# --------------------------------------------------------------------------- configs and runs
def apply_step_size(data: Any, params: dict[str, Any], errors: Any) -> None:
    """The config's optimizer-step size (sequences per step, all GPUs together): with it given,
    per_device_train_batch_size × gradient_accumulation_steps becomes step ÷ GPUs, keeping the batch
    size when it divides that, else the largest divisor below it (the worker re-splits on a GPU)."""
    step = getattr(data, "step_size", None)
    if step is None:
        return
    world = max(int(data.gpus or 0), 1)
    if not isinstance(step, int) or not 1 <= step <= MAX_STEP:
        errors.error("step_size", f"the optimizer-step size must be a whole number of sequences, 1 to {MAX_STEP}")
        return
    if step % world:
        errors.error("step_size", f"{step} sequences per step do not split over {world} GPUs: use a multiple of {world}")
        return
    per_gpu = step // world
    batch = params.get("per_device_train_batch_size")
    batch = batch if isinstance(batch, int) and batch > 0 else 4
    micro = max(d for d in microbatch.divisors(per_gpu) if d <= batch)
    params["per_device_train_batch_size"] = micro
    params["gradient_accumulation_steps"] = per_gpu // micro


def _config_estimate(session: Session, config: TrainConfig, gpus: int, device: str | None = None,
                     device_total_mib: float | None = None) -> dict[str, Any]:
    from app.services import configs as config_service

    data = config_service.to_input(config)
    data.gpus = gpus
    try:
        base = config_service.estimate(session, data)
        if device is None:
            return base.get("speed") or {}
        params, _ = config_service.check(session, data)
        return speed_estimate(session, model_id=config.model_id, dataset_ids=list(config.dataset_ids), params=params,
                              gpus=gpus, auto_batch=config.auto_batch, base=base, device=device,
                              device_total_mib=device_total_mib)
    except Exception:  # an estimate never stops a run
        log.exception("config %s: no estimate", config.id)
        return {}


def _estimate_summary(speed: dict[str, Any]) -> dict[str, Any]:
    return {k: speed.get(k) for k in ("source", "device", "micro", "accumulation", "peak_mem_mib", "epoch_s",
                                      "total_s", "step_s", "tokens_per_s") if speed.get(k) is not None}


def initial_plan(session: Session, config: TrainConfig, gpus: int) -> dict[str, Any]:
    """What a new run keeps from before its launch: the estimate it was shown."""
    return {"auto": config.auto_batch, "estimate": _estimate_summary(_config_estimate(session, config, gpus))}


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The run page's view of run.batch_plan."""
    choice = ((plan.get("choice") or {}).get("batch")) or {}
    return {"state": plan.get("state"), "choice": choice, "fallback": plan.get("fallback"),
            "estimate": plan.get("estimate") or {}, "predicted": plan.get("predicted"),
            "measured": plan.get("measured"), "errors": plan.get("errors") or {}, "probe": plan.get("probe"),
            "reason": plan.get("reason"), "auto": plan.get("auto")}
