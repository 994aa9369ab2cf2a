"""Exports: merge a run's adapter (final or a stored checkpoint) into its base model with
`llamafactory-cli export` on a worker (a CPU training slot, scheduled like an evaluation); the
worker uploads the merged folder (safetensors shards of `export_size` GB, the tokenizer, and the
Ollama Modelfile LLaMA-Factory writes) as the run's artifact "export-N"; the panel then
materializes it under the first TUNEBOARD_MODEL_ROOTS folder and registers it as a model, so that
it can be served without a LoRA or fine-tuned again. Same state machine as an evaluation."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.models import ModelEntry, ModelExport, Run
from app.models.base import as_utc, utcnow
from app.models.export import ExportStatus
from app.services import artifacts as artifact_service
from app.services import evaluations as evaluation_service
from app.services import model_registry
from app.services.broker import kick_scheduler, send_to_workers
from app.settings import get_settings
from app.wire import ADAPTER_ARTIFACT, EXPORT_TASK, ArtifactManifest, EvalClaim, EvalHeartbeat, ExportFinish, ExportSpec, ExportTask

log = logging.getLogger(__name__)

X = ExportStatus
TRANSITIONS = evaluation_service.TRANSITIONS
CLAIMED = (X.starting, X.running)
HOLDING = (X.queued, X.starting, X.running)
ExportError = evaluation_service.EvaluationError
ExportNotFound = evaluation_service.EvaluationNotFound
ExportConflict = evaluation_service.EvaluationConflict


def artifact_name(export_id: int) -> str:
    return f"export-{export_id}"


def _update(*conditions: Any) -> Any:
    return update(ModelExport).where(*conditions).execution_options(synchronize_session=False)


def _transition(session: Session, export_id: int, to: ExportStatus, *, allowed_from=None, extra_where=(),
                values: dict[str, Any] | None = None) -> bool:
    sources = {s for s, targets in TRANSITIONS.items() if to in targets}
    if allowed_from is not None:
        sources &= set(allowed_from)
    result = session.exec(_update(ModelExport.id == export_id, col(ModelExport.status).in_(sources), *extra_where)
                          .values(status=to, **(values or {})))
    if result.rowcount != 1:
        session.rollback()
        return False
    session.commit()
    return True


def get_export(session: Session, export_id: int) -> ModelExport:
    export = session.get(ModelExport, export_id)
    if export is None:
        raise ExportNotFound(f"export {export_id} not found")
    session.refresh(export)
    return export


def public(export: ModelExport) -> dict[str, Any]:
    return export.model_dump(mode="json", exclude={"dispatch_id"})


# --------------------------------------------------------------------------- create
def create(session: Session, run_id: int, *, checkpoint: str | None = None, export_size: int = 5) -> ModelExport:
    if not 1 <= export_size <= 100:
        raise ExportError("export_size (the shard size in GB) must be between 1 and 100")
    run = session.get(Run, run_id)
    if run is None:
        raise ExportNotFound(f"run {run_id} not found")
    manifest = evaluation_service._adapter_manifest(session, run, checkpoint or None)
    running = session.exec(select(ModelExport).where(
        ModelExport.run_id == run_id, col(ModelExport.status).in_(HOLDING),
        ModelExport.adapter_digest == manifest.digest)).first()
    if running is not None:
        raise ExportConflict(f"export {running.id} of this adapter is {running.status.value}: wait for it or "
                             "cancel it")
    args = evaluation_service._run_args(run)
    model_path = str((run.lineage.get("model") or {}).get("path") or args.get("model_name_or_path") or "")
    if session.exec(select(ModelEntry).where(ModelEntry.path == model_path)).first() is None:
        raise ExportConflict(f"run {run.id}'s base model ({model_path}) is no longer registered")
    export = ModelExport(run_id=run.id, checkpoint=checkpoint or None, adapter_digest=manifest.digest,
                         model_path=model_path, template=str(args.get("template") or ""), export_size=export_size)
    session.add(export)
    session.commit()
    session.refresh(export)
    kick_scheduler()
    return export


def cancel(session: Session, export_id: int) -> ModelExport:
    export = get_export(session, export_id)
    if export.status.is_finished():
        raise ExportConflict(f"export {export_id} is already {export.status.value}")
    if export.status == X.queued and _transition(session, export_id, X.cancelled, allowed_from=[X.queued],
                                                 values={"status_reason": "cancelled before it started",
                                                         "finished_at": utcnow()}):
        return get_export(session, export_id)
    session.exec(_update(ModelExport.id == export_id, col(ModelExport.status).in_(CLAIMED)).values(cancel_requested=True))
    session.commit()
    return get_export(session, export_id)


# --------------------------------------------------------------------------- scheduling (as evaluations)
def holding(session: Session) -> list[ModelExport]:
    return list(session.exec(select(ModelExport).where(
        col(ModelExport.status).in_(HOLDING), col(ModelExport.dispatched_worker_id).is_not(None))).all())


def waiting(session: Session) -> list[ModelExport]:
    return list(session.exec(select(ModelExport).where(
        ModelExport.status == X.queued, col(ModelExport.dispatch_id).is_(None)).order_by(col(ModelExport.id))).all())


def dispatch(session: Session, choices: list[tuple[ModelExport, str, list[int]]]) -> int:
    sent = []
    now = utcnow()
    for export, worker_id, gpu_ids in choices:
        dispatch_id = uuid.uuid4().hex
        result = session.exec(_update(ModelExport.id == export.id, ModelExport.status == X.queued,
                                      col(ModelExport.dispatch_id).is_(None))
                              .values(dispatch_id=dispatch_id, dispatched_worker_id=worker_id, dispatched_at=now,
                                      gpu_ids=gpu_ids))
        if result.rowcount == 1:
            sent.append((export.id, worker_id, dispatch_id, gpu_ids))
    session.commit()
    errors = send_to_workers([(worker_id, EXPORT_TASK, ExportTask(export_id=xid, dispatch_id=did, gpu_ids=gpus))
                              for xid, worker_id, did, gpus in sent])
    for (xid, worker_id, did, _gpus), error in zip(sent, errors, strict=True):
        if error is not None:
            log.error("export %s: could not send its task to %s: %s", xid, worker_id, error)
            release_dispatch(session, xid, did)
    return sum(error is None for error in errors)


def release_dispatch(session: Session, export_id: int, dispatch_id: str) -> bool:
    result = session.exec(_update(ModelExport.id == export_id, ModelExport.status == X.queued,
                                  ModelExport.dispatch_id == dispatch_id)
                          .values(dispatch_id=None, dispatched_worker_id=None, dispatched_at=None, gpu_ids=[]))
    if result.rowcount != 1:
        session.rollback()
        return False
    session.commit()
    return True


def release_stale_dispatches(session: Session, online: set[str], now: datetime) -> None:
    cutoff = now - timedelta(seconds=get_settings().dispatch_timeout_s)
    for export in session.exec(select(ModelExport).where(
            ModelExport.status == X.queued, col(ModelExport.dispatch_id).is_not(None))).all():
        if export.dispatched_worker_id not in online or (
                export.dispatched_at is not None and as_utc(export.dispatched_at) < cutoff):
            release_dispatch(session, export.id, export.dispatch_id)


def mark_lost(session: Session, now: datetime | None = None) -> list[int]:
    now = now or utcnow()
    cutoff = now - timedelta(seconds=get_settings().heartbeat_timeout_s)
    lost = [export.id for export in session.exec(select(ModelExport).where(
        col(ModelExport.status).in_(CLAIMED), col(ModelExport.heartbeat_at) < cutoff)).all()
        if _transition(session, export.id, X.lost, allowed_from=CLAIMED,
                       extra_where=[col(ModelExport.heartbeat_at) < cutoff],
                       values={"status_reason": f"worker {export.worker_id} went silent", "finished_at": now})]
    if lost:
        kick_scheduler()
    return lost


# --------------------------------------------------------------------------- the worker channel
def claim(session: Session, export_id: int, request: EvalClaim) -> ExportSpec:
    now = utcnow()
    claimed = _transition(session, export_id, X.starting, allowed_from=[X.queued],
                          extra_where=[ModelExport.dispatch_id == request.dispatch_id,
                                       ModelExport.dispatched_worker_id == request.worker_id],
                          values={"worker_id": request.worker_id, "started_at": now, "heartbeat_at": now})
    export = get_export(session, export_id)
    if not claimed:
        raise ExportConflict(f"export {export_id} is not claimable by {request.worker_id} ({export.status.value})")
    run = session.get(Run, export.run_id)
    try:
        manifest = artifact_service.get_manifest(session, export.run_id, export.checkpoint or ADAPTER_ARTIFACT)
    except artifact_service.ArtifactError:
        manifest = None
    if run is None or manifest is None or manifest.digest != export.adapter_digest:
        reason = f"{export.checkpoint or ADAPTER_ARTIFACT} of run {export.run_id} was deleted or replaced"
        _fail(session, export_id, reason)
        raise ExportConflict(f"export {export_id}: {reason}")
    return ExportSpec(export_id=export.id, run_id=export.run_id, attempt=run.attempt,
                      artifact_name=artifact_name(export.id), base_model_path=export.model_path,
                      template=export.template, adapter=manifest, export_size=export.export_size)


def _claimed_by(session: Session, export_id: int, worker_id: str) -> ModelExport:
    export = session.get(ModelExport, export_id)
    if export is None:
        raise ExportNotFound(f"export {export_id} not found (deleted)")
    session.refresh(export)
    if export.status not in CLAIMED or export.worker_id != worker_id:
        raise ExportConflict(f"export {export_id} is {export.status.value} (worker {export.worker_id}): stop it")
    return export


def heartbeat(session: Session, export_id: int, report: EvalHeartbeat) -> bool:
    export = _claimed_by(session, export_id, report.worker_id)
    if report.status == "running" and export.status == X.starting:
        _transition(session, export_id, X.running, allowed_from=[X.starting])
    session.exec(_update(ModelExport.id == export_id, col(ModelExport.status).in_(CLAIMED))
                 .values(heartbeat_at=utcnow()))
    session.commit()
    return get_export(session, export_id).cancel_requested


def _fail(session: Session, export_id: int, reason: str) -> bool:
    return _transition(session, export_id, X.failed, values={"status_reason": reason, "finished_at": utcnow()})


def _model_name(session: Session, run: Run, export: ModelExport) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{run.name}-{export.checkpoint or 'final'}-merged").strip("-") or "merged"
    name, counter = base, 1
    while session.exec(select(ModelEntry).where(ModelEntry.name == name)).first() is not None:
        counter += 1
        name = f"{base}-{counter}"
    return name


def _register(session: Session, export: ModelExport, manifest: ArtifactManifest) -> ModelEntry:
    """The merged folder under the first model root (named by content), registered as a model."""
    run = session.get(Run, export.run_id)
    roots = model_registry.model_roots()
    if not roots:
        raise ExportConflict("no TUNEBOARD_MODEL_ROOTS folder to put the merged model in")
    folder = roots[0] / "exports" / f"{_model_name(session, run, export)}-{manifest.digest[:12]}"
    artifact_service.materialize(manifest, folder)
    return model_registry.add_model(session, str(folder), folder.name.rsplit("-", 1)[0])


def finish(session: Session, export_id: int, report: ExportFinish) -> ModelExport:
    export = _claimed_by(session, export_id, report.worker_id) if report.outcome == "succeeded" else get_export(session, export_id)
    outcome, reason, values = X(report.outcome), report.reason[-8000:], {}
    if outcome == X.failed and export.cancel_requested:
        outcome = X.cancelled
    if outcome == X.succeeded:
        try:
            if not report.uploaded:
                raise ExportConflict("the worker did not upload the merged model")
            manifest = artifact_service.get_manifest(session, export.run_id, artifact_name(export_id))
            if not any(f.path.endswith(".safetensors") for f in manifest.files):
                raise ExportConflict("the merged model holds no safetensors file")
            entry = _register(session, export, manifest)
            values = {"model_id": entry.id, "size": manifest.size}
        except (artifact_service.ArtifactError, model_registry.ModelError, evaluation_service.EvaluationError,
                OSError) as error:
            outcome, reason = X.failed, f"the merged model could not be registered: {getattr(error, 'detail', error)}"
    finished = _transition(session, export_id, outcome, allowed_from=CLAIMED,
                           extra_where=[ModelExport.worker_id == report.worker_id],
                           values={"status_reason": reason, "elapsed_s": report.elapsed_s, "finished_at": utcnow(),
                                   **values})
    export = get_export(session, export_id)
    if finished:
        kick_scheduler()
        return export
    if export.status == outcome:
        return export
    raise ExportConflict(f"export {export_id} cannot finish as {outcome.value}: it is {export.status.value}")


def merged_manifest(session: Session, export_id: int) -> ArtifactManifest:
    export = get_export(session, export_id)
    if export.status != X.succeeded:
        raise ExportConflict(f"export {export_id} is {export.status.value}: nothing to download yet")
    try:
        return artifact_service.get_manifest(session, export.run_id, artifact_name(export_id))
    except artifact_service.ArtifactError:
        raise ExportNotFound(f"export {export_id}'s merged model is no longer in the store") from None
