"""The web side of a dataset upload: the multipart body parsed as it arrives, its file part fed
straight into the dataset service's IncomingFile (validated and written while it streams in).

The body is parsed with python-multipart's streaming parser instead of `request.form()`, which would
first spool the whole file (to a temp file outside the data dir) before any validation could start;
here memory stays at about one chunk plus the validator's buffer whatever the size, and a bad file
is refused at its first bad byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.models import Dataset
from app.services.datasets import (
    STEERING_FIELDS,
    DatasetError,
    IncomingFile,
    UploadOptions,
    check_name,
    name_from_filename,
    register,
)
from app.settings import get_settings

MAX_TEXT_FIELD_BYTES = 64 * 1024
# Network chunks are gathered to about this size before one hop to a worker thread (parse, hash,
# validate, write): fewer thread hops, memory still bounded.
FEED_BYTES = 1024 * 1024


class _MultipartUpload:
    """python-multipart's streaming parser fed with the body as it arrives: text fields are kept
    (64 KiB each at most), the single file part goes straight into an IncomingFile. Text fields
    that steer validation (kind, formatting, columns, tags) must come before the file part, as
    browsers' FormData, httpx and curl -F send them in the order given."""

    def __init__(self, boundary: bytes, start_file: Callable[[dict[str, str], str], IncomingFile]):
        self.fields: dict[str, str] = {}
        self.incoming: IncomingFile | None = None
        self.complete = False
        self._start_file = start_file
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_name = ""
        self._part_is_file = False
        self._text = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:  # found by the fuzzer: was a 500
            raise DatasetError(f"malformed multipart body: {exc}") from None

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._text = bytearray()

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._part_is_file = filename is not None
        if not self._part_is_file:
            return
        if self._part_name != "file":
            raise DatasetError(f"unexpected file field {self._part_name!r}; send 'file'")
        if self.incoming is not None:
            raise DatasetError("send one file per upload")
        self.incoming = self._start_file(dict(self.fields), filename.decode("utf-8", "replace"))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self.incoming.write(data[start:end])
            return
        self._text.extend(data[start:end])
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise DatasetError(f"field {self._part_name!r} is over 64 KiB")

    def _on_part_end(self) -> None:
        if self._part_is_file:
            return
        if self.incoming is not None and self._part_name in STEERING_FIELDS:
            raise DatasetError(f"send {self._part_name!r} before the file: it steers the validation")
        try:
            self.fields[self._part_name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"field {self._part_name!r} is not UTF-8") from None

    def _on_end(self) -> None:
        self.complete = True


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise DatasetError("send the dataset as multipart/form-data with a 'file' field", status_code=415)
    return boundary


class _Body:
    """The request body as it arrives, read from the ASGI messages so that after a refusal the rest
    can still be drained (Starlette's body iterator cannot be resumed once an error left it)."""

    def __init__(self, request: Request):
        self._receive = request.receive
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.complete = not message.get("more_body", False)
            if message.get("body"):
                yield message["body"]

    async def drain(self, limit: int) -> None:
        """Read what the client still sends (up to `limit` bytes), so that it sees the error
        response instead of a connection reset halfway through its upload."""
        received = 0
        try:
            async for chunk in self.chunks():
                received += len(chunk)
                if received > limit:
                    return
        except ClientDisconnect:
            return


async def receive_upload(request: Request, session: Session) -> Dataset:
    """`POST /api/v1/datasets`: stream the multipart body to disk through the validator."""
    settings = get_settings()
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + MAX_TEXT_FIELD_BYTES * 8:
        raise DatasetError(
            f"the upload is {int(declared)} bytes, over the limit of {settings.max_upload_bytes} bytes", status_code=413
        )

    def start_file(fields: dict[str, str], filename: str) -> IncomingFile:
        if fields.get("name", "").strip():
            check_name(session, fields["name"])
        options = UploadOptions.parse(fields.get("formatting"), fields.get("columns"), fields.get("tags"),
                                      kind=fields.get("kind"))
        return IncomingFile(options, filename, settings)

    upload = _MultipartUpload(boundary, start_file)
    body = _Body(request)
    # One chunk is validated in a worker thread while the next one is received: memory stays at
    # about two chunks, and receiving overlaps validation.
    feeding: asyncio.Future | None = None

    async def settle() -> None:
        """Wait for the chunk in flight (its thread cannot be cancelled) before cleaning up."""
        if feeding is not None:
            await asyncio.gather(feeding, return_exceptions=True)

    try:
        pending = bytearray()
        async for chunk in body.chunks():
            pending += chunk
            if len(pending) >= FEED_BYTES:
                if feeding is not None:
                    await feeding
                feeding = asyncio.ensure_future(run_in_threadpool(upload.feed, bytes(pending)))
                pending = bytearray()
        if feeding is not None:
            await feeding
        if pending:
            await run_in_threadpool(upload.feed, bytes(pending))
        if not upload.complete:
            raise DatasetError("the upload ended before the multipart body was complete")
        if upload.incoming is None:
            raise DatasetError("no file: send the dataset in the 'file' field")
        await run_in_threadpool(upload.incoming.finish)
        fields = upload.fields
        name = fields.get("name", "").strip() or name_from_filename(upload.incoming.original_filename)
        description = fields.get("description", "").strip()
        [dataset] = await run_in_threadpool(register, session, [(upload.incoming, name, description)])
        return dataset
    except ClientDisconnect:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        raise DatasetError("the connection closed before the upload was complete") from None
    except DatasetError as exc:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        if exc.status_code != 413:  # too large: the client is told at once
            await body.drain(settings.max_upload_bytes)
        raise
    except BaseException:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        raise


