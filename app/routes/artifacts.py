"""Artifacts over the worker channel: blobs in (resumable uploads, by address or through an upload
session) and out (byte ranges), and the manifests of a run's folders."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from app.db import SessionDep
from app.models import RunArtifactPublic
from app.services import artifacts as service
from app.wire import (
    SHA256_PATTERN,
    ArtifactManifest,
    ArtifactRecord,
    UploadCommit,
    UploadSession,
    UploadSessionRequest,
    UploadState,
)

router = APIRouter(include_in_schema=False)
api_router = APIRouter()
internal_router = APIRouter()

Sha256 = Annotated[str, Path(pattern=SHA256_PATTERN)]
UploadId = Annotated[str, Path(pattern=service.UPLOAD_ID_PATTERN)]
_BYTE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _refusal(error: service.ArtifactError) -> JSONResponse:
    return JSONResponse({"detail": error.detail, **error.extra}, status_code=error.status_code)


class _Unsatisfiable(ValueError):
    pass


def _requested_span(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as (first, last); None for the whole blob (no header, or one
    this server may ignore: several ranges, bad syntax)."""
    match = _BYTE_RANGE.match(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last N bytes
        first, last = max(size - int(match[2]), 0), size - 1
    else:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or first > last:
        raise _Unsatisfiable(f"range {header} is outside the blob's {size} bytes")
    return first, last


def _blob_bytes(sha256: str, start: int, length: int) -> Iterator[bytes]:
    with service.open_blob(sha256, start) as blob:
        while length > 0:
            chunk = blob.read(min(service.CHUNK_BYTES, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


@internal_router.api_route("/blobs/{sha256}", methods=["GET", "HEAD"], response_model=None)
def download_blob(
    sha256: Sha256, request: Request, range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    size = service.blob_size(sha256)
    if size is None:
        return JSONResponse({"detail": f"blob {sha256} is not in the store"}, status_code=404)
    try:
        span = _requested_span(range_header, size)
    except _Unsatisfiable as error:
        return JSONResponse({"detail": str(error)}, status_code=416, headers={"Content-Range": f"bytes */{size}"})
    first, last = span or (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"', "Content-Length": str(last - first + 1)}
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    status = 206 if span is not None else 200
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_blob_bytes(sha256, first, last - first + 1), status_code=status, headers=headers,
                             media_type="application/octet-stream")


@internal_router.get("/blobs/{sha256}/upload")
def upload_state(sha256: Sha256) -> UploadState:
    return service.upload_state(sha256)


@internal_router.patch("/blobs/{sha256}/upload", response_model=None)
async def upload_blob(
    sha256: Sha256, request: Request, offset: Annotated[int, Query(ge=0)], size: Annotated[int, Query(ge=0)],
) -> UploadState | Response:
    """The request's body, streamed, appended at `offset` of the blob's `size` bytes."""
    try:
        return await service.receive_blob(sha256, offset, size, request.stream())
    except service.ArtifactError as error:
        return _refusal(error)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody listens; what arrived stays staged for the resume


@internal_router.post("/uploads")
def open_upload_session(opening: UploadSessionRequest) -> UploadSession:
    return service.open_session(opening.size)


@internal_router.get("/uploads/{upload_id}", response_model=None)
def upload_session_state(upload_id: UploadId) -> UploadState | Response:
    try:
        return service.session_state(upload_id)
    except service.ArtifactError as error:
        return _refusal(error)


@internal_router.patch("/uploads/{upload_id}", response_model=None)
async def upload_to_session(
    upload_id: UploadId, request: Request, offset: Annotated[int, Query(ge=0)],
) -> UploadState | Response:
    """The request's body, streamed, appended at `offset` of the session's bytes."""
    try:
        return await service.receive_session(upload_id, offset, request.stream())
    except service.ArtifactError as error:
        return _refusal(error)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody listens; what arrived stays staged for the resume


@internal_router.post("/uploads/{upload_id}/commit", response_model=None)
def commit_upload_session(upload_id: UploadId, commit: UploadCommit) -> UploadState | Response:
    try:
        return service.commit_session(upload_id, commit.sha256)
    except service.ArtifactError as error:
        return _refusal(error)


@internal_router.post("/runs/{run_id}/artifacts", response_model=None)
def record_artifact(run_id: int, record: ArtifactRecord, session: SessionDep) -> RunArtifactPublic | Response:
    try:
        return RunArtifactPublic.model_validate(service.record_artifact(session, run_id, record))
    except service.ArtifactError as error:
        return _refusal(error)


@internal_router.get("/runs/{run_id}/artifacts/{name}", response_model=None)
def artifact_manifest(run_id: int, name: str, session: SessionDep) -> ArtifactManifest | Response:
    try:
        return service.get_manifest(session, run_id, name)
    except service.ArtifactError as error:
        return _refusal(error)
