"""Artifacts on a worker: a run folder uploaded to the panel's artifact store blob by blob, and a
stored folder fetched into a local cache; both resume where a broken connection left them.

A small file is hashed before it is sent, so that a blob the store holds already (the same file in
another checkpoint) is not sent again; a big one is hashed in the same read that sends it, through
an upload session: one read of the file instead of two, at the cost of that dedup.

The cache is `<cache_dir>/blobs/<sha256>` (verified blobs) and `<cache_dir>/artifacts/<digest>/`
(folders, hard-linked from the blobs): a folder already there is used as is.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import httpx

from app.wire import (
    ADAPTER_ARTIFACT,
    CHECKPOINT_COMPLETE_MARKER,
    CHECKPOINT_PATTERN,
    ArtifactManifest,
    ArtifactRecord,
    FileEntry,
    UploadCommit,
    UploadSession,
    UploadSessionRequest,
    UploadState,
)
from workers.reporter import AppUnavailable, Reporter

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Files at least this big go through an upload session (see above).
SESSION_UPLOAD_BYTES = 16 << 20
# A transfer is given up after this long without progress (each resume that moves on restarts it).
STALL_LIMIT_S = 300.0
# Recording a manifest again after uploading blobs the store had meanwhile collected.
RECORD_TRIES = 3


class ArtifactTransferError(RuntimeError):
    pass


class _Backoff:
    """Growing waits between the attempts of one transfer, which is given up after `stall_limit_s`
    without progress."""

    def __init__(self, what: str, stall_limit_s: float) -> None:
        self.what = what
        self.stall_limit_s = stall_limit_s
        self._deadline = time.monotonic() + stall_limit_s
        self._delay = 0.2

    def check(self, progressed: bool, problem: str) -> None:
        if progressed:
            self._deadline = time.monotonic() + self.stall_limit_s
            self._delay = 0.2
        elif time.monotonic() >= self._deadline:
            raise ArtifactTransferError(f"{self.what}: no progress for {self.stall_limit_s:.0f} s ({problem})")

    def sleep(self, problem: str) -> None:
        log.warning("%s interrupted (%s); resuming in %.1f s", self.what, problem, self._delay)
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, 5.0)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def _refused(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text


# --------------------------------------------------------------------------- upload
def _folder_files(folder: Path, name: str) -> list[Path]:
    """The final adapter is the top level of the output folder (its checkpoint-*/ travel on
    their own); a checkpoint is its whole folder."""
    found = folder.iterdir() if name == ADAPTER_ARTIFACT else folder.rglob("*")
    return sorted(path for path in found if path.is_file())


def _file_bytes(path: Path, offset: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as source:
        source.seek(offset)
        while chunk := source.read(min(CHUNK_BYTES, end - source.tell())):
            yield chunk


def _upload_state(reporter: Reporter, sha256: str) -> UploadState:
    response = reporter.get(f"/blobs/{sha256}/upload")
    if response.status_code != 200:
        raise ArtifactTransferError(f"blob {sha256}: upload state refused ({response.status_code}): {_refused(response)}")
    return UploadState.model_validate(response.json())


def _upload_blob(reporter: Reporter, sha256: str, path: Path, size: int, stall_limit_s: float) -> None:
    """Send what the panel does not hold yet, from the offset it reports, until it is complete."""
    backoff = _Backoff(f"upload of blob {sha256}", stall_limit_s)
    state = _upload_state(reporter, sha256)
    while not state.complete:
        try:
            response = reporter.send(
                "PATCH", f"/blobs/{sha256}/upload", params={"offset": state.offset, "size": size},
                content=_file_bytes(path, state.offset, size), headers={"Content-Length": str(size - state.offset)},
                # The panel verifies and commits the blob before answering (to S3: an upload of its own).
                timeout=httpx.Timeout(30.0, read=60.0 + size / 20e6),
            )
            if response.status_code == 200:
                answered = UploadState.model_validate(response.json())
                if answered.complete:
                    return
                problem = f"the panel holds {answered.offset} of {size} bytes"
            elif response.status_code == 409 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {_refused(response)}"
            else:
                raise ArtifactTransferError(f"blob {sha256} ({path}) refused ({response.status_code}): {_refused(response)}")
        except httpx.TransportError as error:
            problem = repr(error)
        backoff.sleep(problem)  # first: the panel notices a broken connection before it is asked
        before, state = state.offset, _upload_state(reporter, sha256)
        backoff.check(state.offset > before, problem)


class _HashedFile:
    """A file's bytes as they are sent, hashed in the same read: `hash` covers its first `hashed`
    bytes."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.hash = hashlib.sha256()
        self.hashed = 0

    def _read(self, offset: int, end: int) -> Iterator[bytes]:
        for chunk in _file_bytes(self.path, offset, end):
            self.hash.update(chunk)
            self.hashed += len(chunk)
            yield chunk

    def _rewind(self, offset: int) -> None:
        """Make the hash cover the first `offset` bytes: after a broken connection it has taken in
        more than the panel kept, so it is computed again from that prefix (only)."""
        if self.hashed != offset:
            self.hash, self.hashed = hashlib.sha256(), 0
            for _chunk in self._read(0, offset):
                pass

    def body_from(self, offset: int) -> Iterator[bytes]:
        self._rewind(offset)
        return self._read(offset, self.size)

    def sha256(self) -> str:
        self._rewind(self.size)
        return self.hash.hexdigest()


def _session_offset(reporter: Reporter, upload: str) -> int:
    response = reporter.get(upload)
    if response.status_code != 200:
        raise ArtifactTransferError(f"{upload}: state refused ({response.status_code}): {_refused(response)}")
    return UploadState.model_validate(response.json()).offset


def _upload_through_session(reporter: Reporter, path: Path, size: int, stall_limit_s: float) -> str:
    """Send the file through an upload session, from the offset the panel reports until it holds
    every byte, then commit it under the sha256 computed on the way; returns that sha256."""
    response = reporter.post("/uploads", json=UploadSessionRequest(size=size).model_dump())
    if response.status_code != 200:
        raise ArtifactTransferError(f"upload of {path} refused ({response.status_code}): {_refused(response)}")
    session = UploadSession.model_validate(response.json())
    upload = f"/uploads/{session.upload_id}"
    backoff = _Backoff(f"upload of {path}", stall_limit_s)
    sent = _HashedFile(path, size)
    offset = session.offset
    while offset < size:
        try:
            response = reporter.send(
                "PATCH", upload, params={"offset": offset}, content=sent.body_from(offset),
                headers={"Content-Length": str(size - offset)}, timeout=httpx.Timeout(30.0, read=60.0),
            )
            if response.status_code == 200:
                answered = UploadState.model_validate(response.json())
                if answered.offset == size:
                    break
                problem = f"the panel holds {answered.offset} of {size} bytes"
            elif response.status_code == 409 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {_refused(response)}"
            else:
                raise ArtifactTransferError(f"upload of {path} refused ({response.status_code}): {_refused(response)}")
        except httpx.TransportError as error:
            problem = repr(error)
        backoff.sleep(problem)  # first: the panel notices a broken connection before it is asked
        before, offset = offset, _session_offset(reporter, upload)
        backoff.check(offset > before, problem)
    sha256 = sent.sha256()
    _commit_session(reporter, upload, sha256, path, size, stall_limit_s)
    return sha256


def _commit_session(
    reporter: Reporter, upload: str, sha256: str, path: Path, size: int, stall_limit_s: float,
) -> None:
    """Have the panel store the session's bytes as blob `sha256`."""
    backoff = _Backoff(f"commit of {path}", stall_limit_s)
    commit = UploadCommit(sha256=sha256).model_dump()
    while True:
        # Retried while the panel is away. It compares the digest it computed and moves the bytes
        # into the store before answering (into S3: an upload of its own).
        response = reporter.post(f"{upload}/commit", json=commit,
                                 timeout=httpx.Timeout(30.0, read=60.0 + size / 20e6))
        if response.status_code == 200:
            return
        if response.status_code == 404:
            # An earlier try went through and its answer was lost; or the session idled so long
            # that it was collected: then the blob goes by its address, now known.
            if not _upload_state(reporter, sha256).complete:
                _upload_blob(reporter, sha256, path, size, stall_limit_s)
            return
        if response.status_code != 409:  # 409: an earlier try is still moving the bytes
            raise ArtifactTransferError(f"upload of {path} as blob {sha256} refused ({response.status_code}): "
                                        f"{_refused(response)}")
        problem = f"HTTP 409: {_refused(response)}"
        backoff.check(False, problem)
        backoff.sleep(problem)


def upload_folder(
    reporter: Reporter, run_id: int, attempt: int, worker_id: str, folder: Path, name: str, step: int | None,
    *, stall_limit_s: float = STALL_LIMIT_S,
) -> ArtifactManifest:
    """Upload `folder` as the run's artifact `name` (ADAPTER_ARTIFACT or checkpoint-N): every blob
    the store lacks, then the manifest. Returns the manifest recorded."""
    if CHECKPOINT_PATTERN.match(name) and not (folder / CHECKPOINT_COMPLETE_MARKER).is_file():
        raise ArtifactTransferError(f"{folder} has no {CHECKPOINT_COMPLETE_MARKER} yet: the checkpoint is incomplete")
    entries: list[FileEntry] = []
    sources: dict[str, tuple[Path, int]] = {}
    files = [(path, path.stat().st_size) for path in _folder_files(folder, name)]
    with ThreadPoolExecutor(max_workers=1) as hasher:
        # Hashing the small files runs ahead: the next one's digest is ready when the previous
        # upload ends.
        digests = hasher.map(_file_sha256, [path for path, size in files if size < SESSION_UPLOAD_BYTES])
        for path, size in files:
            if size >= SESSION_UPLOAD_BYTES:
                sha256 = _upload_through_session(reporter, path, size, stall_limit_s)
            else:
                sha256 = next(digests)
                if sha256 not in sources:
                    _upload_blob(reporter, sha256, path, size, stall_limit_s)
            sources.setdefault(sha256, (path, size))
            entries.append(FileEntry(path=path.relative_to(folder).as_posix(), sha256=sha256, size=size))
    manifest = ArtifactManifest(name=name, step=step, files=entries)
    record = ArtifactRecord(attempt=attempt, worker_id=worker_id, manifest=manifest).model_dump(mode="json")
    for _ in range(RECORD_TRIES):
        response = reporter.post(f"/runs/{run_id}/artifacts", json=record)
        if response.status_code == 200:
            return manifest
        # Blobs the store held when this upload skipped them, collected since (another run let
        # go of them): send those again.
        missing = response.json().get("missing") if response.status_code == 409 else None
        if not missing:
            raise ArtifactTransferError(
                f"run {run_id} artifact {name} refused ({response.status_code}): {_refused(response)}"
            )
        for sha256 in missing:
            _upload_blob(reporter, sha256, *sources[sha256], stall_limit_s)
    raise ArtifactTransferError(f"run {run_id} artifact {name}: blobs keep leaving the store: {', '.join(missing)}")


# --------------------------------------------------------------------------- fetch
def _download_into(reporter: Reporter, sha256: str, size: int, partial: BinaryIO, stall_limit_s: float) -> str:
    """Complete `partial` (what an earlier fetch left is kept: only the rest is asked for, by
    range) and return the sha256 of its bytes."""
    backoff = _Backoff(f"download of blob {sha256}", stall_limit_s)
    digest = hashlib.sha256()
    partial.seek(0)
    while chunk := partial.read(CHUNK_BYTES):
        digest.update(chunk)
    have = partial.tell()
    if have > size:
        partial.truncate(0)
        digest, have = hashlib.sha256(), 0
    while have < size:
        before = have
        try:
            ranged = {"Range": f"bytes={have}-"} if have else {}
            with reporter.stream("GET", f"/blobs/{sha256}", headers=ranged) as response:
                if response.status_code == 200 and have:  # the whole blob after all: start over
                    partial.truncate(0)
                    digest, have = hashlib.sha256(), 0
                elif response.status_code not in (200, 206):
                    response.read()
                    if response.status_code < 500:
                        raise ArtifactTransferError(f"blob {sha256} refused ({response.status_code}): {_refused(response)}")
                    raise AppUnavailable(f"HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    partial.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
        except (httpx.TransportError, AppUnavailable) as error:
            backoff.check(have > before, repr(error))
            backoff.sleep(repr(error))
    return digest.hexdigest()


def _fetch_blob(reporter: Reporter, sha256: str, size: int, cache_dir: Path, stall_limit_s: float) -> None:
    blobs = cache_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    target = blobs / sha256
    if target.exists():
        return
    partial_path = blobs / f"{sha256}.partial"
    with partial_path.open("a+b") as partial:
        # Another fetch of this blob on this machine finishes first; then it is there.
        fcntl.flock(partial.fileno(), fcntl.LOCK_EX)
        if target.exists():
            return
        resumed = partial.seek(0, os.SEEK_END) > 0
        actual = _download_into(reporter, sha256, size, partial, stall_limit_s)
        if actual != sha256 and resumed:  # the bytes kept from before may be what is wrong
            partial.truncate(0)
            actual = _download_into(reporter, sha256, size, partial, stall_limit_s)
        if actual != sha256:
            partial.truncate(0)
            raise ArtifactTransferError(f"blob {sha256} arrived with sha256 {actual}")
        partial.flush()
        partial_path.rename(target)


def _link_or_copy(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(blob, target)


def _build_folder(manifest: ArtifactManifest, cache_dir: Path, building: Path, *, link: bool) -> None:
    place = _link_or_copy if link else shutil.copyfile
    building.mkdir(parents=True)
    for entry in manifest.files:
        blob = cache_dir / "blobs" / entry.sha256
        if not blob.exists():
            raise ArtifactTransferError(f"blob {entry.sha256} of {manifest.name} is not in {cache_dir}: fetch it first")
        target = building / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        place(blob, target)


def fetch_manifest(
    reporter: Reporter, manifest: ArtifactManifest, cache_dir: Path, *, stall_limit_s: float = STALL_LIMIT_S,
) -> Path:
    """The folder of `manifest` in the cache: its missing blobs downloaded and verified, the folder
    built beside and renamed into place. Read it only: its files are the cache's blobs."""
    folder = cache_dir / "artifacts" / manifest.digest
    if folder.is_dir():
        return folder
    for sha256, size in {entry.sha256: entry.size for entry in manifest.files}.items():
        _fetch_blob(reporter, sha256, size, cache_dir, stall_limit_s)
    building = folder.with_name(f".{manifest.digest}.{uuid.uuid4().hex}.partial")
    try:
        _build_folder(manifest, cache_dir, building, link=True)
        try:
            building.rename(folder)
        except OSError:
            if not folder.is_dir():  # not another fetch that built it first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def fetch_artifact(
    reporter: Reporter, run_id: int, name: str, cache_dir: Path, *, stall_limit_s: float = STALL_LIMIT_S,
) -> Path:
    """The run's stored folder `name` (ADAPTER_ARTIFACT or checkpoint-N), fetched into the cache."""
    response = reporter.get(f"/runs/{run_id}/artifacts/{name}")
    if response.status_code != 200:
        raise ArtifactTransferError(f"run {run_id} artifact {name} ({response.status_code}): {_refused(response)}")
    manifest = ArtifactManifest.model_validate(response.json())
    return fetch_manifest(reporter, manifest, cache_dir, stall_limit_s=stall_limit_s)


def materialize_into(manifest: ArtifactManifest, cache_dir: Path, destination: Path) -> Path:
    """Put the fetched folder (fetch_manifest first) at `destination`, e.g. output/checkpoint-N for
    a resume, replacing what is there. Copies, not links: a trainer writes into its run folder,
    and the cache must stay as verified."""
    building = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
    replaced = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.replaced")
    try:
        _build_folder(manifest, cache_dir, building, link=False)
        if destination.exists():
            destination.rename(replaced)
        building.rename(destination)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return destination


# --------------------------------------------------------------------------- the cache's upkeep
def _is_content_address(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def cached_content(cache_dir: Path) -> tuple[list[str], list[str]]:
    """The blobs and folder digests this machine's artifact cache holds (for the heartbeat)."""
    def names(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if _is_content_address(p.name)) if folder.is_dir() else []

    return names(cache_dir / "blobs"), names(cache_dir / "artifacts")


def forget_cached(cache_dir: Path, blobs: list[str], folders: list[str]) -> None:
    """Delete cached copies the panel no longer stores (their runs were deleted, or retention
    dropped them). Names are checked, so nothing outside the cache can be named."""
    for digest in filter(_is_content_address, folders):
        shutil.rmtree(cache_dir / "artifacts" / digest, ignore_errors=True)
    for sha256 in filter(_is_content_address, blobs):
        (cache_dir / "blobs" / sha256).unlink(missing_ok=True)
