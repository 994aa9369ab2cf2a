"""The artifact store: a run's folders (each checkpoint-N and the final adapter) as manifests of
content-addressed blobs, kept under the data dir or in an S3-compatible bucket.

Workers never reach the store themselves. They upload each blob to the panel, resumably: the bytes
are staged under the data dir at the offset the panel reports, checked against their sha256, then
committed to the store; once every blob is in, the worker records the folder's manifest. A small
blob is uploaded by its address (the worker hashes it first: a blob the store holds is not sent
again); a big one through an upload session, which the panel hashes as the bytes arrive and the
worker commits under the sha256 it computed while sending. The database says which blobs
manifests reference: any other blob is garbage.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, urlsplit

from sqlmodel import Session, col, delete, select

from app.errors import Conflict, DomainError, Invalid, NotFound, Unavailable
from app.models import ArtifactFile, Run, RunArtifact, RunMetric
from app.models.deployment import ACTIVE_STATUSES, Deployment
from app.settings import get_settings
from app.wire import (
    ADAPTER_ARTIFACT,
    CHECKPOINT_COMPLETE_MARKER,
    CHECKPOINT_PATTERN,
    EXPORT_ARTIFACT_PATTERN,
    SHA256_PATTERN,
    ArtifactManifest,
    ArtifactRecord,
    FileEntry,
    UploadSession,
    UploadState,
    checkpoint_step,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(SHA256_PATTERN)
# Recording a manifest ("every blob is in the store", then the insert) and collecting garbage
# ("no manifest references it", then the delete) must not interleave. The panel is one process.
_references = threading.Lock()


class ArtifactError(DomainError):
    """A refused transfer or record; a refusal the worker acts on carries its upload state (`offset`,
    `complete`) or the blobs it must upload first (`missing`) in `extra`."""


class ArtifactNotFound(ArtifactError, NotFound):
    pass


class ArtifactConflict(ArtifactError, Conflict):
    pass


class ArtifactInvalid(ArtifactError, Invalid):
    pass


class ArtifactStoreUnavailable(ArtifactError, Unavailable):
    pass


# --------------------------------------------------------------------------- the two stores
@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    modified_at: float  # POSIX seconds


class BlobStore(Protocol):
    def size(self, sha256: str) -> int | None: ...

    def put(self, sha256: str, staged: Path) -> None:
        """Take in a verified file (and remove it from where it was staged)."""

    def open(self, sha256: str, start: int = 0) -> Any:
        """A context manager yielding a readable binary file positioned at `start`."""

    def export(self, sha256: str, destination: Path) -> None: ...

    def delete(self, sha256: str) -> None: ...

    def blobs(self) -> Iterator[StoredBlob]: ...


class LocalStore:
    """Blobs under `<data dir>/artifacts/blobs/<sha[:2]>/<sha>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def size(self, sha256: str) -> int | None:
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, sha256: str, staged: Path) -> None:
        target = self._path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # staging is under the data dir too: a rename

    @contextmanager
    def open(self, sha256: str, start: int = 0) -> Iterator[BinaryIO]:
        try:
            blob = self._path(sha256).open("rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"blob {sha256} is not in the store") from None
        with blob:
            blob.seek(start)
            yield blob

    def export(self, sha256: str, destination: Path) -> None:
        # A hard link costs nothing (what the panel materializes is only read); another
        # filesystem gets a copy.
        source = self._path(sha256)
        try:
            os.link(source, destination)
        except FileNotFoundError:
            raise ArtifactNotFound(f"blob {sha256} is not in the store") from None
        except OSError:
            shutil.copyfile(source, destination)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def blobs(self) -> Iterator[StoredBlob]:
        if not self.root.is_dir():
            return
        with os.scandir(self.root) as shards:
            for shard in shards:
                if shard.is_dir():
                    with os.scandir(shard.path) as entries:
                        yield from (StoredBlob(entry.name, entry.stat().st_mtime)
                                    for entry in entries if _SHA256.match(entry.name))


class S3Store:
    """Blobs at `<prefix>/blobs/<sha>` in an S3-compatible bucket, through boto3 (which reads the
    AWS_* credentials and does multipart uploads)."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"TUNEBOARD_ARTIFACT_STORE must look like s3://bucket/prefix, not {url!r}")
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/blobs/" if prefix else "blobs/"
        endpoint_url = options.get("endpoint_url")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=options.get("region"),
            # Self-hosted S3 (MinIO, Ceph, …) is addressed by path, not by a bucket subdomain.
            config=Config(s3={"addressing_style": "path"}) if endpoint_url else None,
        )

    def _key(self, sha256: str) -> str:
        return self.prefix + sha256

    @contextmanager
    def _errors(self, sha256: str = "") -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise ArtifactNotFound(f"blob {sha256} is not in the store") from None
            raise ArtifactStoreUnavailable(f"artifact store: {error}") from error
        except BotoCoreError as error:
            raise ArtifactStoreUnavailable(f"artifact store: {error}") from error

    def size(self, sha256: str) -> int | None:
        try:
            with self._errors(sha256):
                return self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"]
        except ArtifactNotFound:
            return None

    def put(self, sha256: str, staged: Path) -> None:
        with self._errors(sha256):
            self.client.upload_file(str(staged), self.bucket, self._key(sha256))
        staged.unlink()

    @contextmanager
    def open(self, sha256: str, start: int = 0) -> Iterator[BinaryIO]:
        with self._errors(sha256):
            ranged = {"Range": f"bytes={start}-"} if start else {}
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256), **ranged)["Body"]
        try:
            yield body
        finally:
            body.close()

    def export(self, sha256: str, destination: Path) -> None:
        with self._errors(sha256):
            self.client.download_file(self.bucket, self._key(sha256), str(destination))

    def delete(self, sha256: str) -> None:
        with self._errors(sha256):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(sha256))

    def blobs(self) -> Iterator[StoredBlob]:
        with self._errors():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"].removeprefix(self.prefix)
                    if _SHA256.match(name):
                        yield StoredBlob(name, item["LastModified"].timestamp())


def get_store() -> BlobStore:
    settings = get_settings()
    return _store(settings.artifact_store, settings.resolved_data_dir)


@lru_cache
def _store(spec: str, data_dir: Path) -> BlobStore:
    return S3Store(spec) if spec else LocalStore(data_dir / "artifacts" / "blobs")


def blob_size(sha256: str) -> int | None:
    """The blob's length, or None when the store does not hold it."""
    return get_store().size(sha256)


def stored_blob_size(sha256: str) -> int:
    """The length of a blob the store must hold (ArtifactNotFound otherwise)."""
    size = blob_size(sha256)
    if size is None:
        raise ArtifactNotFound(f"blob {sha256} is not in the store")
    return size


def open_blob(sha256: str, start: int = 0) -> Any:
    """`with open_blob(sha) as blob:` a readable binary file of the blob from byte `start`."""
    return get_store().open(sha256, start)


# --------------------------------------------------------------------------- resumable uploads
def _staging_path(name: str) -> Path:
    """Where a blob's upload (`name`: its sha256) or an upload session (its id) is staged."""
    return get_settings().path("artifacts", "staging") / name


def upload_state(sha256: str) -> UploadState:
    size = blob_size(sha256)
    if size is not None:
        return UploadState(offset=size, complete=True)
    try:
        return UploadState(offset=_staging_path(sha256).stat().st_size, complete=False)
    except FileNotFoundError:
        return UploadState(offset=0, complete=False)


def _lock_staged(path: Path, *, create: bool) -> BinaryIO | None:
    """The staging file opened for appending and locked for this request alone; None while another
    request holds it (or once that one has committed or discarded it). FileNotFoundError when it
    is not there and not to be created."""
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
    staged = os.fdopen(os.open(path, flags, 0o666), "ab", buffering=0)
    try:
        fcntl.flock(staged.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The lock may be on a file another request has meanwhile committed or discarded.
        if os.fstat(staged.fileno()).st_ino != os.stat(path).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        staged.close()
        return None
    return staged


def _lock_staging(sha256: str) -> BinaryIO:
    """The blob's staging file, opened for appending and locked for this upload alone."""
    staged = _lock_staged(_staging_path(sha256), create=True)
    if staged is None:
        raise ArtifactConflict(f"blob {sha256} is being uploaded by another request").with_extra(
            **upload_state(sha256).model_dump()
        )
    return staged


def _append(staged: BinaryIO, digest: Any, chunks: list[bytes]) -> None:
    block = b"".join(chunks)
    staged.write(block)
    if digest is not None:
        digest.update(block)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


async def _append_stream(staged: BinaryIO, digest: Any, chunks: AsyncIterable[bytes], received: int, size: int) -> int:
    """Append the chunks, a MiB at a time, hashed and written off the event loop while the next
    MiB comes in; returns the staged length. What arrived before the sender went away is kept."""
    # The chunks are joined in the thread too: the event loop only collects them.
    block: list[bytes] = []
    block_bytes = 0
    writing: asyncio.Future | None = None
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > size:
                raise ArtifactInvalid(f"more than the {size} bytes announced")
            block.append(chunk)
            block_bytes += len(chunk)
            if block_bytes >= CHUNK_BYTES:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(_append, staged, digest, block))
                block, block_bytes = [], 0
    finally:
        if writing is not None:
            await writing
        if block and received <= size:
            await asyncio.to_thread(_append, staged, digest, block)
    return received


async def receive_blob(sha256: str, offset: int, size: int, chunks: AsyncIterable[bytes]) -> UploadState:
    """Append `chunks` to the blob's staged bytes at `offset` (which must be how many are staged:
    else a 409 with the state), and once `size` bytes are staged, check their sha256 and commit
    them to the store (a mismatch discards them: 422). What arrives before the sender goes away
    stays staged, for a resume."""
    if offset > size:
        raise ArtifactInvalid(f"offset {offset} is past the blob's size {size}")
    store = get_store()
    staged_path = _staging_path(sha256)
    with await asyncio.to_thread(_lock_staging, sha256) as staged:
        if await asyncio.to_thread(store.size, sha256) is not None:
            staged_path.unlink()
            return UploadState(offset=size, complete=True)
        current = os.fstat(staged.fileno()).st_size
        if current > size:  # staged under another size claim: these bytes cannot be this blob
            staged.truncate(0)
            current = 0
        if offset != current:
            raise ArtifactConflict(f"blob {sha256} has {current} bytes staged, not {offset}").with_extra(
                offset=current, complete=False)
        # Hashed as it streams in; a resumed upload is hashed from disk once complete.
        digest = hashlib.sha256() if current == 0 else None
        try:
            received = await _append_stream(staged, digest, chunks, current, size)
        except ArtifactInvalid as error:
            staged_path.unlink()
            raise ArtifactInvalid(f"blob {sha256}: {error.detail}: discarded") from None
        if received < size:
            return UploadState(offset=received, complete=False)
        actual = digest.hexdigest() if digest is not None else await asyncio.to_thread(_file_sha256, staged_path)
        if actual != sha256:
            staged_path.unlink()
            raise ArtifactInvalid(f"the bytes uploaded as blob {sha256} hash to {actual}: discarded")
        await asyncio.to_thread(store.put, sha256, staged_path)
    return UploadState(offset=size, complete=True)


# --------------------------------------------------------------------------- upload sessions
# The id carries the size announced: a session outlives a panel restart with its staged bytes alone.
UPLOAD_ID_PATTERN = r"^[0-9a-f]{32}-[0-9]+$"


class _StagedDigest:
    """The sha256 of an upload session's first `length` staged bytes."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.length = 0

    def update(self, block: bytes) -> None:
        self.hash.update(block)
        self.length += len(block)


# Each open session's digest, kept across its PATCHes so that the commit reads nothing again.
_session_digests: dict[str, _StagedDigest] = {}


def open_session(size: int) -> UploadSession:
    upload_id = f"{uuid.uuid4().hex}-{size}"
    _staging_path(upload_id).touch(exist_ok=False)
    _session_digests[upload_id] = _StagedDigest()
    return UploadSession(upload_id=upload_id, offset=0)


def _session_size(upload_id: str) -> int:
    return int(upload_id.rsplit("-", 1)[1])


def _session_gone(upload_id: str) -> ArtifactNotFound:
    return ArtifactNotFound(f"upload {upload_id} is not open: committed, discarded or collected while idle")


def session_state(upload_id: str) -> UploadState:
    try:
        return UploadState(offset=_staging_path(upload_id).stat().st_size, complete=False)
    except FileNotFoundError:
        raise _session_gone(upload_id) from None


def _lock_session(upload_id: str) -> BinaryIO:
    try:
        staged = _lock_staged(_staging_path(upload_id), create=False)
    except FileNotFoundError:
        raise _session_gone(upload_id) from None
    if staged is None:
        raise ArtifactConflict(f"upload {upload_id} is being written by another request").with_extra(
            **session_state(upload_id).model_dump())
    return staged


def _session_digest(upload_id: str, length: int) -> _StagedDigest:
    """The digest of the session's `length` staged bytes (its lock held): the one kept in memory,
    else (the panel restarted, a write failed) recomputed from the staged bytes."""
    digest = _session_digests.get(upload_id)
    if digest is None or digest.length != length:
        digest = _StagedDigest()
        with _staging_path(upload_id).open("rb") as staged:
            while block := staged.read(CHUNK_BYTES):
                digest.update(block)
        _session_digests[upload_id] = digest
    return digest


def _discard_session(upload_id: str) -> None:
    _staging_path(upload_id).unlink(missing_ok=True)
    _session_digests.pop(upload_id, None)


async def receive_session(upload_id: str, offset: int, chunks: AsyncIterable[bytes]) -> UploadState:
    """Append `chunks`, hashed as they arrive, to the session's staged bytes at `offset` (which must
    be how many are staged: else a 409 with the state). What arrives before the sender goes away
    stays staged, for a resume; more than the size announced discards the session (422)."""
    size = _session_size(upload_id)
    with await asyncio.to_thread(_lock_session, upload_id) as staged:
        current = os.fstat(staged.fileno()).st_size
        if offset != current:
            raise ArtifactConflict(f"upload {upload_id} has {current} bytes staged, not {offset}").with_extra(
                offset=current, complete=False)
        digest = await asyncio.to_thread(_session_digest, upload_id, current)
        try:
            received = await _append_stream(staged, digest, chunks, current, size)
        except ArtifactInvalid as error:
            _discard_session(upload_id)
            raise ArtifactInvalid(f"upload {upload_id}: {error.detail}: discarded") from None
    return UploadState(offset=received, complete=False)


def commit_session(upload_id: str, sha256: str) -> UploadState:
    """Put the session's bytes, all staged (else a 409 with the state), into the store as blob
    `sha256` if they hash to it (else they are discarded: 422). A blob the store holds already
    makes them redundant: discarded, and the blob is complete."""
    size = _session_size(upload_id)
    store = get_store()
    with _lock_session(upload_id) as staged:
        current = os.fstat(staged.fileno()).st_size
        if current != size:
            raise ArtifactConflict(f"upload {upload_id} has {current} of its {size} bytes staged").with_extra(
                offset=current, complete=False)
        if store.size(sha256) is None:
            actual = _session_digest(upload_id, current).hash.hexdigest()
            if actual != sha256:
                _discard_session(upload_id)
                raise ArtifactInvalid(f"the bytes of upload {upload_id} hash to {actual}, not {sha256}: discarded")
            store.put(sha256, _staging_path(upload_id))
        _discard_session(upload_id)
    return UploadState(offset=size, complete=True)


# --------------------------------------------------------------------------- manifests
def _check_manifest(manifest: ArtifactManifest) -> int | None:
    """The step to record; refuses what cannot be materialized as a folder."""
    step = checkpoint_step(manifest.name)
    if manifest.name != ADAPTER_ARTIFACT and step is None and not EXPORT_ARTIFACT_PATTERN.match(manifest.name):
        raise ArtifactInvalid(f"artifact name {manifest.name!r} is neither {ADAPTER_ARTIFACT!r} nor checkpoint-N")
    if step is not None and manifest.step not in (None, step):
        raise ArtifactInvalid(f"artifact {manifest.name!r} says step {manifest.step}")
    if not manifest.files:
        raise ArtifactInvalid(f"artifact {manifest.name!r} has no files")
    paths = [entry.path for entry in manifest.files]
    unique = set(paths)
    if step is not None and CHECKPOINT_COMPLETE_MARKER not in unique:
        raise ArtifactInvalid(f"{manifest.name} has no {CHECKPOINT_COMPLETE_MARKER}: a resume cannot start from it")
    if len(unique) != len(paths):
        raise ArtifactInvalid(f"artifact {manifest.name!r} lists a path twice")
    for path in paths:
        if any(parent in unique for parent in _parents(path)):
            raise ArtifactInvalid(f"artifact {manifest.name!r}: {path!r} is inside another file")
    return manifest.step if step is None else step


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


def _find(session: Session, run_id: int, name: str) -> RunArtifact | None:
    return session.exec(select(RunArtifact).where(RunArtifact.run_id == run_id, RunArtifact.name == name)).first()


def _blobs_of(session: Session, artifact_ids: Collection[int]) -> set[str]:
    return set(session.exec(select(ArtifactFile.sha256).where(col(ArtifactFile.artifact_id).in_(artifact_ids))).all())


def record_artifact(session: Session, run_id: int, record: ArtifactRecord) -> RunArtifact:
    """Record a folder whose blobs are all in the store (else a 409 naming the missing ones), from
    the run's current attempt. The same manifest again changes nothing; another manifest under the
    same name replaces it. Then the run's retention applies."""
    run = session.get(Run, run_id, populate_existing=True)
    if run is None:
        raise ArtifactNotFound(f"run {run_id} not found")
    if record.attempt != run.attempt:
        raise ArtifactConflict(f"run {run_id} is at attempt {run.attempt}, not {record.attempt}")
    manifest = record.manifest
    step = _check_manifest(manifest)
    freed: set[str] = set()
    with _references:
        existing = _find(session, run_id, manifest.name)
        if existing is not None and existing.digest == manifest.digest:
            return existing
        store = get_store()
        missing = sorted({entry.sha256 for entry in manifest.files if store.size(entry.sha256) is None})
        if missing:
            raise ArtifactConflict(f"blobs not in the store (upload them first): {', '.join(missing)}").with_extra(
                missing=missing)
        if existing is not None:
            freed = _blobs_of(session, [existing.id])
            session.exec(delete(RunArtifact).where(col(RunArtifact.id) == existing.id))
        artifact = RunArtifact(run_id=run_id, name=manifest.name, step=step, attempt=record.attempt,
                               digest=manifest.digest, size=manifest.size)
        session.add(artifact)
        session.flush()
        session.add_all(ArtifactFile(artifact_id=artifact.id, path=entry.path, sha256=entry.sha256, size=entry.size)
                        for entry in manifest.files)
        session.commit()
        session.refresh(artifact)
    collect_garbage(session, freed | _retain(session, run_id))
    return artifact


def get_manifest(session: Session, run_id: int, name: str) -> ArtifactManifest:
    artifact = _find(session, run_id, name)
    if artifact is None:
        raise ArtifactNotFound(f"run {run_id} has no artifact {name!r}")
    files = session.exec(select(ArtifactFile).where(ArtifactFile.artifact_id == artifact.id)
                         .order_by(col(ArtifactFile.path))).all()
    return ArtifactManifest(name=artifact.name, step=artifact.step,
                            files=[FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in files])


def list_artifacts(session: Session, run_id: int) -> list[RunArtifact]:
    """The run's checkpoints by step, then its adapter."""
    artifacts = session.exec(select(RunArtifact).where(RunArtifact.run_id == run_id)).all()
    return sorted(artifacts, key=lambda a: (a.name == ADAPTER_ARTIFACT, a.step or 0))


# --------------------------------------------------------------------------- retention and garbage
def _best_checkpoint(session: Session, checkpoints: list[RunArtifact]) -> RunArtifact | None:
    """The checkpoint with the lowest eval loss: each scores the last evaluation at or before its
    step (on a tie, the checkpoint nearest to that evaluation: the one it actually measured)."""
    if not checkpoints:
        return None
    evaluations = session.exec(
        select(RunMetric.step, RunMetric.eval_loss)
        .where(RunMetric.run_id == checkpoints[0].run_id, col(RunMetric.eval_loss).is_not(None))
        .order_by(col(RunMetric.step))
    ).all()
    steps = [step for step, _loss in evaluations]
    scored = []
    for checkpoint in checkpoints:
        index = bisect.bisect_right(steps, checkpoint.step) - 1
        if index >= 0:
            eval_step, loss = evaluations[index]
            scored.append(((loss, checkpoint.step - eval_step), checkpoint))
    return min(scored, key=lambda pair: pair[0])[1] if scored else None


def _retain(session: Session, run_id: int) -> set[str]:
    """Delete the checkpoints retention does not keep; returns the blobs they held."""
    checkpoints = [a for a in list_artifacts(session, run_id) if CHECKPOINT_PATTERN.match(a.name)]
    newest = sorted(checkpoints, key=lambda a: a.step, reverse=True)[: get_settings().keep_checkpoints]
    kept = {a.id for a in newest}
    best = _best_checkpoint(session, checkpoints)
    if best is not None:
        kept.add(best.id)
    # A checkpoint a live deployment serves stays while it does.
    deployed = set(session.exec(select(Deployment.checkpoint).where(
        Deployment.run_id == run_id, col(Deployment.status).in_(ACTIVE_STATUSES))).all())
    kept.update(a.id for a in checkpoints if a.name in deployed)
    doomed = [a.id for a in checkpoints if a.id not in kept]
    if not doomed:
        return set()
    freed = _blobs_of(session, doomed)
    session.exec(delete(RunArtifact).where(col(RunArtifact.id).in_(doomed)))
    session.commit()
    return freed


def apply_retention(session: Session, run_id: int) -> None:
    """Keep the newest TUNEBOARD_KEEP_CHECKPOINTS checkpoints, the best one, those a live
    deployment serves and the adapter."""
    collect_garbage(session, _retain(session, run_id))


def delete_run_artifacts(session: Session, run_id: int) -> None:
    """Forget every folder of the run (call it before deleting the run) and collect the garbage."""
    artifact_ids = session.exec(select(RunArtifact.id).where(RunArtifact.run_id == run_id)).all()
    freed = _blobs_of(session, artifact_ids)
    session.exec(delete(RunArtifact).where(RunArtifact.run_id == run_id))
    session.commit()
    collect_garbage(session, freed)


def unreferenced(session: Session, blobs: Collection[str], folders: Collection[str]) -> tuple[list[str], list[str]]:
    """Of the blobs and folder digests a worker's cache holds, those no stored artifact has any more:
    their runs were deleted or retention dropped them, so the worker deletes its copies too."""
    kept_blobs = set(session.exec(select(ArtifactFile.sha256).where(col(ArtifactFile.sha256).in_(blobs))).all()) \
        if blobs else set()
    kept_folders = set(session.exec(select(RunArtifact.digest).where(col(RunArtifact.digest).in_(folders))).all()) \
        if folders else set()
    return sorted(set(blobs) - kept_blobs), sorted(set(folders) - kept_folders)


def collect_garbage(session: Session, freed: Collection[str] = ()) -> list[str]:
    """Delete the blobs no manifest references: those just `freed` at once, any other once it is
    older than the grace (a fresh blob's manifest may be on its way); and staged uploads idle as
    long. Reads committed rows only. Returns the deleted blobs."""
    cutoff = time.time() - get_settings().artifact_gc_grace_s
    store = get_store()
    with _references:
        referenced = set(session.exec(select(ArtifactFile.sha256).distinct()).all())
        doomed = [blob.sha256 for blob in store.blobs()
                  if blob.sha256 not in referenced and (blob.sha256 in freed or blob.modified_at < cutoff)]
        for sha256 in doomed:
            store.delete(sha256)
    _drop_idle_staging(cutoff)
    if doomed:
        log.info("artifact store: deleted %d unreferenced blobs", len(doomed))
    return doomed


def _idle_since(entry: os.DirEntry, cutoff: float) -> bool:
    try:
        return entry.stat().st_mtime < cutoff
    except FileNotFoundError:  # committed or discarded since the listing
        return False


def _drop_idle_staging(cutoff: float) -> None:
    """Blob uploads and upload sessions alike."""
    with os.scandir(get_settings().path("artifacts", "staging")) as entries:
        idle = [entry.name for entry in entries if _idle_since(entry, cutoff)]
    for name in idle:
        try:
            staged = _lock_staged(_staging_path(name), create=False)
        except FileNotFoundError:
            continue  # committed or discarded meanwhile
        if staged is None:
            continue  # a request is writing to it now
        with staged:
            _staging_path(name).unlink()
            _session_digests.pop(name, None)


# --------------------------------------------------------------------------- folders on the panel
def materialize(manifest: ArtifactManifest, destination: Path) -> Path:
    """Write the folder at `destination` on the panel's machine, whole or not at all. An existing
    destination is taken to be this folder (name it after `manifest.digest`) and returned as is.
    Read it only: files of the local store are hard links to its blobs."""
    if destination.exists():
        return destination
    store = get_store()
    building = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
    try:
        building.mkdir(parents=True)
        for entry in manifest.files:
            target = building / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            store.export(entry.sha256, target)
        try:
            building.rename(destination)
        except OSError:
            if not destination.is_dir():  # not another request that built the same folder first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return destination
