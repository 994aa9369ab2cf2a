"""Datasets: the upload pipeline (stream → validate → atomic rename), the registry for runs,
import of an existing dataset_info.json, CRUD, and token statistics through LLaMA-Factory.

On disk, a dataset is the folder `datasets/<id>/` of the data dir:
  data.<json|jsonl>   the uploaded bytes (a UTF-8 BOM removed: `datasets` cannot read it)
  preview.json        the first rows, whole (the preview rendered through a template reads them)
  sample.jsonl        a reservoir sample of rows (token statistics are computed over it)
Everything is first written into a private folder under `datasets/.incoming/` and renamed into
place in one step only after validation passed and the database row exists; on any error the
folder is deleted, so a dataset is either complete or absent.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import posixpath
import re
import shutil
import threading
import tempfile
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import HTTPException, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.models import Dataset, ModelEntry, Run, RunStatus, TrainConfig
from app.models.base import utcnow
from app.models.run import FINISHED_RUN_STATUSES
from app.services.dataset_ingest import (
    ALPACA_DEFAULT_COLUMNS,
    SHAREGPT_DEFAULT_COLUMNS,
    TAG_NAMES,
    DatasetFormatError,
    DatasetIngest,
    DatasetTooLarge,
    IngestReport,
    dataset_info_entry,
)
from app.services.llamafactory_params import llamafactory_cache_file
from app.settings import Settings, get_settings
from workers import train_env

PREVIEW_ROWS = 10
PREVIEW_CELL_CHARS = 2000  # a preview cell in the database is clipped; preview.json keeps the row whole
SAMPLE_ROWS = 2000
ROW_READ_CHARS = 1 << 20  # a row beyond the preview is read from the file this many characters at a time
MAX_TEXT_FIELD_BYTES = 64 * 1024
# Network chunks are gathered to about this size before one hop to a worker thread (parse, hash,
# validate, write): fewer thread hops, memory still bounded.
FEED_BYTES = 1024 * 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "1–100 letters, digits, '_', '.' or '-', starting with a letter or digit"
FORMATTINGS = ("auto", "alpaca", "sharegpt")
ENVSCRIPT_TIMEOUT_S = 300


class DatasetError(HTTPException):
    """A refusal with the status and message the API returns as-is (`detail`)."""


# ----------------------------------------------------------------------------------------- paths
def datasets_root(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).path("datasets")


def dataset_dir(dataset: Dataset) -> Path:
    return datasets_root() / str(dataset.id)


def data_file(dataset: Dataset) -> Path:
    return dataset_dir(dataset) / f"data.{dataset.file_kind}"


def run_file_name(dataset: Dataset) -> str:
    """The dataset's file name inside a run's dataset_dir (ids keep it stable across renames)."""
    return f"dataset_{dataset.id}.{dataset.file_kind}"


# ------------------------------------------------------------------------------------ validation
def check_name(session: Session, name: str, *, exclude_id: int | None = None) -> str:
    name = name.strip()
    if not NAME_PATTERN.match(name):
        raise DatasetError(status.HTTP_400_BAD_REQUEST, f"invalid name {name!r}: use {NAME_RULE}")
    taken = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if taken is not None and taken.id != exclude_id:
        raise DatasetError(status.HTTP_409_CONFLICT, f"the name {name!r} is already taken by dataset {taken.id}")
    return name


def name_from_filename(filename: str) -> str:
    """A dataset name suggested by an uploaded file's name (only its last part; never a path)."""
    stem = re.split(r"[\\/]", filename)[-1].rsplit(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-")[:100]
    return name or "dataset"


def parse_mapping(raw: str | dict | None, what: str, allowed: Iterable[str]) -> dict[str, str | None]:
    """`columns` / `tags` as JSON text or a dict: role → key name (null: not read)."""
    if raw is None or raw == "" or raw == {}:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"{what} nests too deeply to be a mapping") from None
    if not isinstance(raw, dict):
        raise DatasetError(status.HTTP_400_BAD_REQUEST, f"{what} must be a JSON object")
    allowed = set(allowed)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise DatasetError(
            status.HTTP_400_BAD_REQUEST, f"unknown {what} {unknown}: expected some of {sorted(allowed)}"
        )
    mapping: dict[str, str | None] = {}
    for role, key in raw.items():
        if key is not None and not isinstance(key, str):
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"{what}[{role!r}] must be a key name or null")
        mapping[role] = key or None
    return mapping


def columns_allowed(formatting: str) -> set[str]:
    if formatting == "alpaca":
        return set(ALPACA_DEFAULT_COLUMNS)
    if formatting == "sharegpt":
        return set(SHAREGPT_DEFAULT_COLUMNS)
    return set(ALPACA_DEFAULT_COLUMNS) | set(SHAREGPT_DEFAULT_COLUMNS)


@dataclass
class UploadOptions:
    formatting: str = "auto"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, formatting: str | None, columns: Any, tags: Any) -> UploadOptions:
        formatting = (formatting or "auto").strip().lower()
        if formatting not in FORMATTINGS:
            raise DatasetError(
                status.HTTP_400_BAD_REQUEST, f"formatting must be one of {', '.join(FORMATTINGS)}, not {formatting!r}"
            )
        parsed_columns = parse_mapping(columns, "columns", columns_allowed(formatting))
        if formatting == "auto" and parsed_columns:
            has_alpaca = bool(set(parsed_columns) & {"prompt", "query", "response", "history"})
            if has_alpaca and "messages" in parsed_columns:
                raise DatasetError(
                    status.HTTP_400_BAD_REQUEST,
                    "columns mix alpaca (prompt/query/response/history) and sharegpt (messages) roles",
                )
        return cls(formatting, parsed_columns, parse_mapping(tags, "tags", TAG_NAMES))


def _format_error(exc: DatasetFormatError) -> DatasetError:
    if isinstance(exc, DatasetTooLarge) and exc.row is None:
        return DatasetError(status.HTTP_413_CONTENT_TOO_LARGE, exc.message)
    return DatasetError(status.HTTP_400_BAD_REQUEST, exc.message)


def _storage_error(exc: OSError) -> DatasetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DatasetError(
            status.HTTP_507_INSUFFICIENT_STORAGE, "the server's disk is full: the upload was not stored"
        )
    return DatasetError(
        status.HTTP_500_INTERNAL_SERVER_ERROR, f"could not write the upload ({exc.strerror or exc}); nothing was stored"
    )


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= PREVIEW_CELL_CHARS else value[:PREVIEW_CELL_CHARS] + "…"
    if isinstance(value, list):
        return [_clip(item) for item in value]
    if isinstance(value, dict):
        return {key: _clip(item) for key, item in value.items()}
    return value


# -------------------------------------------------------------------------------- incoming files
class IncomingFile:
    """One file on its way in: its bytes go to a private folder in the data dir while the streaming
    validator reads them. Nothing is visible until `place` renames the folder into the registry."""

    def __init__(self, options: UploadOptions, original_filename: str, settings: Settings | None = None):
        settings = settings or get_settings()
        self.options = options
        self.original_filename = original_filename
        self.ingest = DatasetIngest(
            formatting=options.formatting,
            columns=options.columns,
            tags={k: v for k, v in options.tags.items() if v is not None},
            max_total_bytes=settings.max_upload_bytes,
            preview_rows=PREVIEW_ROWS,
            sample_size=SAMPLE_ROWS,
        )
        self.folder = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.path("datasets", ".incoming")))
        self._partial = self.folder / "data.part"
        self._file: BinaryIO | None = open(self._partial, "wb")  # noqa: SIM115 (closed in finish/discard)
        self._sha = hashlib.sha256()
        self._head = bytearray()  # the first bytes, held until a BOM can be recognised
        self.size = 0
        self.report: IngestReport | None = None

    def write(self, data: bytes) -> None:
        try:
            self.ingest.feed(data)
        except ValueError as exc:  # columns that do not fit the detected format
            if isinstance(exc, DatasetFormatError):
                raise
            raise DatasetFormatError(str(exc)) from None
        if self._head is not None:
            self._head += data
            if len(self._head) < 3:
                return
            data = bytes(self._head[3:] if self._head.startswith(b"\xef\xbb\xbf") else self._head)
            self._head = None
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._file.write(data)

    def finish(self) -> IngestReport:
        """Validate what arrived; on success the folder holds data, preview and sample files."""
        if self._head is not None:  # fewer than 3 bytes in all
            head, self._head = bytes(self._head), None
            self._write(head[3:] if head.startswith(b"\xef\xbb\xbf") else head)
        self._file.close()
        self._file = None
        report = self.ingest.finish()
        if not report.ok:
            raise DatasetFormatError(_rejection_message(report), row=report.first_fatal["row"])
        if report.trainable_rows == 0:
            raise DatasetFormatError(_untrainable_message(report), row=1)
        self._partial.rename(self.folder / f"data.{report.container}")
        (self.folder / "preview.json").write_text(json.dumps(report.preview, ensure_ascii=False))
        with open(self.folder / "sample.jsonl", "w", encoding="utf-8") as sample:
            for item in report.sample:
                sample.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.report = report
        return report

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _rejection_message(report: IngestReport) -> str:
    first = report.first_fatal
    kinds = ", ".join(f"{kind} ×{count}" for kind, count in report.issue_counts.items())
    more = report.fatal_count - 1
    tail = f" ({more} more rows with problems LLaMA-Factory cannot load; by kind: {kinds})" if more else ""
    return f"row {first['row']}: {first['message']}{tail}"


def _untrainable_message(report: IngestReport) -> str:
    first = next((issue["message"] for issue in report.issues if issue["row"] == 1), None)
    kinds = ", ".join(f"{kind} ×{count}" for kind, count in report.issue_counts.items())
    return (
        f"no row has anything to train on: each of the {report.rows} rows has an empty or missing response, or"
        f" LLaMA-Factory drops it (row 1: {first or 'no response'}; by kind: {kinds or 'none'})"
    )


def _report_for_db(report: IngestReport) -> dict[str, Any]:
    data = report.to_dict()
    for bulky in ("sample", "preview", "columns", "tags", "sha256", "first_fatal"):
        data.pop(bulky)
    data["preview"] = [_clip(row) for row in report.preview]
    data["token_stats"] = {}
    return data


def _new_dataset(incoming: IncomingFile, name: str, description: str) -> Dataset:
    report = incoming.report
    return Dataset(
        name=name,
        description=description,
        formatting=report.formatting,
        file_kind=report.container,
        original_filename=incoming.original_filename[:255],
        sha256=incoming.sha256,
        size_bytes=incoming.size,
        row_count=report.rows,
        columns=dict(report.columns),
        tags=dict(report.tags or {}),
        report=_report_for_db(report),
    )


def _refuse_duplicates(session: Session, incoming: IncomingFile, name: str) -> None:
    existing = session.exec(select(Dataset).where(Dataset.sha256 == incoming.sha256)).first()
    if existing is not None:
        raise DatasetError(
            status.HTTP_409_CONFLICT,
            f"this file is already uploaded as dataset {existing.name!r} (id {existing.id})",
        )
    check_name(session, name)


def register(session: Session, items: list[tuple[IncomingFile, str, str]]) -> list[Dataset]:
    """Insert the rows and move each validated folder into place, all or nothing.
    `items`: (incoming file after `finish`, name, description)."""
    placed: list[Path] = []
    datasets: list[Dataset] = []
    try:
        for incoming, name, description in items:
            _refuse_duplicates(session, incoming, name)
            dataset = _new_dataset(incoming, name, description)
            session.add(dataset)
            session.flush()  # the id names the folder
            target = dataset_dir(dataset)
            shutil.rmtree(target, ignore_errors=True)  # a leftover of a deleted dataset with the same id
            incoming.folder.rename(target)
            placed.append(target)
            datasets.append(dataset)
        session.commit()
    except IntegrityError:
        session.rollback()
        for target in placed:
            shutil.rmtree(target, ignore_errors=True)
        raise DatasetError(status.HTTP_409_CONFLICT, "a dataset with this name or content was just added") from None
    except BaseException:
        session.rollback()
        for target in placed:
            shutil.rmtree(target, ignore_errors=True)
        raise
    for dataset in datasets:
        session.refresh(dataset)
    return datasets


def ingest_file(
    stream: BinaryIO, options: UploadOptions, original_filename: str, chunk_bytes: int = 4 * 1024 * 1024
) -> IncomingFile:
    """Read a file object in chunks into a validated IncomingFile (import, CLI-less paths)."""
    incoming = IncomingFile(options, original_filename)
    try:
        while chunk := stream.read(chunk_bytes):
            incoming.write(chunk)
        incoming.finish()
    except DatasetFormatError as exc:
        incoming.discard()
        raise _format_error(exc) from None
    except OSError as exc:
        incoming.discard()
        raise _storage_error(exc) from None
    except BaseException:
        incoming.discard()
        raise
    return incoming


# --------------------------------------------------------------------------- streaming multipart
class _MultipartUpload:
    """python-multipart's streaming parser fed with the body as it arrives: text fields are kept
    (64 KiB each at most), the single file part goes straight into an IncomingFile. Text fields
    that steer validation (formatting, columns, tags) must come before the file part, as browsers'
    FormData, httpx and curl -F send them in the order given."""

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
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {exc}") from None

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
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"unexpected file field {self._part_name!r}; send 'file'")
        if self.incoming is not None:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, "send one file per upload")
        self.incoming = self._start_file(dict(self.fields), filename.decode("utf-8", "replace"))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self.incoming.write(data[start:end])
            return
        self._text.extend(data[start:end])
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"field {self._part_name!r} is over 64 KiB")

    def _on_part_end(self) -> None:
        if self._part_is_file:
            return
        if self.incoming is not None and self._part_name in ("formatting", "columns", "tags"):
            raise DatasetError(
                status.HTTP_400_BAD_REQUEST, f"send {self._part_name!r} before the file: it steers the validation"
            )
        try:
            self.fields[self._part_name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, f"field {self._part_name!r} is not UTF-8") from None

    def _on_end(self) -> None:
        self.complete = True


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise DatasetError(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the dataset as multipart/form-data with a 'file' field"
        )
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
    """`POST /api/v1/datasets`: stream the multipart body to disk through the validator.

    The body is parsed as it arrives with python-multipart's streaming parser instead of
    `request.form()`, which would first spool the whole file (to a temp file outside the data dir)
    before any validation could start; here memory stays at about one chunk plus the validator's
    buffer whatever the size, and a bad file is refused at its first bad byte."""
    settings = get_settings()
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + MAX_TEXT_FIELD_BYTES * 8:
        raise DatasetError(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the upload is {int(declared)} bytes, over the limit of {settings.max_upload_bytes} bytes",
        )

    def start_file(fields: dict[str, str], filename: str) -> IncomingFile:
        if fields.get("name", "").strip():
            check_name(session, fields["name"])
        options = UploadOptions.parse(fields.get("formatting"), fields.get("columns"), fields.get("tags"))
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
                raise DatasetError(
                    status.HTTP_400_BAD_REQUEST, "the upload ended before the multipart body was complete"
                )
            if upload.incoming is None:
                raise DatasetError(status.HTTP_400_BAD_REQUEST, "no file: send the dataset in the 'file' field")
            await run_in_threadpool(upload.incoming.finish)
        except DatasetFormatError as exc:
            raise _format_error(exc) from None
        except OSError as exc:
            raise _storage_error(exc) from None
        fields = upload.fields
        name = fields.get("name", "").strip() or name_from_filename(upload.incoming.original_filename)
        description = fields.get("description", "").strip()
        [dataset] = await run_in_threadpool(register, session, [(upload.incoming, name, description)])
        return dataset
    except ClientDisconnect:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        raise DatasetError(
            status.HTTP_400_BAD_REQUEST, "the connection closed before the upload was complete"
        ) from None
    except DatasetError as exc:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        if exc.status_code != status.HTTP_413_CONTENT_TOO_LARGE:
            await body.drain(settings.max_upload_bytes)
        raise
    except BaseException:
        await settle()
        if upload.incoming is not None:
            upload.incoming.discard()
        raise


# ---------------------------------------------------------------------------------------- import
@dataclass
class ImportResult:
    registered: list[Dataset]
    skipped: list[dict[str, str]]


def _skip_reason(entry: dict[str, Any]) -> str | None:
    """Why an entry of dataset_info.json is not an SFT dataset from a file (None: it is)."""
    if not isinstance(entry, dict):
        return "the entry is not an object"
    if "file_name" not in entry:
        source = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                       if k in entry), None)
        return f"loaded from {source}, not a local file" if source else "no file_name"
    if entry.get("ranking"):
        return "a ranking (preference) dataset: only SFT datasets are registered"
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        return f"formatting {formatting!r} is not supported (alpaca or sharegpt)"
    columns = entry.get("columns") or {}
    if "kto_tag" in columns:
        return "a KTO dataset: only SFT datasets are registered"
    if set(columns) & {"images", "videos", "audios"}:
        return "a multimodal dataset: media files are not imported"
    if formatting == "alpaca" and columns and not columns.get("response"):
        return "a pre-training dataset (no response column): only SFT datasets are registered"
    if not str(entry["file_name"]).lower().endswith((".json", ".jsonl")):
        return "file_name is not a .json or .jsonl file"
    return None


def _entry_options(name: str, entry: dict[str, Any]) -> UploadOptions:
    formatting = entry.get("formatting", "alpaca")
    try:
        return UploadOptions.parse(formatting, entry.get("columns"), entry.get("tags"))
    except DatasetError as exc:
        raise DatasetError(exc.status_code, f"dataset {name!r}: {exc.detail}") from None


def _parse_dataset_info(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, f"dataset_info.json is not valid JSON: {exc}") from None
    except RecursionError:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "dataset_info.json nests too deeply to be a list of"
                                                        " dataset entries") from None
    if not isinstance(info, dict) or not info:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "dataset_info.json must be an object of dataset entries")
    try:  # Python's json lets a lone surrogate escape (\udc00) through: it is not text
        json.dumps(info, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        after = exc.object[max(0, exc.start - 40):exc.start]
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "dataset_info.json holds an invalid Unicode escape"
                                                        f" (a lone surrogate) after {after!r}") from None
    return info


def _safe_relative(path: str) -> str | None:
    """A member path inside the folder, normalised; None when it would escape it."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or "\\" in path:
        return None
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        return None
    return normal


def import_datasets(
    session: Session,
    info_raw: bytes,
    open_file: Callable[[str], tuple[BinaryIO, str] | None],
) -> ImportResult:
    """Register every SFT dataset of a dataset_info.json, all or nothing. `open_file(file_name)`
    gives (stream, display name) for an entry's file, or None when it was not sent."""
    info = _parse_dataset_info(info_raw)
    skipped: list[dict[str, str]] = []
    incoming: list[tuple[IncomingFile, str, str]] = []
    try:
        for name, entry in info.items():
            reason = _skip_reason(entry)
            if reason is not None:
                skipped.append({"name": name, "reason": reason})
                continue
            check_name(session, name)
            if any(name == other for _, other, _ in incoming):
                raise DatasetError(status.HTTP_400_BAD_REQUEST, f"dataset {name!r} appears twice")
            options = _entry_options(name, entry)
            opened = open_file(str(entry["file_name"]))
            if opened is None:
                raise DatasetError(
                    status.HTTP_400_BAD_REQUEST, f"dataset {name!r}: the file {entry['file_name']!r} was not sent"
                )
            stream, display = opened
            with stream:
                try:
                    item = ingest_file(stream, options, display)
                except DatasetError as exc:
                    raise DatasetError(exc.status_code, f"dataset {name!r}: {exc.detail}") from None
            incoming.append((item, name, str(entry.get("description", ""))[:2000]))
        if not incoming:
            raise DatasetError(status.HTTP_400_BAD_REQUEST, "dataset_info.json holds no SFT dataset from a file")
        datasets = register(session, incoming)
    finally:
        for item, _, _ in incoming:
            item.discard()  # a no-op for folders already moved into place
    return ImportResult(datasets, skipped)


def import_from_files(session: Session, info_raw: bytes, files: dict[str, BinaryIO]) -> ImportResult:
    """Files sent one by one, matched to entries by their base name (never used as paths)."""
    by_base = {re.split(r"[\\/]", filename)[-1]: stream for filename, stream in files.items()}

    def open_file(file_name: str) -> tuple[BinaryIO, str] | None:
        base = posixpath.basename(file_name)
        stream = by_base.get(base)
        return None if stream is None else (_Unclosed(stream), base)

    return import_datasets(session, info_raw, open_file)


class _Unclosed:
    """A stream the importer may `with` without closing it (the caller owns it)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def __enter__(self) -> _Unclosed:
        return self

    def __exit__(self, *_: object) -> None:
        return None


def import_from_zip(session: Session, archive: BinaryIO) -> ImportResult:
    """A zip holding dataset_info.json and its files; any member path escaping the folder → 400."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "the archive is not a zip file") from None
    with zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            safe = _safe_relative(info.filename)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if safe is None or is_link:
                raise DatasetError(
                    status.HTTP_400_BAD_REQUEST,
                    f"the zip entry {info.filename!r} points outside the archive's folder; nothing was imported",
                )
            if not info.is_dir():
                members[safe] = info
        infos = [path for path in members if posixpath.basename(path) == "dataset_info.json"]
        if len(infos) != 1:
            raise DatasetError(
                status.HTTP_400_BAD_REQUEST,
                "the zip must hold exactly one dataset_info.json" + (f" (found {len(infos)})" if infos else ""),
            )
        base = posixpath.dirname(infos[0])
        info_raw = zf.read(members[infos[0]])

        def open_file(file_name: str) -> tuple[BinaryIO, str] | None:
            relative = _safe_relative(file_name)
            if relative is None:
                raise DatasetError(
                    status.HTTP_400_BAD_REQUEST, f"file_name {file_name!r} points outside the archive's folder"
                )
            member = members.get(posixpath.join(base, relative) if base else relative)
            return None if member is None else (zf.open(member), posixpath.basename(relative))

        return import_datasets(session, info_raw, open_file)


# ------------------------------------------------------------------------------------------ CRUD
def list_datasets(session: Session) -> list[Dataset]:
    return list(session.exec(select(Dataset).order_by(col(Dataset.created_at).desc())).all())


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise DatasetError(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    return dataset


def update_dataset(session: Session, dataset: Dataset, *, name: str | None, description: str | None) -> Dataset:
    if name is not None and name.strip() != dataset.name:
        dataset.name = check_name(session, name, exclude_id=dataset.id)
    if description is not None:
        dataset.description = description.strip()
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise DatasetError(status.HTTP_409_CONFLICT, f"the name {name!r} is already taken") from None
    session.refresh(dataset)
    return dataset


def active_runs_using(session: Session, dataset: Dataset) -> list[Run]:
    rows = session.exec(
        select(Run, TrainConfig)
        .join(TrainConfig, col(Run.config_id) == col(TrainConfig.id))
        .where(col(Run.status).not_in(list(FINISHED_RUN_STATUSES)))
    ).all()
    return [run for run, config in rows if dataset.id in (config.dataset_ids or [])]


def delete_dataset(session: Session, dataset: Dataset) -> None:
    runs = active_runs_using(session, dataset)
    if runs:
        listed = ", ".join(f"{run.name!r} (id {run.id}, {RunStatus(run.status).value})" for run in runs[:5])
        raise DatasetError(
            status.HTTP_409_CONFLICT,
            f"dataset {dataset.name!r} is used by {len(runs)} unfinished run(s): {listed}; "
            "delete it once they have finished",
        )
    folder = dataset_dir(dataset)
    session.delete(dataset)
    session.commit()
    shutil.rmtree(folder, ignore_errors=True)


def iter_file(path: Path, chunk_bytes: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            yield chunk


# -------------------------------------------------------------------------------------- registry
def dataset_info_for(datasets: Iterable[Dataset]) -> dict[str, dict[str, Any]]:
    """LLaMA-Factory's dataset_info.json for a run: name → entry, file_name relative to the run's
    dataset_dir (the worker downloads each file under its run_file_name there)."""
    info: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        info[dataset.name] = dataset_info_entry(
            {"formatting": dataset.formatting, "columns": dataset.columns, "tags": dataset.tags or None},
            file_name=run_file_name(dataset),
        )
    return info


# ---------------------------------------------------------------- token statistics and rendering
def _run_envscript(request: dict[str, Any]) -> dict[str, Any]:
    try:
        answer = train_env.run_script("dataset_preview.py", request, timeout_s=ENVSCRIPT_TIMEOUT_S, what="tokenizing")
    except train_env.TrainEnvMissing as error:
        raise DatasetError(status.HTTP_503_SERVICE_UNAVAILABLE, f"the training environment is missing: {error}") from None
    except train_env.TrainEnvTimeout as error:
        raise DatasetError(status.HTTP_504_GATEWAY_TIMEOUT, str(error)) from None
    except train_env.TrainEnvScriptFailed as error:
        raise DatasetError(status.HTTP_502_BAD_GATEWAY, str(error)) from None
    if "error" in answer:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, answer["error"])
    return answer


# A burst of page views on a cold cache would each start the training env (36 at once under
# bench/bench_load.py): the first asks, the others wait for its cache file.
_templates_lock = threading.Lock()


@lru_cache
def available_templates(train_python: str) -> tuple[str, ...]:
    """LLaMA-Factory's template names: asked once per installed LLaMA-Factory version (importing it
    takes 5–40 s), then read from a cache file in the data dir."""
    with _templates_lock:
        cache = llamafactory_cache_file(train_python, "templates")
        if cache is not None and cache.exists():
            return tuple(json.loads(cache.read_text()))
        names = tuple(_run_envscript({"mode": "templates"})["templates"])
        if cache is not None:
            cache.write_text(json.dumps(names))
        return names


def templates_or_empty() -> list[str]:
    try:
        return list(available_templates(get_settings().train_python))
    except DatasetError:
        return []


def _model_and_template(session: Session, model_id: int | None, template: str | None) -> tuple[ModelEntry, str]:
    if model_id is None:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "choose a model (model_id) whose tokenizer to use")
    model = session.get(ModelEntry, model_id)
    if model is None:
        raise DatasetError(status.HTTP_404_NOT_FOUND, f"model {model_id} not found")
    template = (template or model.suggested_template or "").strip()
    if not template:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, "choose a LLaMA-Factory template (template)")
    return model, template


def _entry(dataset: Dataset) -> dict[str, Any]:
    return dataset_info_entry(
        {"formatting": dataset.formatting, "columns": dataset.columns, "tags": dataset.tags or None},
        file_name=f"data.{dataset.file_kind}",
    )


def read_row(dataset: Dataset, row: int) -> Any:
    """Row `row` (1-based) of the dataset, whole: from preview.json for the first rows, else read
    from the stored file up to that row and no further."""
    if not 1 <= row <= dataset.row_count:
        raise DatasetError(status.HTTP_400_BAD_REQUEST, f"row must be between 1 and {dataset.row_count:,}")
    first = json.loads((dataset_dir(dataset) / "preview.json").read_text(encoding="utf-8"))
    if row <= len(first):
        return first[row - 1]
    rows = _jsonl_rows(data_file(dataset)) if dataset.file_kind == "jsonl" else _json_array_rows(data_file(dataset))
    for number, value in enumerate(rows, 1):
        if number == row:
            return value
    raise DatasetError(status.HTTP_400_BAD_REQUEST, f"row must be between 1 and {dataset.row_count:,}")


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _json_array_rows(path: Path) -> Iterator[Any]:
    """The items of a JSON array file, decoded one by one from a sliding buffer (the file was
    validated at upload: a decode error before its end only means the item is not all read)."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as handle:
        buffer = handle.read(ROW_READ_CHARS)
        position = buffer.index("[") + 1
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,":
                position += 1
            if position < len(buffer) and buffer[position] == "]":
                return
            try:
                if position == len(buffer):
                    raise json.JSONDecodeError("need more", buffer, position)
                value, position = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                more = handle.read(ROW_READ_CHARS)
                if not more:
                    return
                buffer, position = buffer[position:] + more, 0
                continue
            yield value


def render_row(
    session: Session, dataset: Dataset, *, model_id: int | None, template: str | None, row: int, cutoff_len: int
) -> dict[str, Any]:
    """Row `row` (1-based, any row of the file) as the model sees it through the template."""
    model, template = _model_and_template(session, model_id, template)
    answer = _run_envscript({
        "mode": "encode", "model_path": model.path, "template": template, "cutoff_len": cutoff_len,
        "dataset_attr": _entry(dataset), "rows": [read_row(dataset, row)], "render": 0,
    })
    return {"model_id": model.id, "template": template, "row": row, "cutoff_len": cutoff_len,
            "rendered": answer["rendered"]}


def _summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, int(round(p * len(ordered))) - 1))]

    return {"count": len(ordered), "min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1),
            "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1]}


def _histogram(values: list[int], bins: int = 30) -> dict[str, list[float]]:
    if not values:
        return {"edges": [], "counts": []}
    top = max(values)
    width = max(1, -(-top // bins))
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, value // width)] += 1
    return {"edges": [i * width for i in range(bins + 1)], "counts": counts}


def token_stats(
    session: Session, dataset: Dataset, *, model_id: int | None, template: str | None, cutoff_len: int
) -> dict[str, Any]:
    """Token lengths over the stored sample, computed once per model+template (cached in the
    report); the truncated share is derived for any cutoff_len."""
    model, template = _model_and_template(session, model_id, template)
    key = f"{model.id}:{template}"
    cache = dataset.report.get("token_stats", {})
    if key not in cache:
        lines = (dataset_dir(dataset) / "sample.jsonl").read_text(encoding="utf-8").splitlines()
        sample = [json.loads(line)["data"] for line in lines]
        answer = _run_envscript({
            "mode": "encode", "model_path": model.path, "template": template, "cutoff_len": cutoff_len,
            "dataset_attr": _entry(dataset), "rows": sample, "render": None,
        })
        cache = {**cache, key: {"lengths": answer["lengths"], "computed_at": utcnow().isoformat()}}
        dataset.report = {**dataset.report, "token_stats": cache}  # a new dict: the JSON column notices
        session.add(dataset)
        session.commit()
        session.refresh(dataset)
    lengths = [pair for pair in cache[key]["lengths"] if pair is not None]
    prompt = [p for p, _ in lengths]
    response = [r for _, r in lengths]
    total = [p + r for p, r in lengths]
    truncated = sum(1 for t in total if t > cutoff_len)
    return {
        "model_id": model.id, "model_name": model.name, "template": template, "cutoff_len": cutoff_len,
        "sampled_rows": len(cache[key]["lengths"]), "dropped_rows": len(cache[key]["lengths"]) - len(lengths),
        "row_count": dataset.row_count,
        "prompt_tokens": _summary(prompt), "response_tokens": _summary(response), "total_tokens": _summary(total),
        "histogram": _histogram(total),
        "truncated_rows": truncated, "truncated_share": round(truncated / len(total), 4) if total else 0.0,
        "computed_at": cache[key]["computed_at"],
    }
