"""Exports: merge a run's adapter (final or a stored checkpoint) into its base model with
`llamafactory-cli export` on a worker (a CPU training slot, scheduled like an evaluation); the
worker uploads the merged folder (safetensors shards of `export_size` GB, the tokenizer, and the
Ollama Modelfile LLaMA-Factory writes) as the run's artifact "export-N"; the panel then
materializes it under the first TUNEBOARD_MODEL_ROOTS folder and registers it as a model, so that
it can be served without a LoRA or fine-tuned again. Its lifecycle is app/services/jobs.py's."""

from __future__ import annotations

import logging
import re
from typing import Any

from sqlmodel import Session, col, select

from app.models import JobStatus, ModelEntry, ModelExport, Run
from app.services import artifacts as artifact_service
from app.services import evaluations as evaluation_service
from app.services import model_registry
from app.services.broker import kick_scheduler
from app.services.jobs import HOLDING, JobConflict, JobError, JobLifecycle, JobNotFound
from app.wire import EXPORT_TASK, ArtifactManifest, EvalClaim, ExportFinish, ExportSpec, ExportTask

log = logging.getLogger(__name__)

X = JobStatus


def _serve_waiting_deployments(session: Session, export_id: int) -> None:
    """A deployment waiting for this merge is served from it (or fails with it) now. Imported
    here: the deployments service starts exports itself."""
    from app.services.deployments import serve_merged

    serve_merged(session, get_export(session, export_id))


_jobs = JobLifecycle(ModelExport, "export", EXPORT_TASK,
                     lambda job_id, dispatch_id, gpu_ids: ExportTask(export_id=job_id, dispatch_id=dispatch_id,
                                                                     gpu_ids=gpu_ids),
                     on_finished=_serve_waiting_deployments)
get_export = _jobs.get
# What the scheduler calls (app/services/scheduler.py JOB_SERVICES).
holding, waiting, dispatch = _jobs.holding, _jobs.waiting, _jobs.dispatch
release_stale_dispatches, mark_lost = _jobs.release_stale_dispatches, _jobs.mark_lost
heartbeat, cancel = _jobs.heartbeat, _jobs.cancel


def artifact_name(export_id: int) -> str:
    return f"export-{export_id}"


def list_exports(session: Session, run_id: int) -> list[ModelExport]:
    return list(session.exec(select(ModelExport).where(ModelExport.run_id == run_id)
                             .order_by(col(ModelExport.id).desc())).all())


def public(export: ModelExport) -> dict[str, Any]:
    return export.model_dump(mode="json", exclude={"dispatch_id"})


# --------------------------------------------------------------------------- create
def create(session: Session, run_id: int, *, checkpoint: str | None = None, export_size: int = 5) -> ModelExport:
    if not 1 <= export_size <= 100:
        raise JobError("export_size (the shard size in GB) must be between 1 and 100")
    run = session.get(Run, run_id)
    if run is None:
        raise JobNotFound(f"run {run_id} not found")
    manifest = evaluation_service.adapter_manifest(session, run, checkpoint or None)
    running = session.exec(select(ModelExport).where(
        ModelExport.run_id == run_id, col(ModelExport.status).in_(HOLDING),
        ModelExport.adapter_digest == manifest.digest)).first()
    if running is not None:
        raise JobConflict(f"export {running.id} of this adapter is {running.status.value}: wait for it or "
                             "cancel it")
    args = evaluation_service.run_training_args(run)
    model_path = evaluation_service.base_model_of(session, run).path
    export = ModelExport(run_id=run.id, checkpoint=checkpoint or None, adapter_digest=manifest.digest,
                         model_path=model_path, template=str(args.get("template") or ""), export_size=export_size)
    session.add(export)
    session.commit()
    session.refresh(export)
    kick_scheduler()
    return export


# --------------------------------------------------------------------------- the worker channel
def claim(session: Session, export_id: int, request: EvalClaim) -> ExportSpec:
    export = _jobs.claim(session, export_id, request)
    manifest = _jobs.claimed_adapter(session, export)
    run = session.get(Run, export.run_id)
    return ExportSpec(export_id=export.id, run_id=export.run_id, attempt=run.attempt,
                      artifact_name=artifact_name(export.id), base_model_path=export.model_path,
                      template=export.template, adapter=manifest, export_size=export.export_size)


def _free_model_name(session: Session, wanted: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted).strip("-") or "model"
    name, counter = base, 1
    while session.exec(select(ModelEntry).where(ModelEntry.name == name)).first() is not None:
        counter += 1
        name = f"{base}-{counter}"
    return name


def register_stored_model(session: Session, manifest: ArtifactManifest, wanted_name: str) -> ModelEntry:
    """A whole model in the artifact store (a merged export, a full fine-tune's output) put under the
    first model root, in a folder named by its content, and registered as a model (the one already
    registered there, for the same content again)."""
    roots = model_registry.model_roots()
    if not roots:
        raise JobConflict("no TUNEBOARD_MODEL_ROOTS folder to put the model in")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted_name).strip("-") or "model"
    folder = roots[0] / "exports" / f"{name}-{manifest.digest[:12]}"
    existing = session.exec(select(ModelEntry).where(ModelEntry.path == str(folder.resolve()))).first()
    if existing is not None:
        return existing
    artifact_service.materialize(manifest, folder)
    return model_registry.add_model(session, str(folder), _free_model_name(session, name))


def finish(session: Session, export_id: int, report: ExportFinish) -> ModelExport:
    export = (_jobs.claimed_by(session, export_id, report.worker_id) if report.outcome == "succeeded"
              else get_export(session, export_id))
    outcome, reason = _jobs.reported_outcome(export, report.outcome, report.reason)
    values: dict[str, Any] = {}
    if outcome == X.succeeded:
        try:
            if not report.uploaded:
                raise JobConflict("the worker did not upload the merged model")
            manifest = artifact_service.get_manifest(session, export.run_id, artifact_name(export_id))
            if not any(f.path.endswith(".safetensors") for f in manifest.files):
                raise JobConflict("the merged model holds no safetensors file")
            run = session.get(Run, export.run_id)
            entry = register_stored_model(session, manifest, f"{run.name}-{export.checkpoint or 'final'}-merged")
            values = {"model_id": entry.id, "size": manifest.size}
        except (artifact_service.ArtifactError, model_registry.ModelError, JobError, OSError) as error:
            outcome, reason = X.failed, f"the merged model could not be registered: {getattr(error, 'detail', error)}"
    return _jobs.finish(session, export_id, report.worker_id, outcome,
                        {"status_reason": reason, "elapsed_s": report.elapsed_s, **values})


def merged_manifest(session: Session, export_id: int) -> ArtifactManifest:
    export = get_export(session, export_id)
    if export.status != X.succeeded:
        raise JobConflict(f"export {export_id} is {export.status.value}: nothing to download yet")
    try:
        return artifact_service.get_manifest(session, export.run_id, artifact_name(export_id))
    except artifact_service.ArtifactError:
        raise JobNotFound(f"export {export_id}'s merged model is no longer in the store") from None
