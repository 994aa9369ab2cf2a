"""The S3 backend against a real S3-protocol server on loopback (moto's, on a free port), through
the real panel: the worker round trip, the blobs in the bucket under the prefix (nothing left on
the panel's disk), a big file through an upload session, byte ranges streamed from S3, and garbage
collected from the bucket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from sqlmodel import Session

from app.db import get_engine
from app.services import artifacts as service
from app.settings import get_settings
from tests.live import LivePanel, free_port
from tests.test_artifacts import (
    MiB,
    artifact_panel,
    folder_bytes,
    make_run,
    reporter_to,
    staged_uploads,
    worker_headers,
    write_files,
)
from workers.artifacts import SESSION_UPLOAD_BYTES, fetch_artifact, upload_folder

BUCKET, PREFIX = "tuneboard", "team/runs"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def bucket() -> Iterator:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


@pytest.fixture(scope="module")
def panel(bucket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePanel]:
    store = f"s3://{BUCKET}/{PREFIX}?endpoint_url={bucket.meta.endpoint_url}&region=us-east-1"
    with artifact_panel(tmp_path_factory.mktemp("artifacts-s3"), {"TUNEBOARD_ARTIFACT_STORE": store, **AWS_ENV}) as live:
        yield live


def keys(bucket) -> set[str]:
    listing = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {item["Key"] for item in listing.get("Contents", [])}


def test_folders_travel_through_the_bucket(panel: LivePanel, bucket, tmp_path: Path) -> None:
    reporter = reporter_to(panel.url)
    with Session(get_engine()) as db:
        run = make_run(db)
        # Over boto3's 8 MiB threshold: the panel puts it into the bucket in parts.
        folder = write_files(tmp_path / "checkpoint-3", {
            "weights.bin": os.urandom(9 * MiB), "trainer_state.json": b"{}", "nested/state.pt": os.urandom(1000),
        })
        manifest = upload_folder(reporter, run.id, run.attempt, "w1", folder, "checkpoint-3", 3)

        assert keys(bucket) == {f"{PREFIX}/blobs/{entry.sha256}" for entry in manifest.files}
        assert staged_uploads() == []
        assert not (get_settings().resolved_data_dir / "artifacts" / "blobs").exists()

        fetched = fetch_artifact(reporter, run.id, "checkpoint-3", tmp_path / "second-machine")
        assert folder_bytes(fetched) == folder_bytes(folder)
        weights = next(entry for entry in manifest.files if entry.path == "weights.bin")
        with httpx.Client(base_url=panel.url + "/internal/v1", headers=worker_headers()) as http:
            ranged = http.get(f"/blobs/{weights.sha256}", headers={"Range": f"bytes=5-{MiB + 4}"})
        assert ranged.status_code == 206 and ranged.content == (folder / "weights.bin").read_bytes()[5:MiB + 5]
        on_panel = service.materialize(manifest, tmp_path / "panel" / manifest.digest)
        assert folder_bytes(on_panel) == folder_bytes(folder)

        service.delete_run_artifacts(db, run.id)
        assert keys(bucket) == set()
    reporter.close()


def test_a_big_file_goes_into_the_bucket_through_an_upload_session(panel: LivePanel, bucket, tmp_path: Path) -> None:
    reporter = reporter_to(panel.url)
    with Session(get_engine()) as db:
        run = make_run(db)
        folder = write_files(tmp_path / "checkpoint-4", {
            "weights.bin": os.urandom(SESSION_UPLOAD_BYTES + MiB), "trainer_state.json": b"{}",
        })
        manifest = upload_folder(reporter, run.id, run.attempt, "w1", folder, "checkpoint-4", 4)
        stored = {f"{PREFIX}/blobs/{entry.sha256}" for entry in manifest.files}
        assert keys(bucket) == stored
        assert staged_uploads() == []

        # Sent again, the session's bytes are a blob the bucket holds: the panel discards them.
        assert upload_folder(reporter, run.id, run.attempt, "w1", folder, "checkpoint-4", 4).digest == manifest.digest
        assert keys(bucket) == stored
        assert staged_uploads() == []
        fetched = fetch_artifact(reporter, run.id, "checkpoint-4", tmp_path / "second-machine")
        assert folder_bytes(fetched) == folder_bytes(folder)

        service.delete_run_artifacts(db, run.id)
        assert keys(bucket) == set()
    reporter.close()
