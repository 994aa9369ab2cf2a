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
GPUs on a worker that holds the model, like a run; each status change is one conditional UPDATE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.models import Dataset, Evaluation, EvaluationStatus, ModelEntry, Run, RunStatus
from app.models.base import as_utc, utcnow
from app.services import artifacts as artifact_service
from app.services.broker import kick_scheduler, send_to_workers
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
    EvalHeartbeat,
    EvalSpec,
    EvalTask,
)

log = logging.getLogger(__name__)

E = EvaluationStatus
TRANSITIONS: dict[EvaluationStatus, frozenset[EvaluationStatus]] = {
    E.queued: frozenset({E.starting, E.cancelled, E.failed}),
    E.starting: frozenset({E.running, E.succeeded, E.failed, E.cancelled, E.lost}),
    E.running: frozenset({E.succeeded, E.failed, E.cancelled, E.lost}),
    E.succeeded: frozenset(),
    E.failed: frozenset(),
    E.cancelled: frozenset(),
    E.lost: frozenset(),
}
CLAIMED = (E.starting, E.running)
HOLDING = (E.queued, E.starting, E.running)
# A base evaluation in one of these is reused by a new evaluation of the same rows.
REUSABLE = (E.queued, E.starting, E.running, E.succeeded)
BACKENDS = ("llamafactory", "vllm")
MAX_ROWS_LIMIT = 100_000
REASON_MAX_CHARS = 8000
# Rows per generation batch (per_device_eval_batch_size; vLLM batches on its own).
EVAL_BATCH_SIZE = 8


class EvaluationError(Exception):
    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code


class EvaluationNotFound(EvaluationError):
    status_code = 404


class EvaluationConflict(EvaluationError):
    status_code = 409


# --------------------------------------------------------------------------- the state machine
def _update(*conditions: Any) -> Any:
    return update(Evaluation).where(*conditions).execution_options(synchronize_session=False)


def _transition(session: Session, evaluation_id: int, to: EvaluationStatus, *,
                allowed_from: Iterable[EvaluationStatus] | None = None, extra_where: Iterable[Any] = (),
                values: dict[str, Any] | None = None) -> bool:
    """One conditional UPDATE; False if the row was not in a status that may reach `to`."""
    sources = {s for s, targets in TRANSITIONS.items() if to in targets}
    if allowed_from is not None:
        sources &= set(allowed_from)
    result = session.exec(_update(Evaluation.id == evaluation_id, col(Evaluation.status).in_(sources),
                                  *extra_where).values(status=to, **(values or {})))
    if result.rowcount != 1:
        session.rollback()
        return False
    session.commit()
    return True


def get_evaluation(session: Session, evaluation_id: int) -> Evaluation:
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise EvaluationNotFound(f"evaluation {evaluation_id} not found")
    session.refresh(evaluation)
    return evaluation


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
        raise EvaluationConflict("the datasets hold fewer rows than recorded: were they replaced?")
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
        raise EvaluationError(f"could not work out the run's held-out split in the training environment: "
                              f"{error}", 503) from None


# --------------------------------------------------------------------------- create
def _run_args(run: Run) -> dict[str, Any]:
    from app.services.deployments import run_training_args

    return run_training_args(run)


def _adapter_manifest(session: Session, run: Run, checkpoint: str | None) -> ArtifactManifest:
    status = RunStatus(run.status)
    if status.is_active():
        raise EvaluationConflict(f"run {run.id} is {status.value}: evaluate it once it has finished")
    stored = {a.name for a in artifact_service.list_artifacts(session, run.id)}
    if checkpoint is None:
        if status != RunStatus.succeeded or ADAPTER_ARTIFACT not in stored:
            known = ", ".join(sorted(n for n in stored if n != ADAPTER_ARTIFACT)) or "none"
            raise EvaluationConflict(f"run {run.id} ({status.value}) has no stored final adapter to evaluate; "
                                     f"pick one of its stored checkpoints (stored: {known})")
        return artifact_service.get_manifest(session, run.id, ADAPTER_ARTIFACT)
    if not CHECKPOINT_PATTERN.match(checkpoint) or checkpoint not in stored:
        known = ", ".join(sorted(n for n in stored if n != ADAPTER_ARTIFACT)) or "none"
        raise EvaluationNotFound(f"run {run.id} has no stored checkpoint {checkpoint!r} (stored: {known})")
    return artifact_service.get_manifest(session, run.id, checkpoint)


def _check_limits(backend: str, max_rows: int, max_new_tokens: int) -> None:
    if backend not in BACKENDS:
        raise EvaluationError(f"backend must be one of {', '.join(BACKENDS)}")
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise EvaluationError(f"max_rows must be between 1 and {MAX_ROWS_LIMIT}")
    if not 1 <= max_new_tokens <= 4096:
        raise EvaluationError("max_new_tokens must be between 1 and 4096")


def _rows_for_dataset(session: Session, dataset_id: int, formatting: str | None,
                      columns: dict[str, Any] | None, max_rows: int) -> tuple[Dataset, list[int], list[Any]]:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise EvaluationNotFound(f"dataset {dataset_id} not found")
    if formatting is not None and (dataset.formatting != formatting or (columns is not None and dataset.columns != columns)):
        raise EvaluationError(
            f"dataset {dataset.name} is {dataset.formatting} with columns {dataset.columns}; the run trained on "
            f"{formatting} with columns {columns}: evaluate it on a dataset of the same format"
        )
    indices = list(range(min(dataset.row_count, max_rows)))
    return dataset, indices, _pick_rows([dataset], indices)


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
        raise EvaluationNotFound(f"run {run_id} not found")
    manifest = _adapter_manifest(session, run, checkpoint or None)
    args = _run_args(run)
    model_path = str((run.lineage.get("model") or {}).get("path") or args.get("model_name_or_path") or "")
    model = session.exec(select(ModelEntry).where(ModelEntry.path == model_path)).first()
    if model is None:
        raise EvaluationConflict(f"run {run.id}'s base model ({model_path}) is no longer registered")
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
            raise EvaluationConflict(f"run {run.id} held out no rows (val_size is 0): evaluate it on a registered "
                                     "dataset (dataset_id)")
        if any(d is None for d in trained_on):
            raise EvaluationConflict(f"a dataset run {run.id} trained on was deleted: its held-out rows are gone")
        if formatting is None:
            raise EvaluationConflict(f"run {run.id} trained on datasets of different formats: evaluate it on one "
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
        raise EvaluationNotFound(f"model {model_id} not found")
    template = template or model.suggested_template
    if not template:
        raise EvaluationError(f"model {model.name} suggests no chat template: name one (template)")
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


# --------------------------------------------------------------------------- scheduling
def holding(session: Session) -> list[Evaluation]:
    """Evaluations that hold part of a worker (dispatched, starting or running)."""
    return list(session.exec(select(Evaluation).where(
        col(Evaluation.status).in_(HOLDING), col(Evaluation.dispatched_worker_id).is_not(None))).all())


def waiting(session: Session) -> list[Evaluation]:
    return list(session.exec(select(Evaluation).where(
        Evaluation.status == E.queued, col(Evaluation.dispatch_id).is_(None)).order_by(col(Evaluation.id))).all())


def dispatch(session: Session, choices: list[tuple[Evaluation, str, list[int]]]) -> int:
    """Hand each queued evaluation to its worker, then send the tasks; a refused send is taken back."""
    sent = []
    now = utcnow()
    for evaluation, worker_id, gpu_ids in choices:
        dispatch_id = uuid.uuid4().hex
        result = session.exec(_update(Evaluation.id == evaluation.id, Evaluation.status == E.queued,
                                      col(Evaluation.dispatch_id).is_(None))
                              .values(dispatch_id=dispatch_id, dispatched_worker_id=worker_id, dispatched_at=now,
                                      gpu_ids=gpu_ids))
        if result.rowcount == 1:
            sent.append((evaluation.id, worker_id, dispatch_id, gpu_ids))
    session.commit()
    errors = send_to_workers([(worker_id, EVAL_TASK, EvalTask(evaluation_id=eid, dispatch_id=did, gpu_ids=gpus))
                              for eid, worker_id, did, gpus in sent])
    for (eid, worker_id, did, _gpus), error in zip(sent, errors, strict=True):
        if error is not None:
            log.error("evaluation %s: could not send its task to %s: %s", eid, worker_id, error)
            release_dispatch(session, eid, did, f"the broker refused the task: {error}")
    return sum(error is None for error in errors)


def release_dispatch(session: Session, evaluation_id: int, dispatch_id: str, reason: str) -> bool:
    result = session.exec(_update(Evaluation.id == evaluation_id, Evaluation.status == E.queued,
                                  Evaluation.dispatch_id == dispatch_id)
                          .values(dispatch_id=None, dispatched_worker_id=None, dispatched_at=None, gpu_ids=[]))
    if result.rowcount != 1:
        session.rollback()
        return False
    session.commit()
    log.warning("evaluation %s: dispatch released: %s", evaluation_id, reason)
    return True


def release_stale_dispatches(session: Session, online: set[str], now: datetime) -> None:
    cutoff = now - timedelta(seconds=get_settings().dispatch_timeout_s)
    for evaluation in session.exec(select(Evaluation).where(
            Evaluation.status == E.queued, col(Evaluation.dispatch_id).is_not(None))).all():
        if evaluation.dispatched_worker_id not in online:
            release_dispatch(session, evaluation.id, evaluation.dispatch_id, "its worker went offline")
        elif evaluation.dispatched_at is not None and as_utc(evaluation.dispatched_at) < cutoff:
            release_dispatch(session, evaluation.id, evaluation.dispatch_id, "not claimed in time")


def mark_lost(session: Session, now: datetime | None = None) -> list[int]:
    """Claimed evaluations whose worker has been silent past the heartbeat timeout."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
    lost = []
    for evaluation in session.exec(select(Evaluation).where(
            col(Evaluation.status).in_(CLAIMED), col(Evaluation.heartbeat_at) < cutoff)).all():
        reason = f"worker {evaluation.worker_id} went silent"
        if _transition(session, evaluation.id, E.lost, allowed_from=CLAIMED,
                       extra_where=[col(Evaluation.heartbeat_at) < cutoff],
                       values={"status_reason": reason, "finished_at": now}):
            lost.append(evaluation.id)
    if lost:
        kick_scheduler()
    return lost


# --------------------------------------------------------------------------- the worker channel
def claim(session: Session, evaluation_id: int, request: EvalClaim) -> EvalSpec:
    now = utcnow()
    claimed = _transition(
        session, evaluation_id, E.starting, allowed_from=[E.queued],
        extra_where=[Evaluation.dispatch_id == request.dispatch_id,
                     Evaluation.dispatched_worker_id == request.worker_id],
        values={"worker_id": request.worker_id, "worker_instance": request.instance_id or None,
                "started_at": now, "heartbeat_at": now},
    )
    evaluation = get_evaluation(session, evaluation_id)
    if not claimed:
        raise EvaluationConflict(f"evaluation {evaluation_id} is not claimable by {request.worker_id} "
                                 f"({evaluation.status.value}, dispatched to {evaluation.dispatched_worker_id})")
    manifest = None
    if evaluation.run_id is not None:
        try:
            manifest = artifact_service.get_manifest(session, evaluation.run_id,
                                                     evaluation.checkpoint or ADAPTER_ARTIFACT)
        except artifact_service.ArtifactError:
            manifest = None
        if manifest is None or manifest.digest != evaluation.adapter_digest:
            reason = f"{evaluation.checkpoint or ADAPTER_ARTIFACT} of run {evaluation.run_id} was deleted or replaced"
            fail(session, evaluation, reason)
            raise EvaluationConflict(f"evaluation {evaluation_id}: {reason}")
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
        raise EvaluationNotFound(f"evaluation {evaluation_id}'s rows are gone")
    return path


def _claimed_by(session: Session, evaluation_id: int, worker_id: str) -> Evaluation:
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise EvaluationNotFound(f"evaluation {evaluation_id} not found (deleted)")
    session.refresh(evaluation)
    if evaluation.status not in CLAIMED or evaluation.worker_id != worker_id:
        raise EvaluationConflict(f"evaluation {evaluation_id} is {evaluation.status.value} "
                                 f"(worker {evaluation.worker_id}): stop it")
    return evaluation


def heartbeat(session: Session, evaluation_id: int, report: EvalHeartbeat) -> bool:
    """A worker's beat; returns whether the user asked to cancel."""
    evaluation = _claimed_by(session, evaluation_id, report.worker_id)
    if report.status == "running" and evaluation.status == E.starting:
        _transition(session, evaluation_id, E.running, allowed_from=[E.starting])
    result = session.exec(_update(Evaluation.id == evaluation_id, col(Evaluation.status).in_(CLAIMED),
                                  Evaluation.worker_id == report.worker_id).values(heartbeat_at=utcnow()))
    if result.rowcount != 1:
        session.rollback()
        raise EvaluationConflict(f"evaluation {evaluation_id} is over: stop it")
    session.commit()
    return get_evaluation(session, evaluation_id).cancel_requested


def store_predictions(session: Session, evaluation_id: int, worker_id: str, source: Any) -> Path:
    _claimed_by(session, evaluation_id, worker_id)
    target = predictions_file(evaluation_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with partial.open("wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    partial.replace(target)
    return target


def fail(session: Session, evaluation: Evaluation, reason: str) -> bool:
    return _transition(session, evaluation.id, E.failed, values={"status_reason": reason, "finished_at": utcnow()})


def finish(session: Session, evaluation_id: int, report: EvalFinish) -> Evaluation:
    evaluation = get_evaluation(session, evaluation_id)
    outcome = E(report.outcome)
    if outcome == E.failed and evaluation.cancel_requested:
        outcome = E.cancelled
    reason = report.reason[-REASON_MAX_CHARS:]
    metrics = {name: float(report.metrics[name]) for name in EVAL_METRICS if name in report.metrics}
    if outcome == E.succeeded and (len(metrics) != len(EVAL_METRICS) or not predictions_file(evaluation_id).is_file()):
        outcome, reason = E.failed, f"the worker reported success without all of {EVAL_METRICS} and the predictions"
    if outcome == E.cancelled and not reason:
        reason = "cancelled by the user"
    finished = _transition(
        session, evaluation_id, outcome, allowed_from=CLAIMED, extra_where=[Evaluation.worker_id == report.worker_id],
        values={"status_reason": reason, "metrics": metrics, "rows_evaluated": report.rows,
                "generate_s": report.generate_s, "elapsed_s": report.elapsed_s, "versions": report.versions,
                "finished_at": utcnow()},
    )
    evaluation = get_evaluation(session, evaluation_id)
    if finished:
        kick_scheduler()
        return evaluation
    if evaluation.status == outcome:
        return evaluation  # the same finish, re-sent
    raise EvaluationConflict(f"evaluation {evaluation_id} cannot finish as {outcome.value}: it is "
                             f"{evaluation.status.value}")


# --------------------------------------------------------------------------- user actions
def cancel(session: Session, evaluation_id: int) -> Evaluation:
    evaluation = get_evaluation(session, evaluation_id)
    if evaluation.status.is_finished():
        raise EvaluationConflict(f"evaluation {evaluation_id} is already {evaluation.status.value}")
    if evaluation.status == E.queued and _transition(
            session, evaluation_id, E.cancelled, allowed_from=[E.queued],
            values={"status_reason": "cancelled before it started", "finished_at": utcnow()}):
        return get_evaluation(session, evaluation_id)
    session.exec(_update(Evaluation.id == evaluation_id, col(Evaluation.status).in_(CLAIMED))
                 .values(cancel_requested=True))
    session.commit()
    return get_evaluation(session, evaluation_id)


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
        raise EvaluationError(f"metric must be eval_loss or one of {', '.join(EVAL_METRICS)}")
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
