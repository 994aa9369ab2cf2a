"""Evaluations and exports: the JSON API under /api/v1, the evaluations of a run's page, and the worker
channel (claim, heartbeat, rows, predictions, finish). Thin: app/services/evaluations.py decides."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from app.db import SessionDep
from app.models import Run
from app.errors import NotFound
from app.services import evaluations as service
from app.services import exports as export_service
from app.services import listings
from app.services.runs import stream_zip
from app.templating import is_htmx, render
from app.wire import EVAL_METRICS, EvalClaim, EvalFinish, EvalHeartbeat, EvalReply, EvalSpec, ExportFinish, ExportSpec

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


# --------------------------------------------------------------------------- JSON API
@api_router.post("/runs/{run_id}/evaluations", status_code=201)
def evaluate_run(run_id: int, payload: RunEvaluationCreate, session: SessionDep) -> dict[str, Any]:
    """Evaluate a finished run's final adapter (`checkpoint` null) or a stored checkpoint on its
    held-out split (`dataset_id` null) or a registered dataset of its format."""
    evaluation = service.create_for_run(
        session, run_id, checkpoint=payload.checkpoint, dataset_id=payload.dataset_id, backend=payload.backend,
        max_rows=payload.max_rows, max_new_tokens=payload.max_new_tokens, gpus=payload.gpus)
    return service.public(session, evaluation)


@api_router.get("/runs/{run_id}/evaluations")
def run_evaluations(run_id: int, session: SessionDep) -> list[dict[str, Any]]:
    return [service.public(session, e) for e in service.list_evaluations(session, run_id=run_id)]


@api_router.get("/runs/{run_id}/best-checkpoint")
def best_checkpoint(run_id: int, session: SessionDep, metric: str = "eval_loss") -> dict[str, Any]:
    """The best stored checkpoint by eval_loss (lowest) or an evaluation metric (highest)."""
    best = service.best_checkpoint(session, run_id, metric)
    if best is None:
        raise NotFound(f"run {run_id} has no stored checkpoint scored by {metric}")
    return best


@api_router.post("/evaluations", status_code=201)
def evaluate_model(payload: ModelEvaluationCreate, session: SessionDep) -> dict[str, Any]:
    """A base model alone on a registered dataset (reused by adapters evaluated on the same rows)."""
    evaluation = service.create_for_model(
        session, payload.model_id, dataset_id=payload.dataset_id, backend=payload.backend,
        max_rows=payload.max_rows, max_new_tokens=payload.max_new_tokens, template=payload.template,
        cutoff_len=payload.cutoff_len, gpus=payload.gpus)
    return service.public(session, evaluation)


@api_router.get("/evaluations")
def list_evaluations(session: SessionDep, limit: int = Query(200, ge=1, le=1000)) -> list[dict[str, Any]]:
    return [service.public(session, e) for e in service.list_evaluations(session, limit=limit)]


@api_router.get("/evaluations/{evaluation_id}")
def get_evaluation(evaluation_id: int, session: SessionDep) -> dict[str, Any]:
    return service.public(session, service.get_evaluation(session, evaluation_id))


@api_router.post("/evaluations/{evaluation_id}/cancel")
def cancel_evaluation(evaluation_id: int, session: SessionDep) -> dict[str, Any]:
    return service.public(session, service.cancel(session, evaluation_id))


@api_router.get("/evaluations/{evaluation_id}/rows")
def evaluation_rows(evaluation_id: int, session: SessionDep, offset: int = Query(0, ge=0),
                    limit: int = Query(50, ge=1, le=1000), q: str | None = Query(None, max_length=500)) -> dict[str, Any]:
    """The generations, a page at a time: prompt, reference, base output, adapter output; `q`
    keeps the rows where any of them holds it (case-insensitive)."""
    return service.page_rows(session, evaluation_id, offset=offset, limit=limit, q=q)


@api_router.get("/evaluations/{evaluation_id}/rows.jsonl")
def evaluation_rows_jsonl(evaluation_id: int, session: SessionDep) -> StreamingResponse:
    rows = service.merged_rows(session, service.get_evaluation(session, evaluation_id))

    def lines() -> Iterator[bytes]:
        for row in rows:
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="evaluation-{evaluation_id}.jsonl"'})


# --------------------------------------------------------------------------- the run page's part
def _run_jobs_context(session: SessionDep, run_id: int) -> dict[str, Any]:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return {
        "run_id": run_id,
        "evaluations": [service.public(session, e) for e in service.list_evaluations(session, run_id=run_id)],
        "exports": [export_service.public(x) for x in export_service.list_exports(session, run_id)],
        "adapters": listings.adapter_choices(session, run),
        "datasets": service.dataset_choices(session, run),
        "backends": service.BACKENDS,
    }


@router.get("/runs/{run_id}/evaluations")
def run_evaluations_fragment(request: Request, run_id: int, session: SessionDep):
    """The evaluations and exports of a run's page (templates/evaluations/_run_evaluations.html):
    their tables, and the forms that start them."""
    return render(request, "evaluations/_run_evaluations.html", _run_jobs_context(session, run_id))


ROWS_PER_PAGE = 25


@router.get("/evaluations/compare")
def compare_evaluations_page(request: Request, session: SessionDep, ids: Annotated[list[int], Query()] = []):  # noqa: B006
    """The succeeded evaluations of some runs side by side (the Compare page loads the table)."""
    evaluations = [service.public(session, e) for run_id in ids for e in service.list_evaluations(session, run_id=run_id)
                   if e.status == "succeeded"]
    context = {"section": "runs", "evaluations": evaluations, "metrics": EVAL_METRICS, "ids": ids}
    return render(request, "evaluations/compare.html", context, block="table" if is_htmx(request) else None)


@router.get("/evaluations/{evaluation_id}")
def evaluation_page(request: Request, evaluation_id: int, session: SessionDep, offset: int = Query(0, ge=0),
                    q: str | None = Query(None, max_length=500)):
    """One evaluation: its scores beside the base model's, and the generations side by side with
    search and paging (htmx swaps the rows alone)."""
    evaluation = service.public(session, service.get_evaluation(session, evaluation_id))
    rows = service.page_rows(session, evaluation_id, offset=offset, limit=ROWS_PER_PAGE, q=q or None)
    context = {"section": "runs", "evaluation": evaluation, "page": rows, "q": q or "", "per_page": ROWS_PER_PAGE,
               "metrics": EVAL_METRICS}
    return render(request, "evaluations/detail.html", context, block="rows" if is_htmx(request) else None)


@router.post("/runs/{run_id}/evaluations")
def evaluate_run_from_page(request: Request, run_id: int, session: SessionDep,
                           checkpoint: Annotated[str, Form()] = "", dataset_id: Annotated[str, Form()] = "",
                           backend: Annotated[Literal["llamafactory", "vllm"], Form()] = "llamafactory",
                           max_rows: Annotated[int, Form(ge=1, le=service.MAX_ROWS_LIMIT)] = 200):
    service.create_for_run(session, run_id, checkpoint=checkpoint or None,
                           dataset_id=int(dataset_id) if dataset_id else None, backend=backend, max_rows=max_rows)
    return render(request, "evaluations/_run_evaluations.html", _run_jobs_context(session, run_id))


@router.post("/runs/{run_id}/exports")
def export_run_from_page(request: Request, run_id: int, session: SessionDep,
                         checkpoint: Annotated[str, Form()] = ""):
    export_service.create(session, run_id, checkpoint=checkpoint or None)
    return render(request, "evaluations/_run_evaluations.html", _run_jobs_context(session, run_id))


# --------------------------------------------------------------------------- the worker channel
@internal_router.post("/evaluations/{evaluation_id}/claim")
def claim(evaluation_id: int, payload: EvalClaim, session: SessionDep) -> EvalSpec:
    return service.claim(session, evaluation_id, payload)


@internal_router.get("/evaluations/{evaluation_id}/rows.json")
def rows_file(evaluation_id: int, session: SessionDep) -> FileResponse:
    return FileResponse(service.rows_path(session, evaluation_id), media_type="application/json")


@internal_router.post("/evaluations/{evaluation_id}/heartbeat")
def heartbeat(evaluation_id: int, payload: EvalHeartbeat, session: SessionDep) -> EvalReply:
    return EvalReply(cancel=service.heartbeat(session, evaluation_id, payload))


@internal_router.post("/evaluations/{evaluation_id}/predictions")
def predictions(evaluation_id: int, session: SessionDep, worker_id: Annotated[str, Form()],
                file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    path = service.store_predictions(session, evaluation_id, worker_id, file.file)
    return {"size": path.stat().st_size}


@internal_router.post("/evaluations/{evaluation_id}/finish")
def finish(evaluation_id: int, payload: EvalFinish, session: SessionDep) -> dict[str, Any]:
    service.finish(session, evaluation_id, payload)
    return {}


# --------------------------------------------------------------------------- exports (merged models)
class ExportCreate(BaseModel):
    checkpoint: str | None = Field(default=None, max_length=200)
    export_size: int = Field(default=5, ge=1, le=100)  # shard size in GB


@api_router.post("/runs/{run_id}/exports", status_code=201)
def export_run(run_id: int, payload: ExportCreate, session: SessionDep) -> dict[str, Any]:
    """Merge the run's final adapter (`checkpoint` null) or a stored checkpoint into its base model
    (`llamafactory-cli export` on a worker); the merged model is registered as a model (`model_id`)."""
    return export_service.public(export_service.create(
        session, run_id, checkpoint=payload.checkpoint, export_size=payload.export_size))


@api_router.get("/exports/{export_id}")
def get_export(export_id: int, session: SessionDep) -> dict[str, Any]:
    return export_service.public(export_service.get_export(session, export_id))


@api_router.post("/exports/{export_id}/cancel")
def cancel_export(export_id: int, session: SessionDep) -> dict[str, Any]:
    return export_service.public(export_service.cancel(session, export_id))


@api_router.get("/exports/{export_id}/download")
def download_export(export_id: int, session: SessionDep) -> StreamingResponse:
    """The merged model as a zip (safetensors, config, tokenizer, the Ollama Modelfile)."""
    manifest = export_service.merged_manifest(session, export_id)
    return StreamingResponse(stream_zip(manifest), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="export-{export_id}.zip"'})


@internal_router.post("/exports/{export_id}/claim")
def claim_export(export_id: int, payload: EvalClaim, session: SessionDep) -> ExportSpec:
    return export_service.claim(session, export_id, payload)


@internal_router.post("/exports/{export_id}/heartbeat")
def export_heartbeat(export_id: int, payload: EvalHeartbeat, session: SessionDep) -> EvalReply:
    return EvalReply(cancel=export_service.heartbeat(session, export_id, payload))


@internal_router.post("/exports/{export_id}/finish")
def finish_export(export_id: int, payload: ExportFinish, session: SessionDep) -> dict[str, Any]:
    export_service.finish(session, export_id, payload)
    return {}

