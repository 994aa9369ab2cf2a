"""Datasets: the upload pipeline (stream → validate → atomic rename), the registry for runs,
import of an existing dataset_info.json, CRUD, and token statistics through LLaMA-Factory.
The multipart body of an upload is parsed in the web layer (app/web/uploads.py), which feeds the
file part into an IncomingFile here.

On disk, a dataset is the folder `datasets/<id>/` of the data dir:
  data.<json|jsonl|txt>  the uploaded bytes (a UTF-8 BOM removed: `datasets` cannot read it)
  preview.json        the first rows, whole (the preview rendered through a template reads them)
  sample.jsonl        a reservoir sample of rows (token statistics are computed over it)
Everything is first written into a private folder under `datasets/.incoming/` and renamed into
place in one step only after validation passed and the database row exists; on any error the
folder is deleted, so a dataset is either complete or absent.
"""

from __future__ import annotations

import errno
import json
import posixpath
import re
import shutil
import threading
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from app.errors import DomainError
from app.models import Dataset, ModelEntry, Run, RunStatus, TrainConfig
from app.models.base import utcnow
from app.models.run import FINISHED_RUN_STATUSES
from app.models.dataset import DatasetKind
from app.services.dataset_ingest import (
    KINDS,
    TAG_NAMES,
    DatasetFormatError,
    DatasetIngest,
    DatasetTooLarge,
    IngestReport,
    column_roles,
    dataset_info_entry,
    refuse_unusable,
)
from app.services.llamafactory_params import llamafactory_cache_file
from app.settings import Settings, get_settings
from workers import train_env

PREVIEW_ROWS = 10
PREVIEW_CELL_CHARS = 2000  # a preview cell in the database is clipped; preview.json keeps the row whole
SAMPLE_ROWS = 2000
ROW_READ_CHARS = 1 << 20  # a row beyond the preview is read from the file this many characters at a time
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "1–100 letters, digits, '_', '.' or '-', starting with a letter or digit"
FORMATTINGS = ("auto", "alpaca", "sharegpt")
UPLOAD_KINDS = ("auto", *KINDS)
# Upload fields that steer the validation: they must arrive before the file.
STEERING_FIELDS = ("kind", "formatting", "columns", "tags")
ENVSCRIPT_TIMEOUT_S = 300


class DatasetError(DomainError):
    """A refusal about a dataset: its message is said as-is, with its status (400 unless said)."""


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
        raise DatasetError(f"invalid name {name!r}: use {NAME_RULE}")
    taken = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if taken is not None and taken.id != exclude_id:
        raise DatasetError(f"the name {name!r} is already taken by dataset {taken.id}", status_code=409)
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
            raise DatasetError(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise DatasetError(f"{what} nests too deeply to be a mapping") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{what} must be a JSON object")
    allowed = set(allowed)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise DatasetError(f"unknown {what} {unknown}: expected some of {sorted(allowed)}")
    mapping: dict[str, str | None] = {}
    for role, key in raw.items():
        if key is not None and not isinstance(key, str):
            raise DatasetError(f"{what}[{role!r}] must be a key name or null")
        mapping[role] = key or None
    return mapping


def columns_allowed(formatting: str, kind: str = "auto") -> set[str]:
    """The column roles an upload of this formatting and kind ("auto": any) may map."""
    kinds = KINDS if kind == "auto" else (kind,)
    formattings = ("alpaca", "sharegpt") if formatting == "auto" else (formatting,)
    return set().union(*(column_roles(k, f) for k in kinds for f in formattings
                         if not (k == "pretrain" and f == "sharegpt")))


@dataclass
class UploadOptions:
    formatting: str = "auto"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=dict)
    kind: str = "auto"

    @classmethod
    def parse(cls, formatting: str | None, columns: Any, tags: Any, *, kind: str | None = None) -> UploadOptions:
        formatting = (formatting or "auto").strip().lower()
        if formatting not in FORMATTINGS:
            raise DatasetError(f"formatting must be one of {', '.join(FORMATTINGS)}, not {formatting!r}")
        kind = (kind or "auto").strip().lower()
        if kind not in UPLOAD_KINDS:
            raise DatasetError(f"kind must be one of {', '.join(UPLOAD_KINDS)}, not {kind!r}")
        if kind == "pretrain" and formatting == "sharegpt":
            raise DatasetError("pre-training text has no conversations: its formatting is alpaca (a 'text' column)")
        parsed_columns = parse_mapping(columns, "columns", columns_allowed(formatting, kind))
        if formatting == "auto" and parsed_columns:
            has_alpaca = bool(set(parsed_columns) & {"prompt", "query", "response", "history"})
            if has_alpaca and "messages" in parsed_columns:
                raise DatasetError("columns mix alpaca (prompt/query/response/history) and sharegpt (messages) roles")
        return cls(formatting, parsed_columns, parse_mapping(tags, "tags", TAG_NAMES), kind)


def _format_error(exc: DatasetFormatError) -> DatasetError:
    if isinstance(exc, DatasetTooLarge) and exc.row is None:
        return DatasetError(exc.message, status_code=413)
    return DatasetError(exc.message)


def _storage_error(exc: OSError) -> DatasetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DatasetError("the server's disk is full: the upload was not stored", status_code=507)
    return DatasetError(f"could not write the upload ({exc.strerror or exc}); nothing was stored", status_code=500)


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
    """One file on its way in: the streaming validator reads its bytes and hands on the content (less
    a BOM) to a private folder in the data dir. Nothing is visible until `register` renames the
    folder into the registry. `write` and `finish` refuse with a DatasetError."""

    def __init__(self, options: UploadOptions, original_filename: str, settings: Settings | None = None):
        settings = settings or get_settings()
        self.options = options
        self.original_filename = original_filename
        is_text = original_filename.lower().endswith(".txt")  # plain text is never guessed from its bytes
        self.folder = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.path("datasets", ".incoming")))
        self._partial = self.folder / "data.part"
        self._file: BinaryIO | None = open(self._partial, "wb")  # noqa: SIM115 (closed in finish/discard)
        self.size = 0
        self.report: IngestReport | None = None
        try:
            self.ingest = DatasetIngest(
                container="txt" if is_text else "auto",
                kind=options.kind,
                formatting=options.formatting,
                columns=options.columns,
                tags={k: v for k, v in options.tags.items() if v is not None},
                sink=self._write,
                max_total_bytes=settings.max_upload_bytes,
                preview_rows=PREVIEW_ROWS,
                sample_size=SAMPLE_ROWS,
            )
        except ValueError as exc:  # options that cannot go together (a .txt file that is not pre-training)
            self.discard()
            raise DatasetError(str(exc)) from None

    def write(self, data: bytes) -> None:
        try:
            self.ingest.feed(data)
        except DatasetFormatError as exc:
            raise _format_error(exc) from None
        except ValueError as exc:  # columns that do not fit the detected format
            raise DatasetError(str(exc)) from None
        except OSError as exc:
            raise _storage_error(exc) from None

    def _write(self, content: bytes) -> None:
        self.size += len(content)
        self._file.write(content)

    def finish(self) -> IngestReport:
        """Validate what arrived; on success the folder holds data, preview and sample files."""
        try:
            report = self.ingest.finish()
            self._file.close()
            self._file = None
            refuse_unusable(report)
            self._partial.rename(self.folder / f"data.{report.container}")
            (self.folder / "preview.json").write_text(json.dumps(report.preview, ensure_ascii=False))
            with open(self.folder / "sample.jsonl", "w", encoding="utf-8") as sample:
                for item in report.sample:
                    sample.write(json.dumps(item, ensure_ascii=False) + "\n")
        except DatasetFormatError as exc:
            raise _format_error(exc) from None
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        except OSError as exc:
            raise _storage_error(exc) from None
        self.report = report
        return report

    @property
    def sha256(self) -> str:
        return self.ingest.sha256

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.folder, ignore_errors=True)


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
        kind=DatasetKind(report.kind),
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


def _refuse_duplicates(session: Session, items: list[tuple[IncomingFile, str, str]]) -> None:
    """Refuse a name or a content already registered, or sent twice, before anything is written."""
    sent: dict[str, str] = {}
    for incoming, name, _ in items:
        existing = session.exec(select(Dataset).where(Dataset.sha256 == incoming.sha256)).first()
        if existing is not None:
            raise DatasetError(
                f"this file is already uploaded as dataset {existing.name!r} (id {existing.id})", status_code=409
            )
        if incoming.sha256 in sent:
            raise DatasetError(f"dataset {name!r} has the same content as {sent[incoming.sha256]!r}", status_code=409)
        sent[incoming.sha256] = name
        check_name(session, name)


def register(session: Session, items: list[tuple[IncomingFile, str, str]]) -> list[Dataset]:
    """Insert the rows and move each validated folder into place, all or nothing.
    `items`: (incoming file after `finish`, name, description)."""
    _refuse_duplicates(session, items)
    placed: list[Path] = []
    datasets: list[Dataset] = []
    try:
        for incoming, name, description in items:
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
        raise DatasetError("a dataset with this name or content was just added", status_code=409) from None
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
    """Read a file object in chunks into a validated IncomingFile (import, the demo, the CLI-less
    paths): the same feed as an upload's."""
    incoming = IncomingFile(options, original_filename)
    try:
        while chunk := stream.read(chunk_bytes):
            incoming.write(chunk)
        incoming.finish()
    except OSError as exc:  # reading the source failed
        incoming.discard()
        raise _storage_error(exc) from None
    except BaseException:
        incoming.discard()
        raise
    return incoming


# ---------------------------------------------------------------------------------------- import
@dataclass
class ImportResult:
    registered: list[Dataset]
    skipped: list[dict[str, str]]


def entry_kind(entry: dict[str, Any]) -> str:
    """The kind of a dataset_info.json entry, read with LLaMA-Factory's keys: `ranking: true`, a
    `kto_tag` column, or an alpaca entry whose columns read only a prompt (pre-training text)."""
    columns = entry.get("columns") or {}
    if entry.get("ranking"):
        return "ranking"
    if columns.get("kto_tag"):
        return "kto"
    if entry.get("formatting", "alpaca") == "alpaca" and columns and not set(columns) - {"prompt"}:
        return "pretrain"
    if str(entry.get("file_name", "")).lower().endswith(".txt"):
        return "pretrain"
    return "sft"


def _skip_reason(entry: dict[str, Any]) -> str | None:
    """Why an entry of dataset_info.json is not a dataset from a local file we register (None: it is)."""
    if not isinstance(entry, dict):
        return "the entry is not an object"
    if "file_name" not in entry:
        source = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                       if k in entry), None)
        return f"loaded from {source}, not a local file" if source else "no file_name"
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        return f"formatting {formatting!r} is not supported (alpaca or sharegpt)"
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        return "columns is not an object"
    if set(columns) & {"images", "videos", "audios"}:
        return "a multimodal dataset: media files are not imported"
    extensions = (".json", ".jsonl", ".txt") if entry_kind(entry) == "pretrain" else (".json", ".jsonl")
    if not str(entry["file_name"]).lower().endswith(extensions):
        return f"file_name is not a {' or '.join(extensions)} file"
    return None


def _entry_options(name: str, entry: dict[str, Any]) -> UploadOptions:
    formatting = entry.get("formatting", "alpaca")
    try:
        return UploadOptions.parse(formatting, entry.get("columns"), entry.get("tags"), kind=entry_kind(entry))
    except DatasetError as exc:
        raise DatasetError(f"dataset {name!r}: {exc.detail}", status_code=exc.status_code) from None


def _parse_dataset_info(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"dataset_info.json is not valid JSON: {exc}") from None
    except RecursionError:
        raise DatasetError("dataset_info.json nests too deeply to be a list of"
                                                        " dataset entries") from None
    if not isinstance(info, dict) or not info:
        raise DatasetError("dataset_info.json must be an object of dataset entries")
    try:  # Python's json lets a lone surrogate escape (\udc00) through: it is not text
        json.dumps(info, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        after = exc.object[max(0, exc.start - 40):exc.start]
        raise DatasetError("dataset_info.json holds an invalid Unicode escape"
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
    """Register every dataset from a file of a dataset_info.json (SFT, ranking, KTO, pre-training),
    all or nothing. `open_file(file_name)`
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
                raise DatasetError(f"dataset {name!r} appears twice")
            options = _entry_options(name, entry)
            opened = open_file(str(entry["file_name"]))
            if opened is None:
                raise DatasetError(f"dataset {name!r}: the file {entry['file_name']!r} was not sent")
            stream, display = opened
            with stream:
                try:
                    item = ingest_file(stream, options, display)
                except DatasetError as exc:
                    raise DatasetError(f"dataset {name!r}: {exc.detail}", status_code=exc.status_code) from None
            incoming.append((item, name, str(entry.get("description", ""))[:2000]))
        if not incoming:
            raise DatasetError("dataset_info.json holds no dataset from a local file")
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
        raise DatasetError("the archive is not a zip file") from None
    with zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            safe = _safe_relative(info.filename)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if safe is None or is_link:
                raise DatasetError(
                    f"the zip entry {info.filename!r} points outside the archive's folder; nothing was imported"
                )
            if not info.is_dir():
                members[safe] = info
        infos = [path for path in members if posixpath.basename(path) == "dataset_info.json"]
        if len(infos) != 1:
            found = f" (found {len(infos)})" if infos else ""
            raise DatasetError(f"the zip must hold exactly one dataset_info.json{found}")
        base = posixpath.dirname(infos[0])
        info_raw = zf.read(members[infos[0]])

        def open_file(file_name: str) -> tuple[BinaryIO, str] | None:
            relative = _safe_relative(file_name)
            if relative is None:
                raise DatasetError(f"file_name {file_name!r} points outside the archive's folder")
            member = members.get(posixpath.join(base, relative) if base else relative)
            return None if member is None else (zf.open(member), posixpath.basename(relative))

        return import_datasets(session, info_raw, open_file)


# ------------------------------------------------------------------------------------------ CRUD
def list_datasets(session: Session, kind: DatasetKind | None = None) -> list[Dataset]:
    query = select(Dataset).order_by(col(Dataset.created_at).desc())
    if kind is not None:
        query = query.where(Dataset.kind == kind)
    return list(session.exec(query).all())


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise DatasetError(f"dataset {dataset_id} not found", status_code=404)
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
        raise DatasetError(f"the name {name!r} is already taken", status_code=409) from None
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
        raise DatasetError(f"dataset {dataset.name!r} is used by {len(runs)} unfinished run(s): {listed}; "
            "delete it once they have finished", status_code=409)
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
        info[dataset.name] = dataset_info_entry(_attributes(dataset), file_name=run_file_name(dataset))
    return info


def _attributes(dataset: Dataset) -> dict[str, Any]:
    return {"kind": dataset.kind, "formatting": dataset.formatting, "columns": dataset.columns,
            "tags": dataset.tags or None}


# ---------------------------------------------------------------- token statistics and rendering
def _run_envscript(request: dict[str, Any]) -> dict[str, Any]:
    try:
        answer = train_env.run_script("dataset_preview.py", request, timeout_s=ENVSCRIPT_TIMEOUT_S, what="tokenizing")
    except train_env.TrainEnvMissing as error:
        raise DatasetError(f"the training environment is missing: {error}", status_code=503) from None
    except train_env.TrainEnvTimeout as error:
        raise DatasetError(str(error), status_code=504) from None
    except train_env.TrainEnvScriptFailed as error:
        raise DatasetError(str(error), status_code=502) from None
    if "error" in answer:
        raise DatasetError(answer["error"])
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
        raise DatasetError("choose a model (model_id) whose tokenizer to use")
    model = session.get(ModelEntry, model_id)
    if model is None:
        raise DatasetError(f"model {model_id} not found", status_code=404)
    template = (template or model.suggested_template or "").strip()
    if not template:
        raise DatasetError("choose a LLaMA-Factory template (template)")
    return model, template


def _entry(dataset: Dataset) -> dict[str, Any]:
    return dataset_info_entry(_attributes(dataset), file_name=f"data.{dataset.file_kind}")


def read_row(dataset: Dataset, row: int) -> Any:
    """Row `row` (1-based) of the dataset, whole: from preview.json for the first rows, else read
    from the stored file up to that row and no further."""
    if not 1 <= row <= dataset.row_count:
        raise DatasetError(f"row must be between 1 and {dataset.row_count:,}")
    first = json.loads((dataset_dir(dataset) / "preview.json").read_text(encoding="utf-8"))
    if row <= len(first):
        return first[row - 1]
    readers = {"jsonl": _jsonl_rows, "json": _json_array_rows, "txt": _text_rows}
    rows = readers[dataset.file_kind](data_file(dataset))
    for number, value in enumerate(rows, 1):
        if number == row:
            return value
    raise DatasetError(f"row must be between 1 and {dataset.row_count:,}")


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _text_rows(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a plain text file as `datasets`' text loader cuts them (str.splitlines)."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            for piece in line.splitlines():
                yield {"text": piece}


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
        "kind": dataset.kind, "dataset_attr": _entry(dataset), "rows": [read_row(dataset, row)], "render": 0,
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
    report); the truncated share is derived for any cutoff_len. What counts is what LLaMA-Factory
    trains on: the response (SFT, KTO), chosen + rejected (ranking: the longer of the two sequences
    is what cutoff_len truncates), the whole text (pre-training)."""
    model, template = _model_and_template(session, model_id, template)
    key = f"{model.id}:{template}"
    cache = dataset.report.get("token_stats", {})
    if key not in cache:
        lines = (dataset_dir(dataset) / "sample.jsonl").read_text(encoding="utf-8").splitlines()
        sample = [json.loads(line)["data"] for line in lines]
        answer = _run_envscript({
            "mode": "encode", "model_path": model.path, "template": template, "cutoff_len": cutoff_len,
            "kind": dataset.kind, "dataset_attr": _entry(dataset), "rows": sample, "render": None,
        })
        cache = {**cache, key: {"lengths": answer["lengths"], "computed_at": utcnow().isoformat()}}
        dataset.report = {**dataset.report, "token_stats": cache}  # a new dict: the JSON column notices
        session.add(dataset)
        session.commit()
        session.refresh(dataset)
    lengths = [counts for counts in cache[key]["lengths"] if counts is not None]
    prompt = [counts[0] for counts in lengths]
    response = [sum(counts[1:]) for counts in lengths]
    total = [counts[0] + max(counts[1:]) for counts in lengths]
    truncated = sum(1 for t in total if t > cutoff_len)
    stats = {
        "model_id": model.id, "model_name": model.name, "template": template, "cutoff_len": cutoff_len,
        "kind": dataset.kind,
        "sampled_rows": len(cache[key]["lengths"]), "dropped_rows": len(cache[key]["lengths"]) - len(lengths),
        "row_count": dataset.row_count,
        "prompt_tokens": _summary(prompt), "response_tokens": _summary(response), "total_tokens": _summary(total),
        "histogram": _histogram(total),
        "truncated_rows": truncated, "truncated_share": round(truncated / len(total), 4) if total else 0.0,
        "computed_at": cache[key]["computed_at"],
    }
    if dataset.kind == DatasetKind.ranking:
        stats["chosen_tokens"] = _summary([counts[1] for counts in lengths])
        stats["rejected_tokens"] = _summary([counts[2] for counts in lengths])
    return stats
