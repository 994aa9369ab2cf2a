"""The artifact store through the real panel (uvicorn on loopback, real SQLite): folders uploaded by
workers/artifacts and fetched on a "second machine" byte for byte; uploads and downloads cut
mid-blob by a TCP relay and resumed with only the rest; the upload protocol's refusals; upload
sessions (a big file hashed while it is sent); byte ranges; retention (newest N + best); garbage
collection; the worker token."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from app.db import get_engine
from app.models import ArtifactFile, Run, RunArtifact, RunMetric, TrainConfig
from app.services import artifacts as service
from app.settings import get_settings
from app.wire import ADAPTER_ARTIFACT, ArtifactManifest, ArtifactRecord, FileEntry, UploadState
from tests.live import LivePanel, free_port, running_panel
from workers import artifacts as worker_artifacts
from workers.artifacts import (
    SESSION_UPLOAD_BYTES,
    ArtifactTransferError,
    fetch_artifact,
    fetch_manifest,
    materialize_into,
    upload_folder,
)
from workers.reporter import Reporter

MiB = 1 << 20


# --------------------------------------------------------------------------- shared with test_artifacts_s3
def clear_settings() -> None:
    get_settings.cache_clear()
    get_engine.cache_clear()
    service._store.cache_clear()


@contextmanager
def artifact_panel(root: Path, env: dict[str, str] | None = None) -> Iterator[LivePanel]:
    """uvicorn (no worker) on a fresh data dir that this process's settings point at too."""
    settings_env = {
        "TUNEBOARD_ENVIRONMENT": "test", "TUNEBOARD_DATA_DIR": str(root / "data"),
        "TUNEBOARD_MODEL_ROOTS": f'["{root / "models"}"]', **(env or {}),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in ("TUNEBOARD_BROKER_URL", "TUNEBOARD_DATABASE_URL", "TUNEBOARD_ARTIFACT_STORE"):
            patch.delenv(name, raising=False)
        for name, value in settings_env.items():
            patch.setenv(name, value)
        clear_settings()
        try:
            with running_panel(root / "data", root / "logs", worker=False, env=env) as panel:
                patch.setenv("TUNEBOARD_APP_URL", panel.url)
                clear_settings()
                yield panel
        finally:
            get_engine().dispose()
            clear_settings()


def reporter_to(url: str) -> Reporter:
    return Reporter(get_settings().model_copy(update={"app_url": url}))


def worker_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().worker_token}"}


def make_run(session: Session, name: str = "artifacts") -> Run:
    config = TrainConfig(name=f"{name}-config", params={})
    session.add(config)
    session.flush()
    run = Run(name=name, config_id=config.id)
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def staged_uploads() -> list[str]:
    return sorted(os.listdir(get_settings().path("artifacts", "staging")))


class CuttingRelay:
    """A TCP relay to 127.0.0.1:`port` counting the bytes each way ("up": to the panel, "down":
    from it) that, once, cuts the first connection carrying more than `cut_up_after` or
    `cut_down_after` bytes: a real connection dropped mid-transfer. `before_request` (a request
    line's start, a callback) runs the callback once before that request goes through."""

    def __init__(self, port: int, *, cut_up_after: int | None = None, cut_down_after: int | None = None,
                 before_request: tuple[bytes, Callable[[], None]] | None = None) -> None:
        self.port = port
        self.cut_after = {"up": cut_up_after, "down": cut_down_after}
        self.before_request = before_request
        self.total = {"up": 0, "down": 0}
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            carried = {"up": 0, "down": 0}
            for source, target, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(source, target, direction, carried, (client, upstream)),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str, carried: dict[str, int],
              pair: tuple[socket.socket, socket.socket]) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if direction == "up" and self.before_request and data.startswith(self.before_request[0]):
                    callback, self.before_request = self.before_request[1], None
                    callback()
                with self._lock:
                    limit = self.cut_after[direction]
                    cut = limit is not None and carried[direction] + len(data) > limit
                    if cut:
                        data = data[: limit - carried[direction]]
                        self.cut_after[direction] = None
                        self.cuts += 1
                    carried[direction] += len(data)
                    self.total[direction] += len(data)
                target.sendall(data)
                if cut:
                    break
        for end in pair:
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePanel]:
    with artifact_panel(tmp_path_factory.mktemp("artifacts")) as live:
        yield live


@pytest.fixture
def db(panel: LivePanel) -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


@pytest.fixture
def reporter(panel: LivePanel) -> Iterator[Reporter]:
    client = reporter_to(panel.url)
    yield client
    client.close()


@pytest.fixture
def http(panel: LivePanel) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=panel.url + "/internal/v1", headers=worker_headers(), timeout=30) as client:
        yield client


@pytest.fixture
def no_grace(panel: LivePanel) -> Iterator[None]:
    """The collector of this process takes unreferenced blobs and staged uploads of any age."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEBOARD_ARTIFACT_GC_GRACE_S", "0")
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


def put_blob(http: httpx.Client, data: bytes) -> str:
    sha = sha256_of(data)
    response = http.patch(f"/blobs/{sha}/upload", params={"offset": 0, "size": len(data)}, content=data)
    assert response.json() == {"offset": len(data), "complete": True}, response.text
    return sha


def open_session(http: httpx.Client, size: int) -> str:
    """An upload session's path."""
    opened = http.post("/uploads", json={"size": size})
    assert opened.status_code == 200 and opened.json()["offset"] == 0, opened.text
    return f"/uploads/{opened.json()['upload_id']}"


def record(db: Session, http: httpx.Client, run: Run, name: str, files: dict[str, bytes]):
    entries = [FileEntry(path=path, sha256=put_blob(http, data), size=len(data)) for path, data in files.items()]
    manifest = ArtifactManifest(name=name, files=entries)
    return service.record_artifact(db, run.id, ArtifactRecord(attempt=run.attempt, worker_id="w1", manifest=manifest))


# --------------------------------------------------------------------------- round trip
def test_a_checkpoint_and_the_adapter_travel_to_a_second_machine_byte_for_byte(
    panel: LivePanel, db: Session, reporter: Reporter, tmp_path: Path,
) -> None:
    run = make_run(db)
    output = tmp_path / "output"
    shared = os.urandom(300_000)  # the same tokenizer file in both folders: one blob
    checkpoint = write_files(output / "checkpoint-40", {
        "adapter_model.safetensors": os.urandom(3 * MiB + 17), "tokenizer.json": shared,
        "trainer_state.json": b'{"global_step": 40}', "nested/rng_state.pth": os.urandom(1000), "empty.txt": b"",
    })
    write_files(output, {"adapter_model.safetensors": os.urandom(2 * MiB), "tokenizer.json": shared,
                         "all_results.json": b"{}"})

    sent = upload_folder(reporter, run.id, run.attempt, "w1", checkpoint, "checkpoint-40", 40)
    adapter = upload_folder(reporter, run.id, run.attempt, "w1", output, ADAPTER_ARTIFACT, 40)

    assert sorted(f.path for f in adapter.files) == ["adapter_model.safetensors", "all_results.json", "tokenizer.json"]
    assert [a.name for a in service.list_artifacts(db, run.id)] == ["checkpoint-40", ADAPTER_ARTIFACT]
    assert service.get_manifest(db, run.id, "checkpoint-40") == ArtifactManifest(
        name="checkpoint-40", step=40, files=sorted(sent.files, key=lambda f: f.path))
    # Uploading the same folder again sends no blob, only questions and the manifest.
    relay = CuttingRelay(int(panel.url.rsplit(":", 1)[1]))
    relayed = reporter_to(relay.url)
    assert upload_folder(relayed, run.id, run.attempt, "w1", checkpoint, "checkpoint-40", 40).digest == sent.digest
    relayed.close()
    relay.close()
    assert relay.total["up"] < 16 * 1024

    second_machine = tmp_path / "second-machine-cache"
    fetched = fetch_artifact(reporter, run.id, "checkpoint-40", second_machine)
    assert fetched == second_machine / "artifacts" / sent.digest
    assert folder_bytes(fetched) == folder_bytes(checkpoint)
    assert folder_bytes(fetch_artifact(reporter, run.id, ADAPTER_ARTIFACT, second_machine)) == {
        name: data for name, data in folder_bytes(output).items() if "/" not in name
    }
    # A folder already in the cache is used as is: no panel needed.
    offline = reporter_to(f"http://127.0.0.1:{free_port()}")
    assert fetch_manifest(offline, sent, second_machine) == fetched

    # A resume puts the checkpoint into a run folder: copies, replacing a half-written one.
    run_folder = write_files(tmp_path / "resume" / "output", {"checkpoint-40/partial.bin": b"half"})
    placed = materialize_into(sent, second_machine, run_folder / "checkpoint-40")
    assert folder_bytes(placed) == folder_bytes(checkpoint)
    blob = second_machine / "blobs" / sha256_of(shared)
    assert os.stat(placed / "tokenizer.json").st_ino != os.stat(blob).st_ino

    # The panel's own copy (the adapter preflight, the zip download).
    on_panel = service.materialize(adapter, tmp_path / "panel" / adapter.digest)
    assert folder_bytes(on_panel) == folder_bytes(fetch_manifest(offline, adapter, second_machine))
    offline.close()
    assert staged_uploads() == []


def test_an_unfinished_checkpoint_is_not_uploaded(panel: LivePanel, db: Session, reporter: Reporter, tmp_path: Path) -> None:
    run = make_run(db)
    folder = write_files(tmp_path / "checkpoint-9", {"adapter_model.safetensors": b"still being written"})
    with pytest.raises(ArtifactTransferError, match="trainer_state.json"):
        upload_folder(reporter, run.id, run.attempt, "w1", folder, "checkpoint-9", 9)
    assert service.blob_size(sha256_of(b"still being written")) is None


def upload_cut_halfway(panel: LivePanel, run: Run, folder: Path, name: str, step: int, size: int):
    """Upload `folder` through a relay that cuts the connection once, `size // 2` bytes in; the
    relay (its counts) and the manifest the upload ended with."""
    relay = CuttingRelay(int(panel.url.rsplit(":", 1)[1]), cut_up_after=size // 2)
    cut_reporter = reporter_to(relay.url)
    try:
        manifest = upload_folder(cut_reporter, run.id, run.attempt, "w1", folder, name, step)
    finally:
        cut_reporter.close()
        relay.close()
    return relay, manifest


def test_an_upload_cut_mid_blob_resumes_and_sends_only_the_rest(
    panel: LivePanel, db: Session, reporter: Reporter, tmp_path: Path,
) -> None:
    run = make_run(db)
    size = 8 * MiB
    folder = write_files(tmp_path / "checkpoint-8", {"weights.bin": os.urandom(size), "trainer_state.json": b"{}"})
    relay, manifest = upload_cut_halfway(panel, run, folder, "checkpoint-8", 8, size)

    assert relay.cuts == 1
    # Starting over would send size/2 + size; a resume sends the rest of what the panel kept
    # (it loses what was in flight when the connection broke).
    assert size < relay.total["up"] < size + size // 4
    fetched = fetch_manifest(reporter, manifest, tmp_path / "cache")
    assert folder_bytes(fetched) == folder_bytes(folder)
    assert staged_uploads() == []


def test_a_download_cut_mid_blob_resumes_by_range(panel: LivePanel, http: httpx.Client, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    manifest = ArtifactManifest(name=ADAPTER_ARTIFACT, files=[FileEntry(path="w.bin", sha256=put_blob(http, data),
                                                                        size=len(data))])
    relay = CuttingRelay(int(http.base_url.port), cut_down_after=2 * MiB)
    reporter = reporter_to(relay.url)
    try:
        folder = fetch_manifest(reporter, manifest, tmp_path / "cache")
    finally:
        reporter.close()
        relay.close()
    assert relay.cuts == 1
    assert (folder / "w.bin").read_bytes() == data
    assert len(data) < relay.total["down"] < len(data) + 64 * 1024  # the rest only, plus headers


def test_blobs_collected_before_the_manifest_arrives_are_sent_again(
    panel: LivePanel, db: Session, http: httpx.Client, reporter: Reporter, tmp_path: Path, no_grace: None,
) -> None:
    first, second = make_run(db, "first"), make_run(db, "second")
    base = os.urandom(1000)
    record(db, http, first, ADAPTER_ARTIFACT, {"base.bin": base})
    folder = write_files(tmp_path / "output", {"base.bin": base, "own.bin": os.urandom(1000)})

    def first_run_deleted() -> None:  # between "the store has base.bin" and the manifest
        with Session(get_engine()) as other:
            service.delete_run_artifacts(other, first.id)
        assert service.blob_size(sha256_of(base)) is None

    relay = CuttingRelay(int(panel.url.rsplit(":", 1)[1]),
                         before_request=(f"POST /internal/v1/runs/{second.id}/artifacts".encode(), first_run_deleted))
    relayed = reporter_to(relay.url)
    try:
        manifest = upload_folder(relayed, second.id, second.attempt, "w1", folder, ADAPTER_ARTIFACT, None)
    finally:
        relayed.close()
        relay.close()
    assert relay.before_request is None
    assert service.get_manifest(db, second.id, ADAPTER_ARTIFACT).digest == manifest.digest
    assert folder_bytes(fetch_manifest(reporter, manifest, tmp_path / "cache")) == folder_bytes(folder)


# --------------------------------------------------------------------------- the upload protocol
def test_an_upload_continues_only_at_the_staged_offset(http: httpx.Client) -> None:
    data = os.urandom(3 * MiB)
    sha, half = sha256_of(data), len(data) // 2
    path, size = f"/blobs/{sha}/upload", {"size": len(data)}
    assert http.get(path).json() == {"offset": 0, "complete": False}

    assert http.patch(path, params={"offset": 0, **size}, content=data[:half]).json() == {"offset": half, "complete": False}
    assert http.get(path).json() == {"offset": half, "complete": False}
    refused = http.patch(path, params={"offset": 0, **size}, content=data)
    assert refused.status_code == 409 and refused.json()["offset"] == half
    assert http.head(f"/blobs/{sha}").status_code == 404

    assert http.patch(path, params={"offset": half, **size}, content=data[half:]).json() == {
        "offset": len(data), "complete": True}
    assert http.get(path).json() == {"offset": len(data), "complete": True}
    assert http.get(f"/blobs/{sha}").content == data
    # A blob already stored is complete at once, whatever is sent.
    assert http.patch(path, params={"offset": 0, **size}, content=b"").json()["complete"] is True
    assert sha not in staged_uploads()


def test_bytes_that_do_not_hash_to_the_blob_are_refused_and_nothing_is_kept(http: httpx.Client) -> None:
    claimed = sha256_of(b"what the worker meant to send")
    response = http.patch(f"/blobs/{claimed}/upload", params={"offset": 0, "size": 12}, content=b"other bytes!")
    assert response.status_code == 422 and claimed in response.json()["detail"]
    assert http.get(f"/blobs/{claimed}/upload").json() == {"offset": 0, "complete": False}
    assert http.head(f"/blobs/{claimed}").status_code == 404
    assert claimed not in staged_uploads() and service.blob_size(claimed) is None

    too_long = http.patch(f"/blobs/{claimed}/upload", params={"offset": 0, "size": 4}, content=b"12345")
    assert too_long.status_code == 422 and claimed not in staged_uploads()
    bad_sha = http.patch("/blobs/not-a-sha/upload", params={"offset": 0, "size": 1}, content=b"x")
    assert bad_sha.status_code == 422


def test_concurrent_uploads_of_one_blob_store_it_once_intact(http: httpx.Client, panel: LivePanel) -> None:
    data = os.urandom(4 * MiB)
    sha = sha256_of(data)
    results: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=panel.url + "/internal/v1", headers=worker_headers(), timeout=30) as client:
            results.append(client.patch(f"/blobs/{sha}/upload", params={"offset": 0, "size": len(data)},
                                         content=data).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and set(results) <= {200, 409} and 200 in results  # losers: look again
    assert http.get(f"/blobs/{sha}").content == data


# --------------------------------------------------------------------------- upload sessions
def test_a_big_file_is_hashed_while_sent_and_a_cut_upload_sends_only_the_rest(
    panel: LivePanel, db: Session, reporter: Reporter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = make_run(db)
    size = SESSION_UPLOAD_BYTES + 4 * MiB
    folder = write_files(tmp_path / "checkpoint-12", {"weights.bin": os.urandom(size), "trainer_state.json": b"{}"})
    hashed_first: list[str] = []
    weights_reads: list[tuple[int, int]] = []
    file_sha256, file_bytes = worker_artifacts._file_sha256, worker_artifacts._file_bytes

    def spied_sha256(path: Path) -> str:
        hashed_first.append(path.name)
        return file_sha256(path)

    def spied_bytes(path: Path, offset: int, end: int) -> Iterator[bytes]:
        if path.name == "weights.bin":
            weights_reads.append((offset, end))
        return file_bytes(path, offset, end)

    monkeypatch.setattr(worker_artifacts, "_file_sha256", spied_sha256)
    monkeypatch.setattr(worker_artifacts, "_file_bytes", spied_bytes)
    relay, manifest = upload_cut_halfway(panel, run, folder, "checkpoint-12", 12, size)

    assert relay.cuts == 1
    assert size < relay.total["up"] < size + size // 4
    assert hashed_first == ["trainer_state.json"]  # the big file is never read only to be hashed
    # One read sending it, cut; then the prefix the panel kept, to restore the hash; then the rest.
    kept = weights_reads[-1][0]
    assert 0 < kept <= size // 2
    assert weights_reads[0] == (0, size) and weights_reads[-2:] == [(0, kept), (kept, size)]
    weights = next(entry for entry in manifest.files if entry.path == "weights.bin")
    assert weights.sha256 == sha256_of((folder / "weights.bin").read_bytes())
    assert folder_bytes(fetch_manifest(reporter, manifest, tmp_path / "cache")) == folder_bytes(folder)
    assert staged_uploads() == []


def test_an_upload_session_continues_only_at_the_staged_offset_and_commits_what_it_hashed(
    http: httpx.Client,
) -> None:
    data = os.urandom(3 * MiB)
    sha, half = sha256_of(data), len(data) // 2
    upload = open_session(http, len(data))
    upload_id = upload.rsplit("/", 1)[1]
    assert http.get(upload).json() == {"offset": 0, "complete": False}

    assert http.patch(upload, params={"offset": 0}, content=data[:half]).json() == {"offset": half, "complete": False}
    assert http.get(upload).json() == {"offset": half, "complete": False}
    refused = http.patch(upload, params={"offset": 0}, content=data)
    assert refused.status_code == 409 and refused.json()["offset"] == half
    early = http.post(f"{upload}/commit", json={"sha256": sha})
    assert early.status_code == 409 and early.json()["offset"] == half

    # The rest and the commit reach a panel without the digest of the first half (as after a
    # restart: this process's): it is restored from the staged prefix.
    async def rest() -> AsyncIterator[bytes]:
        yield data[half:]

    assert asyncio.run(service.receive_session(upload_id, half, rest())) == UploadState(offset=len(data), complete=False)
    assert service.commit_session(upload_id, sha) == UploadState(offset=len(data), complete=True)
    assert http.get(f"/blobs/{sha}").content == data
    assert http.get(upload).status_code == 404
    assert upload_id not in staged_uploads()

    # Another session of bytes the store holds: nothing to store, complete.
    again = open_session(http, len(data))
    http.patch(again, params={"offset": 0}, content=data)
    assert http.post(f"{again}/commit", json={"sha256": sha}).json() == {"offset": len(data), "complete": True}
    assert http.post(f"{again}/commit", json={"sha256": sha}).status_code == 404
    assert staged_uploads() == []


def test_a_session_whose_bytes_do_not_hash_to_its_commit_is_discarded_and_nothing_is_stored(http: httpx.Client) -> None:
    data = os.urandom(MiB)
    claimed = sha256_of(b"what the worker meant to send")
    upload = open_session(http, len(data))
    assert http.patch(upload, params={"offset": 0}, content=data).json() == {"offset": len(data), "complete": False}
    refused = http.post(f"{upload}/commit", json={"sha256": claimed})
    assert refused.status_code == 422 and claimed in refused.json()["detail"]
    assert http.get(upload).status_code == 404
    assert http.post(f"{upload}/commit", json={"sha256": sha256_of(data)}).status_code == 404
    assert service.blob_size(claimed) is None and service.blob_size(sha256_of(data)) is None
    assert staged_uploads() == []

    too_long = open_session(http, 4)
    assert http.patch(too_long, params={"offset": 0}, content=b"12345").status_code == 422
    assert http.get(too_long).status_code == 404 and staged_uploads() == []
    assert http.post("/uploads", json={"size": -1}).status_code == 422
    assert http.get("/uploads/not-an-upload").status_code == 422
    assert http.post(f"{too_long}/commit", json={"sha256": "not-a-sha"}).status_code == 422


def test_blobs_are_served_by_byte_range(http: httpx.Client) -> None:
    data = os.urandom(2 * MiB + 5)
    sha = put_blob(http, data)
    whole = http.get(f"/blobs/{sha}")
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    middle = http.get(f"/blobs/{sha}", headers={"Range": "bytes=100-1999"})
    assert middle.status_code == 206 and middle.content == data[100:2000]
    assert middle.headers["content-range"] == f"bytes 100-1999/{len(data)}"
    assert http.get(f"/blobs/{sha}", headers={"Range": f"bytes={MiB}-"}).content == data[MiB:]
    assert http.get(f"/blobs/{sha}", headers={"Range": "bytes=-7"}).content == data[-7:]
    assert http.get(f"/blobs/{sha}", headers={"Range": f"bytes=10-{10 * len(data)}"}).content == data[10:]
    beyond = http.get(f"/blobs/{sha}", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    head = http.head(f"/blobs/{sha}", headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""
    assert http.get(f"/blobs/{sha256_of(b'absent')}").status_code == 404


def test_upload_sessions_need_the_worker_token(panel: LivePanel, http: httpx.Client) -> None:
    upload = open_session(http, 1)
    with httpx.Client(base_url=panel.url + "/internal/v1") as stranger:
        assert stranger.post("/uploads", json={"size": 1}).status_code == 401
        assert stranger.get(upload).status_code == 401
        assert stranger.patch(upload, params={"offset": 0}, content=b"x").status_code == 401
        assert stranger.post(f"{upload}/commit", json={"sha256": sha256_of(b"x")}).status_code == 401
    assert http.get(upload).json() == {"offset": 0, "complete": False}
    http.patch(upload, params={"offset": 0}, content=b"x")
    assert http.post(f"{upload}/commit", json={"sha256": sha256_of(b"x")}).json()["complete"] is True


def test_the_worker_channel_needs_the_worker_token(panel: LivePanel, http: httpx.Client) -> None:
    sha = put_blob(http, b"secret weights")
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        with httpx.Client(base_url=panel.url + "/internal/v1", headers=headers) as stranger:
            assert stranger.get(f"/blobs/{sha}").status_code == 401
            assert stranger.get(f"/blobs/{sha}/upload").status_code == 401
            assert stranger.patch(f"/blobs/{sha256_of(b'x')}/upload", params={"offset": 0, "size": 1},
                                  content=b"x").status_code == 401
            assert stranger.get("/runs/1/artifacts/adapter").status_code == 401
    # A user's session is not the worker token either.
    assert panel.api.get(f"/internal/v1/blobs/{sha}").status_code == 401


# --------------------------------------------------------------------------- manifests
def test_a_manifest_is_recorded_only_once_every_blob_is_stored(panel: LivePanel, db: Session, http: httpx.Client) -> None:
    run = make_run(db)
    stored = put_blob(http, b"stored")
    missing = sha256_of(b"never uploaded")
    manifest = ArtifactManifest(name="checkpoint-5", step=5, files=[
        FileEntry(path="trainer_state.json", sha256=stored, size=6), FileEntry(path="b.bin", sha256=missing, size=14)])
    body = ArtifactRecord(attempt=1, worker_id="w1", manifest=manifest).model_dump(mode="json")

    refused = http.post(f"/runs/{run.id}/artifacts", json=body)
    assert refused.status_code == 409 and refused.json()["missing"] == [missing]
    assert http.get(f"/runs/{run.id}/artifacts/checkpoint-5").status_code == 404

    wrong_attempt = http.post(f"/runs/{run.id}/artifacts", json={**body, "attempt": 2})
    assert wrong_attempt.status_code == 409 and "attempt" in wrong_attempt.json()["detail"]
    outside = {**body, "manifest": {**body["manifest"], "files": [{"path": "../x", "sha256": stored, "size": 6}]}}
    assert http.post(f"/runs/{run.id}/artifacts", json=outside).status_code == 422
    misnamed = {**body, "manifest": {**body["manifest"], "name": "final"}}
    assert http.post(f"/runs/{run.id}/artifacts", json=misnamed).status_code == 422
    unfinished = {**body, "manifest": {**body["manifest"], "files": body["manifest"]["files"][1:]}}
    assert "trainer_state.json" in http.post(f"/runs/{run.id}/artifacts", json=unfinished).json()["detail"]
    assert http.post("/runs/999999/artifacts", json=body).status_code == 404

    put_blob(http, b"never uploaded")
    recorded = http.post(f"/runs/{run.id}/artifacts", json=body)
    assert recorded.status_code == 200 and recorded.json()["digest"] == manifest.digest
    again = http.post(f"/runs/{run.id}/artifacts", json=body)
    assert again.json()["id"] == recorded.json()["id"]
    served = ArtifactManifest.model_validate(http.get(f"/runs/{run.id}/artifacts/checkpoint-5").json())
    assert served.step == 5 and served.files == sorted(manifest.files, key=lambda f: f.path)


def test_a_new_manifest_under_a_name_replaces_the_old_one(panel: LivePanel, db: Session, http: httpx.Client) -> None:
    run = make_run(db)
    kept, replaced = os.urandom(100), os.urandom(100)
    first = record(db, http, run, ADAPTER_ARTIFACT, {"config.json": kept, "weights.bin": replaced})
    second = record(db, http, run, ADAPTER_ARTIFACT, {"config.json": kept, "weights.bin": os.urandom(100)})
    assert second.digest != first.digest
    assert [(a.name, a.digest) for a in service.list_artifacts(db, run.id)] == [(ADAPTER_ARTIFACT, second.digest)]
    assert service.blob_size(sha256_of(replaced)) is None
    assert service.blob_size(sha256_of(kept)) == 100


# --------------------------------------------------------------------------- retention and garbage
def test_retention_keeps_the_newest_checkpoints_the_best_one_and_the_adapter(
    panel: LivePanel, db: Session, http: httpx.Client,
) -> None:
    run = make_run(db)
    # Evaluations every 10 steps; checkpoint-20's is the lowest. checkpoint-25 is scored by the
    # step-20 evaluation too, but it was not the model evaluated there.
    for step, loss in {10: 0.9, 20: 0.4, 30: 0.7, 40: 0.8, 50: 0.85, 60: 0.95}.items():
        db.add(RunMetric(run_id=run.id, step=step, loss=1.0, eval_loss=loss))
    db.add(RunMetric(run_id=run.id, step=25, loss=0.5))
    db.commit()
    shared = os.urandom(64)
    own = {}
    record(db, http, run, ADAPTER_ARTIFACT, {"adapter.bin": os.urandom(64)})
    for step in (10, 20, 25, 30, 40, 50, 60):
        own[step] = os.urandom(64)
        record(db, http, run, f"checkpoint-{step}", {"trainer_state.json": shared, "weights.bin": own[step]})

    names = [a.name for a in service.list_artifacts(db, run.id)]
    assert names == ["checkpoint-20", "checkpoint-40", "checkpoint-50", "checkpoint-60", ADAPTER_ARTIFACT]
    for step, data in own.items():
        assert (service.blob_size(sha256_of(data)) is not None) == (f"checkpoint-{step}" in names), step
    assert service.blob_size(sha256_of(shared)) == 64


def test_retention_keeps_a_checkpoint_a_live_deployment_serves(panel: LivePanel, db: Session, http: httpx.Client) -> None:
    from app.models import Deployment

    run = make_run(db)
    record(db, http, run, "checkpoint-1", {"trainer_state.json": os.urandom(32)})
    db.add(Deployment(name="served", run_id=run.id, checkpoint="checkpoint-1", status="ready"))
    db.commit()
    for step in (2, 3, 4, 5):
        record(db, http, run, f"checkpoint-{step}", {"trainer_state.json": os.urandom(32)})
    names = [a.name for a in service.list_artifacts(db, run.id)]
    assert names == ["checkpoint-1", "checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_deleting_a_runs_artifacts_collects_its_blobs_but_not_shared_ones(
    panel: LivePanel, db: Session, http: httpx.Client, no_grace: None,
) -> None:
    first, second = make_run(db, "first"), make_run(db, "second")
    shared, only_first, orphan = os.urandom(80), os.urandom(80), os.urandom(80)
    record(db, http, first, ADAPTER_ARTIFACT, {"base.json": shared, "weights.bin": only_first})
    record(db, http, second, ADAPTER_ARTIFACT, {"base.json": shared})
    put_blob(http, orphan)  # uploaded, its manifest never recorded
    abandoned = os.urandom(2 * MiB)
    http.patch(f"/blobs/{sha256_of(abandoned)}/upload", params={"offset": 0, "size": len(abandoned)},
               content=abandoned[:MiB])

    service.delete_run_artifacts(db, first.id)

    assert service.list_artifacts(db, first.id) == []
    assert service.blob_size(sha256_of(only_first)) is None
    assert service.blob_size(sha256_of(shared)) == 80
    assert service.blob_size(sha256_of(orphan)) is None
    assert sha256_of(abandoned) not in staged_uploads()
    referenced = set(db.exec(select(ArtifactFile.sha256)).all())
    assert all(service.blob_size(sha) is not None for sha in referenced)
    # The run row going (cascade) takes its artifact rows with it.
    db.delete(db.get(Run, second.id))
    db.commit()
    assert db.exec(select(RunArtifact).where(RunArtifact.run_id == second.id)).all() == []


def test_young_unreferenced_blobs_are_left_for_their_manifest(panel: LivePanel, db: Session, http: httpx.Client) -> None:
    fresh = put_blob(http, os.urandom(50))
    assert fresh not in service.collect_garbage(db)
    assert service.blob_size(fresh) == 50


def test_an_upload_session_is_collected_once_idle_past_the_grace(panel: LivePanel, db: Session, http: httpx.Client) -> None:
    upload = open_session(http, 2 * MiB)
    http.patch(upload, params={"offset": 0}, content=os.urandom(MiB))
    service.collect_garbage(db)
    assert http.get(upload).json() == {"offset": MiB, "complete": False}

    idle_since = time.time() - get_settings().artifact_gc_grace_s - 1
    os.utime(get_settings().path("artifacts", "staging") / upload.rsplit("/", 1)[1], (idle_since, idle_since))
    service.collect_garbage(db)
    assert http.get(upload).status_code == 404
    assert staged_uploads() == []
