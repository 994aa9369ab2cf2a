"""Evaluations and exports: the JSON API under /api/v1, the evaluations of a run's page, and the worker
channel (claim, heartbeat, rows, predictions, finish). Thin: app/services/evaluations.py decides."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from app.db import SessionDep
from app.services import evaluations as service
from app.services import exports as export_service
from app.services.runs import stream_zip
from app.templating import render
from app.wire import EvalClaim, EvalFinish, EvalHeartbeat, EvalReply, EvalSpec, ExportFinish, ExportSpec

router = APIRouter(tags=["evaluations-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["evaluations"])
internal_router = APIRouter()


class RunEvaluationCreate(BaseModel):
    checkpoint: str | None = Field(default=None, max_length=200)
    dataset_id: int | None = None
    backend: Literal["llamafactory", "vllm"] = "llamafactory"
    max_rows: int = Field(default=200, ge=1, le=service.MAX_ROWS_LIMIT)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    gpus: int | None = Field(default=None, ge=0, le=1)


class ModelEvaluationCreate(BaseModel):
    model_id: int
    dataset_id: int
    backend: Literal["llamafactory", "vllm"] = "llamafactory"
    max_rows: int = Field(default=200, ge=1, le=service.MAX_ROWS_LIMIT)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    template: str | None = Field(default=None, max_length=100)
    cutoff_len: int = Field(default=2048, ge=1, le=1_048_576)
    gpus: int = Field(default=0, ge=0, le=1)


def _call(call):
    try:
        return call()
    except service.EvaluationError as error:
        raise HTTPException(error.status_code, error.detail) from None


# --------------------------------------------------------------------------- JSON API
@api_router.post("/runs/{run_id}/evaluations", status_code=201)
def evaluate_run(run_id: int, payload: RunEvaluationCreate, session: SessionDep) -> dict[str, Any]:
    """Evaluate a finished run's final adapter (`checkpoint` null) or a stored checkpoint on its
    held-out split (`dataset_id` null) or a registered dataset of its format."""
    evaluation = _call(lambda: service.create_for_run(
        session, run_id, checkpoint=payload.checkpoint, dataset_id=payload.dataset_id, backend=payload.backend,
        max_rows=payload.max_rows, max_new_tokens=payload.max_new_tokens, gpus=payload.gpus))
    return service.public(session, evaluation)


@api_router.get("/runs/{run_id}/evaluations")
def run_evaluations(run_id: int, session: SessionDep) -> list[dict[str, Any]]:
    return [service.public(session, e) for e in service.list_evaluations(session, run_id=run_id)]


@api_router.get("/runs/{run_id}/best-checkpoint")
def best_checkpoint(run_id: int, session: SessionDep, metric: str = "eval_loss") -> dict[str, Any]:
    """The best stored checkpoint by eval_loss (lowest) or an evaluation metric (highest)."""
    best = _call(lambda: service.best_checkpoint(session, run_id, metric))
    if best is None:
        raise HTTPException(404, f"run {run_id} has no stored checkpoint scored by {metric}")
    return best


@api_router.post("/evaluations", status_code=201)
def evaluate_model(payload: ModelEvaluationCreate, session: SessionDep) -> dict[str, Any]:
    """A base model alone on a registered dataset (reused by adapters evaluated on the same rows)."""
    evaluation = _call(lambda: service.create_for_model(
        session, payload.model_id, dataset_id=payload.dataset_id, backend=payload.backend,
        max_rows=payload.max_rows, max_new_tokens=payload.max_new_tokens, template=payload.template,
        cutoff_len=payload.cutoff_len, gpus=payload.gpus))
    return service.public(session, evaluation)


@api_router.get("/evaluations")
def list_evaluations(session: SessionDep, limit: int = Query(200, ge=1, le=1000)) -> list[dict[str, Any]]:
    return [service.public(session, e) for e in service.list_evaluations(session, limit=limit)]


@api_router.get("/evaluations/{evaluation_id}")
def get_evaluation(evaluation_id: int, session: SessionDep) -> dict[str, Any]:
    return service.public(session, _call(lambda: service.get_evaluation(session, evaluation_id)))


@api_router.post("/evaluations/{evaluation_id}/cancel")
def cancel_evaluation(evaluation_id: int, session: SessionDep) -> dict[str, Any]:
    return service.public(session, _call(lambda: service.cancel(session, evaluation_id)))


@api_router.get("/evaluations/{evaluation_id}/rows")
def evaluation_rows(evaluation_id: int, session: SessionDep, offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=1000), q: str | None = Query(None, max_length=500)) -> dict[str, Any]:
    """The generations, a page at a time: prompt, reference, base output, adapter output; `q`
    keeps the rows where any of them holds it (case-insensitive)."""
    return _call(lambda: service.page_rows(session, evaluation_id, offset=offset, limit=limit, q=q))


@api_router.get("/evaluations/{evaluation_id}/rows.jsonl")
def evaluation_rows_jsonl(evaluation_id: int, session: SessionDep) -> StreamingResponse:
    rows = _call(lambda: service.merged_rows(session, service.get_evaluation(session, evaluation_id)))

    def lines() -> Iterator[bytes]:
        for row in rows:
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="evaluation-{evaluation_id}.jsonl"'})


# --------------------------------------------------------------------------- page fragment
@router.get("/runs/{run_id}/evaluations")
def run_evaluations_fragment(request: Request, run_id: int, session: SessionDep):
    """The evaluations table of a run's page (templates/evaluations/_run_evaluations.html)."""
    evaluations = [service.public(session, e) for e in service.list_evaluations(session, run_id=run_id)]
    return render(request, "evaluations/_run_evaluations.html", {"run_id": run_id, "evaluations": evaluations})


# --------------------------------------------------------------------------- the worker channel
@internal_router.post("/evaluations/{evaluation_id}/claim")
def claim(evaluation_id: int, payload: EvalClaim, session: SessionDep) -> EvalSpec:
    return _call(lambda: service.claim(session, evaluation_id, payload))


@internal_router.get("/evaluations/{evaluation_id}/rows.json")
def rows_file(evaluation_id: int, session: SessionDep) -> FileResponse:
    return FileResponse(_call(lambda: service.rows_path(session, evaluation_id)), media_type="application/json")


@internal_router.post("/evaluations/{evaluation_id}/heartbeat")
def heartbeat(evaluation_id: int, payload: EvalHeartbeat, session: SessionDep) -> EvalReply:
    return EvalReply(cancel=_call(lambda: service.heartbeat(session, evaluation_id, payload)))


@internal_router.post("/evaluations/{evaluation_id}/predictions")
def predictions(evaluation_id: int, session: SessionDep, worker_id: Annotated[str, Form()],
                file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    path = _call(lambda: service.store_predictions(session, evaluation_id, worker_id, file.file))
    return {"size": path.stat().st_size}


@internal_router.post("/evaluations/{evaluation_id}/finish")
def finish(evaluation_id: int, payload: EvalFinish, session: SessionDep) -> dict[str, Any]:
    _call(lambda: service.finish(session, evaluation_id, payload))
    return {}


# --------------------------------------------------------------------------- exports (merged models)
class ExportCreate(BaseModel):
    checkpoint: str | None = Field(default=None, max_length=200)
    export_size: int = Field(default=5, ge=1, le=100)  # shard size in GB


@api_router.post("/runs/{run_id}/exports", status_code=201)
def export_run(run_id: int, payload: ExportCreate, session: SessionDep) -> dict[str, Any]:
    """Merge the run's final adapter (`checkpoint` null) or a stored checkpoint into its base model
    (`llamafactory-cli export` on a worker); the merged model is registered as a model (`model_id`)."""
    return export_service.public(_call(lambda: export_service.create(
        session, run_id, checkpoint=payload.checkpoint, export_size=payload.export_size)))


@api_router.get("/exports/{export_id}")
def get_export(export_id: int, session: SessionDep) -> dict[str, Any]:
    return export_service.public(_call(lambda: export_service.get_export(session, export_id)))


@api_router.post("/exports/{export_id}/cancel")
def cancel_export(export_id: int, session: SessionDep) -> dict[str, Any]:
    return export_service.public(_call(lambda: export_service.cancel(session, export_id)))


@api_router.get("/exports/{export_id}/download")
def download_export(export_id: int, session: SessionDep) -> StreamingResponse:
    """The merged model as a zip (safetensors, config, tokenizer, the Ollama Modelfile)."""
    manifest = _call(lambda: export_service.merged_manifest(session, export_id))
    return StreamingResponse(stream_zip(manifest), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="export-{export_id}.zip"'})


@internal_router.post("/exports/{export_id}/claim")
def claim_export(export_id: int, payload: EvalClaim, session: SessionDep) -> ExportSpec:
    return _call(lambda: export_service.claim(session, export_id, payload))


@internal_router.post("/exports/{export_id}/heartbeat")
def export_heartbeat(export_id: int, payload: EvalHeartbeat, session: SessionDep) -> EvalReply:
    return EvalReply(cancel=_call(lambda: export_service.heartbeat(session, export_id, payload)))


@internal_router.post("/exports/{export_id}/finish")
def finish_export(export_id: int, payload: ExportFinish, session: SessionDep) -> dict[str, Any]:
    _call(lambda: export_service.finish(session, export_id, payload))
    return {}

