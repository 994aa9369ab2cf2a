"""Datasets: pages (htmx fragments from the same routes), the JSON API under /api/v1 and the file
route of the worker channel."""

from __future__ import annotations

from html import escape
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import Response, StreamingResponse
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.auth import CurrentUser, OwnerQuery, require_owner
from app.db import SessionDep
from app.models import Dataset, DatasetPublic, DatasetUpdate, ModelEntry
from app.models.dataset import DatasetDetail, DatasetImportResult, DatasetKind
from app.security import attachment_disposition
from app.services import datasets as service
from app.services.datasets import DatasetError
from app.services.users import owned_by, owner_id_filter
from app.templating import is_htmx, render
from app.web.uploads import receive_upload

router = APIRouter(tags=["datasets-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["datasets"])
# Changing one needs its owner or an admin (app/services/permissions.py).
OWNED_DATASET = require_owner(service.get_dataset, "dataset_id", "dataset")
internal_router = APIRouter(tags=["datasets-internal"])

DEFAULT_CUTOFF_LEN = 1024
CutoffLen = Annotated[int, Query(ge=1, le=1_048_576)]


def _detail(dataset: Dataset) -> DatasetDetail:
    return DatasetDetail(
        **DatasetPublic.model_validate(dataset).model_dump(),
        report=dataset.report,
        dataset_info=service.dataset_info_for([dataset])[dataset.name],
    )


MEDIA_TYPES = {"json": "application/json", "jsonl": "application/jsonl", "txt": "text/plain; charset=utf-8"}


def _download(dataset: Dataset) -> StreamingResponse:
    # The original name goes only into the header, never into a path.
    path = service.data_file(dataset)
    disposition = attachment_disposition(dataset.original_filename, f"dataset.{dataset.file_kind}")
    return StreamingResponse(
        service.iter_file(path),
        media_type=MEDIA_TYPES[dataset.file_kind],
        headers={"Content-Disposition": disposition, "Content-Length": str(path.stat().st_size)},
    )


async def _import(request: Request, session: Session) -> service.ImportResult:
    """Multipart: `dataset_info` (the JSON) with `files` (several), or `archive` (a zip). Starlette
    spools these parts to temporary files; the service reads them in chunks."""
    form = await request.form()
    try:
        archive = form.get("archive")
        if isinstance(archive, UploadFile) and archive.filename:
            return await run_in_threadpool(service.import_from_zip, session, archive.file)
        info = form.get("dataset_info")
        if not isinstance(info, UploadFile):
            raise DatasetError("send a zip as 'archive', or 'dataset_info' with its 'files'")
        files = {
            upload.filename: upload.file
            for upload in form.getlist("files") if isinstance(upload, UploadFile) and upload.filename
        }
        return await run_in_threadpool(service.import_from_files, session, await info.read(), files)
    finally:
        await form.close()


# ---------------------------------------------------------------------------------------- pages
def _models(session: Session) -> list[ModelEntry]:
    return list(session.exec(select(ModelEntry).order_by(ModelEntry.name)).all())


@router.get("/datasets")
def datasets_page(request: Request, session: SessionDep, user: CurrentUser, owner: OwnerQuery = None):
    """`?owner=me`: only the caller's datasets (the page's "Mine" toggle)."""
    rows = owned_by(service.list_datasets(session), owner_id_filter(session, user, owner))
    context = {"section": "datasets", "datasets": rows, "owner": owner,
               "max_upload_bytes": request.app.state.settings.max_upload_bytes}
    # htmx refreshes only the list (after an import); a normal visit gets the whole page.
    return render(request, "datasets/list.html", context, block="list" if is_htmx(request) else None)


@router.post("/datasets/import")
async def import_page(request: Request, session: SessionDep):
    try:
        result = await _import(request, session)
    except DatasetError as exc:
        return render(request, "datasets/list.html", {"import_error": exc.detail}, block="import_result")
    return render(request, "datasets/list.html", {"imported": result}, block="import_result",
                  headers={"HX-Trigger": "datasets-changed"})


@router.get("/datasets/templates")
def template_options(request: Request):
    """LLaMA-Factory's template names as <option>s, loaded after the page (asking takes seconds)."""
    options = "".join(f"<option value=\"{escape(name)}\">" for name in service.templates_or_empty())
    return Response(options, media_type="text/html")


@router.get("/datasets/{dataset_id}")
def dataset_page(request: Request, dataset_id: int, session: SessionDep):
    dataset = service.get_dataset(session, dataset_id)
    models = _models(session)
    context = {
        "section": "datasets", "dataset": dataset, "models": models,
        "dataset_info": service.dataset_info_for([dataset])[dataset.name],
        "runs_using": service.active_runs_using(session, dataset), "cutoff_len": DEFAULT_CUTOFF_LEN,
    }
    return render(request, "datasets/detail.html", context)


# Refusals in page fragments answer 200 with the message inline: htmx swaps only 2xx responses.
@router.post("/datasets/{dataset_id}/edit", dependencies=[OWNED_DATASET])
def edit_page(
    request: Request, dataset_id: int, session: SessionDep,
    name: Annotated[str, Form()], description: Annotated[str, Form()] = "",
):
    dataset = service.get_dataset(session, dataset_id)
    try:
        service.update_dataset(session, dataset, name=name, description=description)
    except DatasetError as exc:
        session.refresh(dataset)
        return render(request, "datasets/detail.html", {"dataset": dataset, "edit_error": exc.detail,
                                                         "name_value": name, "description_value": description},
                      block="header")
    return render(request, "datasets/detail.html", {"dataset": dataset, "saved": True}, block="header")


@router.post("/datasets/{dataset_id}/delete", dependencies=[OWNED_DATASET])
def delete_page(request: Request, dataset_id: int, session: SessionDep):
    dataset = service.get_dataset(session, dataset_id)
    try:
        service.delete_dataset(session, dataset)
    except DatasetError as exc:
        return render(request, "datasets/detail.html", {"delete_error": exc.detail}, block="delete_result")
    return Response(status_code=204, headers={"HX-Redirect": "/datasets"})


@router.get("/datasets/{dataset_id}/tokens")
def tokens_page(
    request: Request, dataset_id: int, session: SessionDep,
    model_id: Annotated[int | None, Query()] = None, template: str | None = None,
    cutoff_len: CutoffLen = DEFAULT_CUTOFF_LEN, row: Annotated[int, Query(ge=1)] = 1,
):
    """The token statistics and one rendered row for the chosen model and template (a fragment)."""
    dataset = service.get_dataset(session, dataset_id)
    context: dict[str, Any] = {"dataset": dataset}
    try:
        context["stats"] = service.token_stats(session, dataset, model_id=model_id, template=template,
                                               cutoff_len=cutoff_len)
        context["preview"] = service.render_row(session, dataset, model_id=model_id, template=template,
                                                row=row, cutoff_len=cutoff_len)
    except DatasetError as exc:
        context["tokens_error"] = exc.detail
    return render(request, "datasets/detail.html", context, block="tokens")


# ------------------------------------------------------------------------------------------ API
@api_router.get("/datasets", response_model=list[DatasetPublic])
def list_datasets(session: SessionDep, user: CurrentUser, owner: OwnerQuery = None, kind: DatasetKind | None = None):
    """Every dataset, or those of one `kind` (sft, ranking, kto, pretrain)."""
    return owned_by(service.list_datasets(session, kind), owner_id_filter(session, user, owner))


@api_router.post("/datasets", response_model=DatasetPublic, status_code=status.HTTP_201_CREATED,
                 openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                     "type": "object", "required": ["file"], "properties": {
                         "file": {"type": "string", "format": "binary"},
                         "name": {"type": "string"}, "description": {"type": "string"},
                         "kind": {"type": "string", "enum": list(service.UPLOAD_KINDS)},
                         "formatting": {"type": "string", "enum": list(service.FORMATTINGS)},
                         "columns": {"type": "string", "description": "JSON object: role → key"},
                         "tags": {"type": "string", "description": "JSON object (sharegpt tags)"}}}}}}})
async def upload_dataset(request: Request, session: SessionDep):
    """Multipart `file` (plus optional `name`, `description`, and `kind`, `formatting`, `columns`,
    `tags` sent before the file), streamed to disk through the validator. The answer's `kind` says
    what the file was found to be (sft, ranking, kto or pretrain)."""
    return await receive_upload(request, session)


@api_router.post("/datasets/import", response_model=DatasetImportResult, status_code=status.HTTP_201_CREATED)
async def import_datasets(request: Request, session: SessionDep):
    result = await _import(request, session)
    return DatasetImportResult(
        registered=[DatasetPublic.model_validate(d) for d in result.registered], skipped=result.skipped
    )


@api_router.get("/datasets/{dataset_id}", response_model=DatasetDetail)
def get_dataset(dataset_id: int, session: SessionDep):
    return _detail(service.get_dataset(session, dataset_id))


@api_router.patch("/datasets/{dataset_id}", dependencies=[OWNED_DATASET], response_model=DatasetDetail)
def update_dataset(dataset_id: int, update: DatasetUpdate, session: SessionDep):
    dataset = service.get_dataset(session, dataset_id)
    return _detail(service.update_dataset(session, dataset, name=update.name, description=update.description))


@api_router.delete("/datasets/{dataset_id}", dependencies=[OWNED_DATASET], status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: int, session: SessionDep):
    service.delete_dataset(session, service.get_dataset(session, dataset_id))


@api_router.get("/datasets/{dataset_id}/download")
def download_dataset(dataset_id: int, session: SessionDep):
    return _download(service.get_dataset(session, dataset_id))


@api_router.get("/datasets/{dataset_id}/preview")
def preview_dataset(
    dataset_id: int, session: SessionDep, model_id: int | None = None, template: str | None = None,
    row: Annotated[int, Query(ge=1)] = 1, cutoff_len: CutoffLen = DEFAULT_CUTOFF_LEN,
):
    """Row `row` rendered through LLaMA-Factory's template with the model's tokenizer."""
    dataset = service.get_dataset(session, dataset_id)
    return service.render_row(session, dataset, model_id=model_id, template=template, row=row, cutoff_len=cutoff_len)


@api_router.get("/datasets/{dataset_id}/stats")
def dataset_stats(
    dataset_id: int, session: SessionDep, model_id: int | None = None, template: str | None = None,
    cutoff_len: CutoffLen = DEFAULT_CUTOFF_LEN,
):
    """Token lengths of the sampled rows and the share a cutoff_len would truncate."""
    dataset = service.get_dataset(session, dataset_id)
    return service.token_stats(session, dataset, model_id=model_id, template=template, cutoff_len=cutoff_len)


# ------------------------------------------------------------------------------- worker channel
@internal_router.get("/datasets/{dataset_id}/file")
def dataset_file(dataset_id: int, session: SessionDep):
    """The stored file, for workers that do not share the data dir."""
    return _download(service.get_dataset(session, dataset_id))
