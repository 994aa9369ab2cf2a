"""The wire contract between the panel and its workers, imported by both sides.

Workers never open the database: they take tasks from the broker and talk to the panel over
`/internal/v1` with the shared worker token. Everything that crosses that line is named here:
task and queue names, the Pydantic payload of every message, artifact names and the checkpoint
pattern, and the metric and progress fields. Nothing here imports the app or the workers.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from sqlmodel import SQLModel

# --------------------------------------------------------------------------- tasks and queues
PING_TASK = "tuneboard.ping"
TRAIN_TASK = "tuneboard.train"
SERVE_START_TASK = "tuneboard.serve_start"
SERVE_STOP_TASK = "tuneboard.serve_stop"
LOAD_ADAPTER_TASK = "tuneboard.serve_load_adapter"
UNLOAD_ADAPTER_TASK = "tuneboard.serve_unload_adapter"

# Every worker consumes the default queue (pings) and a queue of its own: the panel schedules,
# so a task goes to the one worker that has room for it now.
DEFAULT_QUEUE = "default"


def worker_queue(worker_id: str) -> str:
    return f"worker.{worker_id}"


# How often a worker reports while a run's process lives (the per-run heartbeat).
RUN_HEARTBEAT_INTERVAL_S = 2.0

# --------------------------------------------------------------------------- artifacts
# The run folder's placeholders in a run's YAML, replaced by each worker with its own paths.
OUTPUT_DIR_PLACEHOLDER = "{OUTPUT_DIR}"
DATASET_DIR_PLACEHOLDER = "{DATASET_DIR}"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The final adapter (the top level of the output folder) travels under this artifact name.
ADAPTER_ARTIFACT = "adapter"
# Small result files a worker uploads at the end of an attempt, shown on the run page.
RESULT_FILES = (
    "training_loss.png", "training_eval_loss.png", "all_results.json", "train_results.json",
    "eval_results.json", "trainer_log.jsonl",
)
# LLaMA-Factory writes this last into a checkpoint folder: its presence means "complete".
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


# A merged model exported from a run (app/services/exports.py) travels as its artifact "export-N".
EXPORT_ARTIFACT_PATTERN = re.compile(r"^export-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    match = CHECKPOINT_PATTERN.match(name)
    return int(match[1]) if match else None


class FileEntry(BaseModel):
    """One file of an artifact folder; its bytes are the blob `sha256` in the artifact store."""

    path: str = Field(max_length=500)  # relative, '/'-separated, no '..'
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _stays_inside_the_folder(cls, path: str) -> str:
        # Both sides write these paths to disk: a manifest must not reach outside its folder.
        parts = path.split("/")
        if "\\" in path or "\0" in path or any(part in ("", ".", "..") for part in parts):
            raise ValueError("must be a relative '/'-separated path without empty, '.' or '..' parts")
        return path


class ArtifactManifest(BaseModel):
    """A folder in the artifact store: a checkpoint-N or the final adapter."""

    name: str = Field(max_length=200)  # "checkpoint-N" or ADAPTER_ARTIFACT
    step: int | None = None
    files: list[FileEntry]

    @property
    def digest(self) -> str:
        """Content address of the whole folder (the serving worker's cache key)."""
        listing = sorted((f.path, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class UploadState(BaseModel):
    """Where the resumable upload of one blob, or an upload session, stands: the bytes the panel
    holds (all of them, `complete`, once the blob is in the store: a session's commit answers
    that). A 409 of the upload carries it too."""

    offset: int
    complete: bool


# A file too big to hash before sending it (one more full read) goes through an upload session:
# the panel hashes the bytes as they arrive, and the commit names the blob they must be.
class UploadSessionRequest(BaseModel):
    size: int = Field(ge=0)


class UploadSession(BaseModel):
    upload_id: str
    offset: int


class UploadCommit(BaseModel):
    sha256: str = Field(pattern=SHA256_PATTERN)


class ArtifactRecord(BaseModel):
    """What a worker posts once every blob of a folder is in the store."""

    attempt: int
    worker_id: str
    manifest: ArtifactManifest


# --------------------------------------------------------------------------- workers
class GpuInfo(BaseModel):
    index: int
    name: str = ""
    memory_total_mib: float = 0.0
    memory_used_mib: float = 0.0
    utilization: float = 0.0


class RunRef(BaseModel):
    run_id: int
    attempt: int


class Heartbeat(BaseModel):
    """A worker's heartbeat: who it is, where it can be reached, and what it has room for."""

    worker_id: str
    # New each time the worker process starts: a heartbeat from a new instance tells the panel
    # that the runs and servers of the previous one died with it.
    instance_id: str = ""
    hostname: str
    # The address the panel's gateway reaches this worker's inference servers at.
    advertise_host: str = "127.0.0.1"
    queues: list[str] = Field(default_factory=list)
    gpus: list[GpuInfo] = Field(default_factory=list)
    cpu_train_slots: int = 0
    serve_slots: int = 0
    # Registered model folders this worker holds: path → fingerprint (see model_fingerprint).
    models: dict[str, str] = Field(default_factory=dict)
    # Runs whose folder this worker keeps, and (now and then) what its artifact cache holds: blobs
    # and folders by content address. The panel answers which of them belong to nothing any more.
    local_runs: list[int] = Field(default_factory=list)
    cached_blobs: list[str] | None = None
    cached_folders: list[str] | None = None
    doctor: dict[str, Any] | None = None
    offline: bool = False


class ModelRef(BaseModel):
    path: str
    fingerprint: str


class HeartbeatReply(BaseModel):
    doctor_requested: bool = False
    # The registered models, so that the worker can say which of them it holds.
    models: list[ModelRef] = Field(default_factory=list)
    # What the worker may delete: folders of runs deleted on the panel, and cached blobs and
    # artifact folders that no stored artifact has any more (deleted runs, retention).
    forget_runs: list[int] = Field(default_factory=list)
    forget_blobs: list[str] = Field(default_factory=list)
    forget_folders: list[str] = Field(default_factory=list)


MODEL_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MODEL_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_fingerprint(folder: Path) -> str | None:
    """A model folder's identity, read the same way by the panel and by every worker: its
    config.json and its weight index (the index file of a sharded checkpoint, else the names and
    sizes of its weight files). None when the folder holds no readable model."""
    try:
        config = (folder / "config.json").read_bytes()
        index = next((p.read_bytes() for name in MODEL_INDEX_FILES if (p := folder / name).is_file()), None)
        if index is None:
            weights = sorted(
                (p.name, p.stat().st_size) for p in folder.iterdir()
                if p.is_file() and p.name.endswith(MODEL_WEIGHT_SUFFIXES)
            )
            index = json.dumps(weights).encode()
    except OSError:
        return None
    return hashlib.sha256(config + b"\0" + index).hexdigest()


# --------------------------------------------------------------------------- training
class TrainTask(BaseModel):
    """The train task's one argument: which attempt, under which dispatch, on which GPUs."""

    run_id: int
    attempt: int
    dispatch_id: str
    gpu_ids: list[int] = Field(default_factory=list)


class ClaimRequest(BaseModel):
    attempt: int
    dispatch_id: str
    worker_id: str
    instance_id: str = ""
    task_id: str = ""
    hostname: str = ""


class DatasetFile(BaseModel):
    name: str
    file_name: str
    sha256: str
    url: str  # under /internal/v1


# --------------------------------------------------------------------------- the micro-batch probe
# A GPU run with the automatic micro-batch (app/services/batching.py): the claim's RunSpec carries the
# split to train with (`batch`, from the panel's probe cache or an earlier attempt), or asks the worker
# to probe first (`probe`); the worker posts the probe's measurements (ProbeReport) and gets the split.
class ProbeRequest(BaseModel):
    step: int = Field(ge=1)  # sequences per optimizer step on one GPU (batch × accumulation)
    margin: float = Field(ge=0, lt=1)  # share of the device's memory left free
    timed_steps: int = Field(default=2, ge=1)
    warmup_steps: int = Field(default=1, ge=0)
    device: Literal["auto", "cpu"] = "auto"
    memory_limit_mib: float | None = None  # instead of the device's own memory (tests)


class BatchChoice(BaseModel):
    per_device_train_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    source: Literal["probe", "cache", "earlier attempt", "fallback", "config"]
    reason: str = ""
    # Smaller micro-batches that fit, largest first: an out-of-memory error falls back to the first.
    fallbacks: list[int] = Field(default_factory=list)


class ProbeMeasurement(BaseModel):
    micro: int = Field(ge=1)
    ok: bool
    peak_reserved_mib: float | None = None
    peak_allocated_mib: float | None = None
    fb_s: float | None = None  # forward + backward of one micro-batch
    opt_s: float | None = None  # clip + optimizer step + zero_grad
    steps: int | None = None
    # The trainer's own loop at this size (the one the probe expects to be chosen): seconds per
    # optimizer step of loop_accumulation micro-batches, over loop_steps steps.
    loop_step_s: float | None = None
    loop_accumulation: int | None = None
    loop_steps: int | None = None
    error: str | None = Field(default=None, max_length=2000)


class ProbeReport(BaseModel):
    """What workers/envscripts/batch_probe.py measured (ok false: it failed, `error` says why)."""

    attempt: int
    worker_id: str
    ok: bool
    device: str = Field(default="", max_length=200)
    total_mib: float = 0.0
    overhead_mib: float = 0.0
    base_mib: float = 0.0
    seq_len: int = 0
    step: int = 0
    measurements: list[ProbeMeasurement] = Field(default_factory=list, max_length=64)
    load_s: float = 0.0
    probe_s: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    error: str | None = Field(default=None, max_length=4000)


class BatchFallback(BaseModel):
    """The trainer ran out of memory in its first steps: the worker trains again at a smaller
    micro-batch (same sequences per step) and says so."""

    attempt: int
    worker_id: str
    failed_micro: int = Field(ge=1)
    per_device_train_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    logged_steps: int = 0
    reason: str = Field(default="", max_length=4000)


class RunSpec(BaseModel):
    """The claim's reply: everything a worker needs to train the attempt."""

    run_id: int
    attempt: int
    train_yaml: str
    dataset_info: dict[str, Any]
    datasets: list[DatasetFile]
    gpu_ids: list[int] = Field(default_factory=list)
    gpus: int = 0
    resume_from_checkpoint: str | None = None
    # The checkpoint to resume from, fetched from the artifact store when not on this disk.
    resume_manifest: ArtifactManifest | None = None
    heartbeat_interval_s: float = RUN_HEARTBEAT_INTERVAL_S
    # The automatic micro-batch: the split to train with, or a probe to run first (see above).
    batch: BatchChoice | None = None
    probe: ProbeRequest | None = None


class ProgressReport(BaseModel):
    current_steps: int | None = None
    total_steps: int | None = None
    percentage: float | None = None
    epoch: float | None = None
    elapsed_time: float | None = None
    remaining_time: float | None = None


class MetricPoint(SQLModel):
    """One logged step as a worker reports it (fields unknown at that step stay None)."""

    step: int
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    total_tokens: int | None = None
    grad_norm: float | None = None
    gpu_util: float | None = None
    gpu_mem_mib: float | None = None
    elapsed_s: float | None = None
    # Preference stages (DPO, KTO): LLaMA-Factory's rewards/chosen, rewards/rejected,
    # rewards/accuracies (DPO only) and rewards/margins of the train steps.
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    rewards_accuracies: float | None = None
    rewards_margins: float | None = None
    # Held-out pairs the model ranks right: RM's eval_accuracy, DPO's eval_rewards/accuracies.
    eval_accuracy: float | None = None


METRIC_FIELDS = tuple(name for name in MetricPoint.model_fields if name != "step")
LOG_SOURCES = ("running_log", "stdout")


class LogReport(BaseModel):
    source: str = Field(pattern="^(running_log|stdout)$")
    offset: int
    line: str


class EventsRequest(BaseModel):
    attempt: int
    worker_id: str
    status: Literal["running"] | None = None
    progress: ProgressReport | None = None
    metrics: list[MetricPoint] = Field(default_factory=list)
    logs: list[LogReport] = Field(default_factory=list)


class EventsReply(BaseModel):
    cancel: bool = False


class CheckpointReport(BaseModel):
    name: str
    step: int
    complete: bool = True


Outcome = Literal["succeeded", "failed", "cancelled"]


class FinishRequest(BaseModel):
    attempt: int
    worker_id: str
    outcome: Outcome
    exit_code: int | None = None
    reason: str = ""
    results: dict[str, Any] = Field(default_factory=dict)
    checkpoints: list[CheckpointReport] = Field(default_factory=list)
    # Whether the final adapter was saved (and uploaded as ADAPTER_ARTIFACT).
    has_adapter: bool = False
    versions: dict[str, str] = Field(default_factory=dict)
    # The trainer's peak GPU memory (RECORD_VRAM lines of trainer_log.jsonl): reserved_mib, allocated_mib.
    peak_memory: dict[str, float] = Field(default_factory=dict)


# --------------------------------------------------------------------------- serving
class ServeStartTask(BaseModel):
    server_id: int
    dispatch_id: str
    gpu_ids: list[int] = Field(default_factory=list)


class ServerStopTask(BaseModel):
    server_id: int


class ServerClaim(BaseModel):
    worker_id: str
    dispatch_id: str
    instance_id: str = ""


class AdapterSpec(BaseModel):
    deployment_id: int
    lora_name: str
    run_id: int
    manifest: ArtifactManifest


class ServerSpec(BaseModel):
    """The server claim's reply."""

    server_id: int
    backend: Literal["vllm", "llamafactory"]
    base_model_path: str
    base_name: str
    template: str | None = None
    # The bearer secret the server requires (vLLM's --api-key); only the panel's gateway has it.
    api_key: str
    max_lora_rank: int
    max_model_len: int
    kv_cache_bytes: str
    cpu_threads: int
    gpu_memory_utilization: float
    gpu_ids: list[int] = Field(default_factory=list)
    ready_timeout_s: float
    heartbeat_interval_s: float
    adapters: list[AdapterSpec]


class ServerReport(BaseModel):
    status: Literal["ready", "failed", "stopped"] | None = None
    url: str | None = None
    pid: int | None = None
    adapters: list[str] = Field(default_factory=list)
    reason: str = ""
    log_tail: str | None = None


class ServerReply(BaseModel):
    stop: bool = False


class AdapterLoadTask(BaseModel):
    server_id: int
    adapter: AdapterSpec
    replace: bool = False


class AdapterUnloadTask(BaseModel):
    server_id: int
    deployment_id: int
    lora_name: str


class AdapterReport(BaseModel):
    status: Literal["ready", "failed"]
    reason: str = ""


# --------------------------------------------------------------------------- evaluation
# An evaluation job (app/services/evaluations.py, workers/evaluation.py): generations of a base
# model, or of a run's adapter or checkpoint, on a set of rows, scored with LLaMA-Factory's own
# BLEU-4 and ROUGE-1/2/L. Scheduled like a run (a CPU training slot, or GPUs), claimed with its
# dispatch id; the worker heartbeats, uploads its generated_predictions.jsonl, then finishes.
EVAL_TASK = "tuneboard.evaluate"
EVAL_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
EVAL_PREDICTIONS_FILE = "generated_predictions.jsonl"
EvalBackend = Literal["llamafactory", "vllm"]


class EvalTask(BaseModel):
    evaluation_id: int
    dispatch_id: str
    gpu_ids: list[int] = Field(default_factory=list)


class EvalClaim(BaseModel):
    dispatch_id: str
    worker_id: str
    instance_id: str = ""


class EvalSpec(BaseModel):
    """The evaluation claim's reply: everything the worker needs to generate and score."""

    evaluation_id: int
    backend: EvalBackend
    base_model_path: str
    template: str
    # None: the base model alone.
    adapter: ArtifactManifest | None = None
    # The rows to generate for, as a dataset file of their own (JSON array, the dataset's format).
    dataset_name: str
    dataset_info_entry: dict[str, Any]
    rows_url: str  # under /internal/v1
    rows: int
    cutoff_len: int
    max_new_tokens: int
    batch_size: int
    gpu_ids: list[int] = Field(default_factory=list)
    heartbeat_interval_s: float = RUN_HEARTBEAT_INTERVAL_S
    # vLLM (backend "vllm")
    max_lora_rank: int = 64
    max_model_len: int = 2048
    kv_cache_bytes: str = "64M"
    cpu_threads: int = 1


class EvalHeartbeat(BaseModel):
    worker_id: str
    status: Literal["running"] | None = None


class EvalReply(BaseModel):
    cancel: bool = False


class EvalFinish(BaseModel):
    worker_id: str
    outcome: Outcome
    reason: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    rows: int = 0
    # Seconds of generation and scoring alone (the backend's own figure), and of the whole job.
    generate_s: float | None = None
    elapsed_s: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- export
# An export job (app/services/exports.py, workers/export.py): `llamafactory-cli export` merges a
# run's adapter into its base model; the worker uploads the merged folder as the run's artifact
# "export-N" (EXPORT_ARTIFACT_PATTERN), and the panel registers it as a model. Claimed with
# EvalClaim's fields, beats with EvalHeartbeat, as an evaluation does.
EXPORT_TASK = "tuneboard.export"


class ExportTask(BaseModel):
    export_id: int
    dispatch_id: str
    gpu_ids: list[int] = Field(default_factory=list)


class ExportSpec(BaseModel):
    export_id: int
    run_id: int
    attempt: int  # the run's attempt the artifact is recorded under
    artifact_name: str  # export-N
    base_model_path: str
    template: str
    adapter: ArtifactManifest
    export_size: int = Field(ge=1)  # shard size in GB (LLaMA-Factory's export_size)
    heartbeat_interval_s: float = RUN_HEARTBEAT_INTERVAL_S


class ExportFinish(BaseModel):
    worker_id: str
    outcome: Outcome
    reason: str = ""
    # Whether the merged folder is in the artifact store as the spec's artifact_name.
    uploaded: bool = False
    elapsed_s: float | None = None
