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


def _requested_span(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as (first, last); None for the whole blob (no header, or one
    this server may ignore: several ranges, bad syntax). first > last: none of the blob is in it."""
    match = _BYTE_RANGE.match(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last N bytes
        first, last = max(size - int(match[2]), 0), size - 1
    else:
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
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
    size = service.stored_blob_size(sha256)
    span = _requested_span(range_header, size)
    if span is not None and span[0] > span[1]:  # HTTP's answer to a range past the end, not a refusal
        return JSONResponse({"detail": f"range {range_header} is outside the blob's {size} bytes"}, status_code=416,
                            headers={"Content-Range": f"bytes */{size}"})
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
    except ClientDisconnect:
        return Response(status_code=400)  # nobody listens; what arrived stays staged for the resume


@internal_router.post("/uploads")
def open_upload_session(opening: UploadSessionRequest) -> UploadSession:
    return service.open_session(opening.size)


@internal_router.get("/uploads/{upload_id}")
def upload_session_state(upload_id: UploadId) -> UploadState:
    return service.session_state(upload_id)


@internal_router.patch("/uploads/{upload_id}", response_model=None)
async def upload_to_session(
    upload_id: UploadId, request: Request, offset: Annotated[int, Query(ge=0)],
) -> UploadState | Response:
    """The request's body, streamed, appended at `offset` of the session's bytes."""
    try:
        return await service.receive_session(upload_id, offset, request.stream())
    except ClientDisconnect:
        return Response(status_code=400)  # nobody listens; what arrived stays staged for the resume


@internal_router.post("/uploads/{upload_id}/commit")
def commit_upload_session(upload_id: UploadId, commit: UploadCommit) -> UploadState:
    return service.commit_session(upload_id, commit.sha256)


@internal_router.post("/runs/{run_id}/artifacts")
def record_artifact(run_id: int, record: ArtifactRecord, session: SessionDep) -> RunArtifactPublic:
    return RunArtifactPublic.model_validate(service.record_artifact(session, run_id, record))


@internal_router.get("/runs/{run_id}/artifacts/{name}")
def artifact_manifest(run_id: int, name: str, session: SessionDep) -> ArtifactManifest:
    return service.get_manifest(session, run_id, name)
