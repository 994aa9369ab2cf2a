"""Evaluations: the state machine and everything that changes an evaluation job.

An evaluation generates, for a set of rows, the answers of a base model or of a run's adapter
(its final adapter or one of its stored checkpoints) and scores them against the rows' references
with LLaMA-Factory's BLEU-4 and ROUGE-1/2/L. Two backends do the generating on a worker:
LLaMA-Factory's own predict (`do_predict` + `predict_with_generate`) and vLLM's offline batch
generation in the serving environment, fed the very prompt tokens LLaMA-Factory's data pipeline
builds and scored by the same metric code (workers/envscripts/eval_text.py).

The rows are the run's held-out split (the `val_size` rows LLaMA-Factory held out: the same
`datasets.Dataset.train_test_split(test_size=val_size, seed=seed)` call it makes, on the same
number of rows, run in the training environment: workers/envscripts/eval_split.py) or any
registered dataset of the run's format, cut to `max_rows`. An adapter's evaluation links to the
base model's evaluation of the same rows (same model, backend, template, cutoff and generation
length), created once and shared by every later evaluation of those rows.

Scheduling is the panel's (app/services/scheduler.py): an evaluation takes a CPU training slot or
GPUs on a worker that holds the model, like a run; its lifecycle is app/services/jobs.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Session, col, select

from app.models import Dataset, Evaluation, JobStatus, ModelEntry, Run, RunStatus
from app.services import artifacts as artifact_service
from app.services.broker import kick_scheduler
from app.services.jobs import JobConflict, JobError, JobLifecycle, JobNotFound
from app.services.dataset_ingest import dataset_info_entry
from app.services.datasets import _json_array_rows, _jsonl_rows, data_file
from app.settings import get_settings
from app.wire import (
    ADAPTER_ARTIFACT,
    CHECKPOINT_PATTERN,
    EVAL_METRICS,
    EVAL_TASK,
    ArtifactManifest,
    EvalClaim,
    EvalFinish,
    EvalSpec,
    EvalTask,
)

log = logging.getLogger(__name__)

E = JobStatus
# A base evaluation in one of these is reused by a new evaluation of the same rows.
REUSABLE = (E.queued, E.starting, E.running, E.succeeded)
BACKENDS = ("llamafactory", "vllm")
MAX_ROWS_LIMIT = 100_000
# Rows per generation batch (per_device_eval_batch_size; vLLM batches on its own).
EVAL_BATCH_SIZE = 8


_jobs = JobLifecycle(Evaluation, "evaluation", EVAL_TASK,
                     lambda job_id, dispatch_id, gpu_ids: EvalTask(evaluation_id=job_id, dispatch_id=dispatch_id,
                                                                   gpu_ids=gpu_ids))
get_evaluation = _jobs.get
# What the scheduler calls (app/services/scheduler.py JOB_SERVICES).
holding, waiting, dispatch = _jobs.holding, _jobs.waiting, _jobs.dispatch
release_stale_dispatches, mark_lost = _jobs.release_stale_dispatches, _jobs.mark_lost
heartbeat, cancel = _jobs.heartbeat, _jobs.cancel


def list_evaluations(session: Session, *, run_id: int | None = None, limit: int = 200) -> list[Evaluation]:
    query = select(Evaluation).order_by(col(Evaluation.id).desc()).limit(limit)
    if run_id is not None:
        query = query.where(Evaluation.run_id == run_id)
    return list(session.exec(query).all())


# --------------------------------------------------------------------------- files
def evaluation_dir(evaluation_id: int) -> Path:
    return get_settings().path("evaluations", str(evaluation_id))


def rows_file(digest: str) -> Path:
    """The evaluated rows as a dataset file of their own, named by their content."""
    return get_settings().path("evaluations", "rows") / f"{digest}.json"


def predictions_file(evaluation_id: int) -> Path:
    return evaluation_dir(evaluation_id) / "generated_predictions.jsonl"


def _rows_of(dataset: Dataset) -> Iterator[Any]:
    path = data_file(dataset)
    return _jsonl_rows(path) if dataset.file_kind == "jsonl" else _json_array_rows(path)


def _pick_rows(datasets: list[Dataset], indices: list[int]) -> list[Any]:
    """Rows of the datasets concatenated in order (as LLaMA-Factory merges them), by index."""
    wanted = {index: position for position, index in enumerate(indices)}
    picked: list[Any] = [None] * len(indices)
    offset = 0
    for dataset in datasets:
        for number, row in enumerate(_rows_of(dataset)):
            position = wanted.get(offset + number)
            if position is not None:
                picked[position] = row
        offset += dataset.row_count
    if any(row is None for row in picked):
        raise JobConflict("the datasets hold fewer rows than recorded: were they replaced?")
    return picked


def held_out_indices(total: int, val_size: float, seed: int) -> list[int]:
    """The rows LLaMA-Factory holds out: its own call (`Dataset.train_test_split(test_size, seed)`,
    data_utils.split_dataset) on as many rows, run in the training environment."""
    from workers import train_env

    try:
        answer = train_env.run_script("eval_split.py", {"rows": total, "val_size": val_size, "seed": seed},
                                      timeout_s=120, what="working out the run's held-out split")
        return [int(i) for i in answer["test"]]
    except (train_env.TrainEnvError, KeyError, TypeError, ValueError) as error:
        raise JobError(f"could not work out the run's held-out split in the training environment: {error}",
                       status_code=503) from None


# --------------------------------------------------------------------------- create
def run_training_args(run: Run) -> dict[str, Any]:
    """The run's frozen training YAML, as a dict ({} when unreadable)."""
    try:
        args = yaml.safe_load(run.train_yaml or "") or {}
    except yaml.YAMLError:
        args = {}
    return args if isinstance(args, dict) else {}


def base_model_of(session: Session, run: Run) -> ModelEntry:
    """The registered model a run trained on (its adapters are evaluated and merged against it)."""
    model_path = str((run.lineage.get("model") or {}).get("path") or run_training_args(run).get("model_name_or_path")
                     or "")
    model = session.exec(select(ModelEntry).where(ModelEntry.path == model_path)).first()
    if model is None:
        raise JobConflict(f"run {run.id}'s base model ({model_path}) is no longer registered")
    return model


def adapter_manifest(session: Session, run: Run, checkpoint: str | None) -> ArtifactManifest:
    """The stored adapter an evaluation or an export of a finished run works on: its final adapter
    (`checkpoint` None, succeeded runs only) or one of its stored checkpoints."""
    status = RunStatus(run.status)
    if status.is_active():
        raise JobConflict(f"run {run.id} is {status.value}: wait until it has finished", field="checkpoint")
    stored = {a.name for a in artifact_service.list_artifacts(session, run.id)}
    known = ", ".join(sorted(n for n in stored if CHECKPOINT_PATTERN.match(n))) or "none"
    if checkpoint is None:
        if status != RunStatus.succeeded or ADAPTER_ARTIFACT not in stored:
            raise JobConflict(f"run {run.id} ({status.value}) has no stored final adapter; pick one of its stored "
                              f"checkpoints (stored: {known})", field="checkpoint")
        return artifact_service.get_manifest(session, run.id, ADAPTER_ARTIFACT)
    if not CHECKPOINT_PATTERN.match(checkpoint) or checkpoint not in stored:
        raise JobNotFound(f"run {run.id} has no stored checkpoint {checkpoint!r} (stored: {known})")
    return artifact_service.get_manifest(session, run.id, checkpoint)


def _check_limits(backend: str, max_rows: int, max_new_tokens: int) -> None:
    if backend not in BACKENDS:
        raise JobError(f"backend must be one of {', '.join(BACKENDS)}")
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise JobError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}")
    if not 1 <= max_new_tokens <= 4096:
        raise JobError("max_new_tokens must be between 1 and 4096")


def _rows_for_dataset(session: Session, dataset_id: int, formatting: str | None,
                      columns: dict[str, Any] | None, max_rows: int) -> tuple[Dataset, list[int], list[Any]]:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise JobNotFound(f"dataset {dataset_id} not found")
    if formatting is not None and (dataset.formatting != formatting or (columns is not None and dataset.columns != columns)):
        raise JobError(
            f"dataset {dataset.name} is {dataset.formatting} with columns {dataset.columns}; the run trained on "
            f"{formatting} with columns {columns}: evaluate it on a dataset of the same format"
        )
    indices = list(range(min(dataset.row_count, max_rows)))
    return dataset, indices, _pick_rows([dataset], indices)


def dataset_choices(session: Session, run: Run) -> list[Dataset]:
    """Registered datasets a run can be evaluated on: of the format it trained on."""
    trained = [session.get(Dataset, entry["id"]) for entry in run.lineage.get("datasets", [])]
    formats = {(d.formatting, json.dumps(d.columns, sort_keys=True)) for d in trained if d is not None}
    return [d for d in session.exec(select(Dataset).order_by(col(Dataset.id))).all()
            if not formats or (d.formatting, json.dumps(d.columns, sort_keys=True)) in formats]


def _store_rows(rows: list[Any], formatting: str, columns: dict[str, Any]) -> str:
    body = json.dumps(rows, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(json.dumps([formatting, columns], sort_keys=True).encode() + b"\0"
                            + body.encode()).hexdigest()
    path = rows_file(digest)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        partial.write_text(body, encoding="utf-8")
        partial.replace(path)
    return digest


def _base_evaluation(session: Session, template: Evaluation) -> Evaluation:
    """The base model's evaluation of the same rows: reused when one exists, else queued."""
    existing = session.exec(
        select(Evaluation).where(
            col(Evaluation.run_id).is_(None), Evaluation.model_path == template.model_path,
            Evaluation.model_fingerprint == template.model_fingerprint, Evaluation.backend == template.backend,
            Evaluation.rows_digest == template.rows_digest, Evaluation.template == template.template,
            Evaluation.cutoff_len == template.cutoff_len, Evaluation.max_new_tokens == template.max_new_tokens,
            col(Evaluation.status).in_(REUSABLE),
        ).order_by(col(Evaluation.status) == E.succeeded, col(Evaluation.id))
    ).all()
    if existing:
        return existing[-1]  # a succeeded one first, else the oldest still going
    base = Evaluation(**template.model_dump(exclude={"id", "run_id", "checkpoint", "adapter_digest",
                                                     "base_evaluation_id", "created_at"}))
    session.add(base)
    session.flush()
    return base


def create_for_run(session: Session, run_id: int, *, checkpoint: str | None = None, dataset_id: int | None = None,
                   backend: str = "llamafactory", max_rows: int = 200, max_new_tokens: int = 64,
                   gpus: int | None = None) -> Evaluation:
    """Queue the evaluation of a run's adapter (final or `checkpoint`), and the base model's of the
    same rows unless one is already there."""
    _check_limits(backend, max_rows, max_new_tokens)
    run = session.get(Run, run_id)
    if run is None:
        raise JobNotFound(f"run {run_id} not found")
    manifest = adapter_manifest(session, run, checkpoint or None)
    args = run_training_args(run)
    model = base_model_of(session, run)
    model_path = model.path
    trained_on = [session.get(Dataset, entry["id"]) for entry in run.lineage.get("datasets", [])]
    present = [d for d in trained_on if d is not None]
    formats = {(d.formatting, json.dumps(d.columns, sort_keys=True)) for d in present}
    formatting, columns = (present[0].formatting, present[0].columns) if len(formats) == 1 else (None, None)
    if dataset_id is not None:
        dataset, indices, rows = _rows_for_dataset(session, dataset_id, formatting, columns, max_rows)
        source, formatting, columns = "dataset", dataset.formatting, dataset.columns
    else:
        val_size = float(args.get("val_size") or 0)
        if val_size <= 1e-6:
            raise JobConflict(f"run {run.id} held out no rows (val_size is 0): evaluate it on a registered "
                                     "dataset (dataset_id)")
        if any(d is None for d in trained_on):
            raise JobConflict(f"a dataset run {run.id} trained on was deleted: its held-out rows are gone")
        if formatting is None:
            raise JobConflict(f"run {run.id} trained on datasets of different formats: evaluate it on one "
                                     "registered dataset (dataset_id)")
        total = sum(entry["rows"] for entry in run.lineage["datasets"])
        indices = held_out_indices(total, val_size, int(args.get("seed", 42)))[:max_rows]
        rows = _pick_rows(trained_on, indices)
        source = "split"
    digest = _store_rows(rows, formatting, columns or {})
    evaluation = Evaluation(
        run_id=run.id, checkpoint=checkpoint or None, adapter_digest=manifest.digest, model_path=model_path,
        model_fingerprint=model.fingerprint, template=str(args.get("template") or model.suggested_template or ""),
        cutoff_len=int(args.get("cutoff_len") or 2048), backend=backend, dataset_id=dataset_id, source=source,
        formatting=formatting, row_indices=indices, rows_digest=digest, max_rows=max_rows,
        max_new_tokens=max_new_tokens, gpus_requested=min(1, run.gpus_requested if gpus is None else gpus),
    )
    evaluation.base_evaluation_id = _base_evaluation(session, evaluation).id
    session.add(evaluation)
    session.commit()
    session.refresh(evaluation)
    kick_scheduler()
    return evaluation


def create_for_model(session: Session, model_id: int, *, dataset_id: int, backend: str = "llamafactory",
                     max_rows: int = 200, max_new_tokens: int = 64, template: str | None = None,
                     cutoff_len: int = 2048, gpus: int = 0) -> Evaluation:
    """A base model alone on a registered dataset (shared with the adapters evaluated on it)."""
    _check_limits(backend, max_rows, max_new_tokens)
    model = session.get(ModelEntry, model_id)
    if model is None:
        raise JobNotFound(f"model {model_id} not found")
    template = template or model.suggested_template
    if not template:
        raise JobError(f"model {model.name} suggests no chat template: name one (template)")
    dataset, indices, rows = _rows_for_dataset(session, dataset_id, None, None, max_rows)
    digest = _store_rows(rows, dataset.formatting, dataset.columns)
    wanted = Evaluation(
        model_path=model.path, model_fingerprint=model.fingerprint, template=template, cutoff_len=cutoff_len,
        backend=backend, dataset_id=dataset.id, source="dataset", formatting=dataset.formatting,
        row_indices=indices, rows_digest=digest, max_rows=max_rows, max_new_tokens=max_new_tokens,
        gpus_requested=min(1, gpus),
    )
    base = _base_evaluation(session, wanted)
    session.commit()
    session.refresh(base)
    kick_scheduler()
    return base


# --------------------------------------------------------------------------- the worker channel
def claim(session: Session, evaluation_id: int, request: EvalClaim) -> EvalSpec:
    evaluation = _jobs.claim(session, evaluation_id, request)
    manifest = _jobs.claimed_adapter(session, evaluation) if evaluation.run_id is not None else None
    dataset = session.get(Dataset, evaluation.dataset_id) if evaluation.dataset_id else None
    columns = dataset.columns if dataset is not None else _split_columns(session, evaluation)
    settings = get_settings()
    return EvalSpec(
        evaluation_id=evaluation.id, backend=evaluation.backend, base_model_path=evaluation.model_path,
        template=evaluation.template, adapter=manifest, dataset_name="eval_rows",
        dataset_info_entry=dataset_info_entry({"formatting": evaluation.formatting, "columns": columns},
                                              file_name="rows.json"),
        rows_url=f"/internal/v1/evaluations/{evaluation.id}/rows.json", rows=len(evaluation.row_indices),
        cutoff_len=evaluation.cutoff_len, max_new_tokens=evaluation.max_new_tokens,
        batch_size=EVAL_BATCH_SIZE,
        gpu_ids=evaluation.gpu_ids, max_lora_rank=settings.serve_max_lora_rank,
        max_model_len=settings.serve_max_model_len,
    )


def _split_columns(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    run = session.get(Run, evaluation.run_id) if evaluation.run_id else None
    for entry in (run.lineage.get("datasets", []) if run else []):
        dataset = session.get(Dataset, entry["id"])
        if dataset is not None:
            return dataset.columns
    return {}


def rows_path(session: Session, evaluation_id: int) -> Path:
    evaluation = get_evaluation(session, evaluation_id)
    path = rows_file(evaluation.rows_digest)
    if not path.is_file():
        raise JobNotFound(f"evaluation {evaluation_id}'s rows are gone")
    return path


def store_predictions(session: Session, evaluation_id: int, worker_id: str, source: Any) -> Path:
    _jobs.claimed_by(session, evaluation_id, worker_id)
    target = predictions_file(evaluation_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with partial.open("wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    partial.replace(target)
    return target


def finish(session: Session, evaluation_id: int, report: EvalFinish) -> Evaluation:
    outcome, reason = _jobs.reported_outcome(get_evaluation(session, evaluation_id), report.outcome, report.reason)
    metrics = {name: float(report.metrics[name]) for name in EVAL_METRICS if name in report.metrics}
    if outcome == E.succeeded and (len(metrics) != len(EVAL_METRICS) or not predictions_file(evaluation_id).is_file()):
        outcome, reason = E.failed, f"the worker reported success without all of {EVAL_METRICS} and the predictions"
    return _jobs.finish(session, evaluation_id, report.worker_id, outcome, {
        "status_reason": reason, "metrics": metrics, "rows_evaluated": report.rows, "generate_s": report.generate_s,
        "elapsed_s": report.elapsed_s, "versions": report.versions})


# --------------------------------------------------------------------------- reading
def _base_of(session: Session, evaluation: Evaluation) -> Evaluation | None:
    return session.get(Evaluation, evaluation.base_evaluation_id) if evaluation.base_evaluation_id else None


def public(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    base = _base_of(session, evaluation)
    data = evaluation.model_dump(mode="json", exclude={"dispatch_id", "worker_instance"})
    data["rows"] = len(evaluation.row_indices)
    data["rows_per_s"] = (evaluation.rows_evaluated / evaluation.generate_s
                          if evaluation.generate_s else None)
    data["kind"] = "base" if evaluation.run_id is None else "adapter"
    data["base"] = None if base is None else {"id": base.id, "status": base.status.value, "metrics": base.metrics}
    data["delta"] = ({name: evaluation.metrics[name] - base.metrics[name] for name in EVAL_METRICS
                      if name in evaluation.metrics and name in base.metrics} if base is not None else {})
    return data


def _predictions(evaluation_id: int) -> list[dict[str, Any]]:
    path = predictions_file(evaluation_id)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def merged_rows(session: Session, evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per evaluated row: its prompt, reference, and the base model's and the adapter's
    outputs (None where that evaluation has not finished)."""
    base = _base_of(session, evaluation)
    own = _predictions(evaluation.id)
    if evaluation.run_id is None:
        base_rows, adapter_rows = own, []
    else:
        base_rows, adapter_rows = (_predictions(base.id) if base else []), own
    merged = []
    for position, index in enumerate(evaluation.row_indices):
        source = adapter_rows[position] if position < len(adapter_rows) else (
            base_rows[position] if position < len(base_rows) else {})
        merged.append({
            "index": index, "prompt": source.get("prompt"), "reference": source.get("label"),
            "base_output": base_rows[position]["predict"] if position < len(base_rows) else None,
            "adapter_output": adapter_rows[position]["predict"] if position < len(adapter_rows) else None,
        })
    return merged


def page_rows(session: Session, evaluation_id: int, *, offset: int = 0, limit: int = 50,
              q: str | None = None) -> dict[str, Any]:
    rows = merged_rows(session, get_evaluation(session, evaluation_id))
    if q:
        needle = q.casefold()
        rows = [row for row in rows if any(needle in (value or "").casefold() for key, value in row.items()
                                           if key != "index")]
    return {"total": len(rows), "offset": offset, "rows": rows[offset:offset + limit]}


def latest_succeeded(session: Session, run_id: int, checkpoint: str | None) -> Evaluation | None:
    return session.exec(select(Evaluation).where(
        Evaluation.run_id == run_id, Evaluation.checkpoint == checkpoint if checkpoint else
        col(Evaluation.checkpoint).is_(None), Evaluation.status == E.succeeded,
    ).order_by(col(Evaluation.id).desc())).first()


def promotion_problem(session: Session, run_id: int, checkpoint: str | None, metric: str | None = None) -> str | None:
    """Why deploying this adapter is not a promotion: its latest evaluation scores below the base
    model's on the same rows on `metric` (TUNEBOARD's default: rouge-l). None when it does not."""
    metric = metric or "rouge-l"
    evaluation = latest_succeeded(session, run_id, checkpoint)
    if evaluation is None:
        return None
    base = _base_of(session, evaluation)
    if base is None or base.status != E.succeeded or metric not in base.metrics or metric not in evaluation.metrics:
        return None
    if evaluation.metrics[metric] < base.metrics[metric]:
        return (f"{checkpoint or 'the final adapter'} of run {run_id} scores {evaluation.metrics[metric]:.4g} {metric} "
                f"in evaluation {evaluation.id}, below the base model's {base.metrics[metric]:.4g} on the same rows")
    return None


def best_checkpoint(session: Session, run_id: int, metric: str = "eval_loss") -> dict[str, Any] | None:
    """The run's best stored checkpoint: the lowest eval_loss (the retention rule's own choice), or
    the highest score of `metric` among the checkpoints' latest succeeded evaluations."""
    checkpoints = [a for a in artifact_service.list_artifacts(session, run_id) if a.name != ADAPTER_ARTIFACT]
    if metric == "eval_loss":
        best = artifact_service._best_checkpoint(session, checkpoints)
        return None if best is None else {"name": best.name, "step": best.step, "metric": "eval_loss"}
    if metric not in EVAL_METRICS:
        raise JobError(f"metric must be eval_loss or one of {', '.join(EVAL_METRICS)}")
    scored = []
    for checkpoint in checkpoints:
        evaluation = latest_succeeded(session, run_id, checkpoint.name)
        if evaluation is not None and metric in evaluation.metrics:
            scored.append((evaluation.metrics[metric], checkpoint.step or 0, checkpoint, evaluation))
    if not scored:
        return None
    value, _step, checkpoint, evaluation = max(scored, key=lambda item: (item[0], -item[1]))
    return {"name": checkpoint.name, "step": checkpoint.step, "metric": metric, "value": value,
            "evaluation_id": evaluation.id}
