"""Datasets: upload (API, page), every bad input of issue 3 (a clear 4xx and nothing stored),
import, registry, CRUD and the worker file route."""

from __future__ import annotations

import errno
import io
import json
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.models import Dataset, Run, RunStatus, TrainConfig
from app.services import datasets as dataset_service
from app.settings import get_settings
from tests.factories import alpaca_rows, dataset_factory, write_run_dataset_dir

ALPACA = json.dumps(alpaca_rows(5)).encode()


def upload(client: TestClient, content: bytes, filename: str = "data.json", **fields: str):
    return client.post("/api/v1/datasets", data=fields, files={"file": (filename, content)})


def assert_nothing_stored(session: Session, data_dir: Path) -> None:
    session.expire_all()
    assert session.exec(select(Dataset)).all() == []
    root = data_dir / "datasets"
    leftovers = [p for p in root.rglob("*")] if root.exists() else []
    assert leftovers in ([], [root / ".incoming"]), leftovers


def test_upload_registers_the_file_and_shows_it(client, session, data_dir) -> None:
    assert "Upload your first dataset" in client.get("/datasets").text
    response = upload(client, ALPACA, "my data.json", name="greetings", description="hello rows")
    assert response.status_code == 201, response.text
    body = response.json()
    summary = (body["name"], body["row_count"], body["formatting"], body["file_kind"])
    assert summary == ("greetings", 5, "alpaca", "json")
    stored = data_dir / "datasets" / str(body["id"]) / "data.json"
    assert stored.read_bytes() == ALPACA
    assert list((data_dir / "datasets" / ".incoming").iterdir()) == []

    detail = client.get(f"/api/v1/datasets/{body['id']}").json()
    # The keys are LLaMA-Factory's defaults: no `columns` in the entry.
    assert detail["dataset_info"] == {"file_name": f"dataset_{body['id']}.json", "formatting": "alpaca"}
    assert detail["report"]["preview"][0]["instruction"] == "row 0: say hi"
    assert [d["name"] for d in client.get("/api/v1/datasets").json()] == ["greetings"]
    assert "greetings" in client.get("/datasets").text
    page = client.get(f"/datasets/{body['id']}").text
    assert "row 0: say hi" in page and "No problems found" in page
    assert client.get(f"/api/v1/datasets/{body['id']}/download").content == ALPACA


def test_sharegpt_jsonl_with_openai_tags(client) -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    content = "\n".join(json.dumps(r) for r in rows).encode()
    body = upload(client, content, "chat.jsonl").json()
    assert (body["name"], body["formatting"], body["file_kind"], body["row_count"]) == ("chat", "sharegpt", "jsonl", 3)
    entry = client.get(f"/api/v1/datasets/{body['id']}").json()["dataset_info"]
    assert entry["columns"] == {"messages": "messages"}
    assert entry["tags"]["role_tag"] == "role" and entry["tags"]["user_tag"] == "user"


def test_other_keys_need_a_column_mapping(client, session, data_dir) -> None:
    content = json.dumps([{"q": "hello", "a": "hi"}, {"q": "bye", "a": "ciao"}]).encode()
    refused = upload(client, content, "qa.json")
    assert refused.status_code == 400 and "cannot detect the dataset format" in refused.json()["detail"]
    assert_nothing_stored(session, data_dir)
    mapped = upload(client, content, "qa.json", formatting="alpaca",
                    columns=json.dumps({"prompt": "q", "query": None, "response": "a"}))
    assert mapped.status_code == 201, mapped.text
    entry = client.get(f"/api/v1/datasets/{mapped.json()['id']}").json()["dataset_info"]
    assert entry["columns"] == {"prompt": "q", "response": "a"}
    assert upload(client, content, "x.json", formatting="alpaca", columns='{"nope": "q"}').status_code == 400
    boundary = "b0undary"
    late = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.json"\r\n\r\n'.encode()
            + content + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="columns"\r\n\r\n{{}}'
            f"\r\n--{boundary}--\r\n".encode())
    after_file = client.post("/api/v1/datasets", content=late,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert after_file.status_code == 400 and "before the file" in after_file.json()["detail"]


def test_row_problems_are_counted_and_listed(client) -> None:
    rows = alpaca_rows(3) + [alpaca_rows(1)[0]] + [{"instruction": "no output"}, {"instruction": "x", "output": ""}]
    body = upload(client, json.dumps(rows).encode()).json()
    report = client.get(f"/api/v1/datasets/{body['id']}").json()["report"]
    assert report["issue_counts"] == {"duplicate": 1, "empty_output": 1, "missing_output": 1}
    assert {i["row"] for i in report["issues"]} == {4, 5, 6}
    assert "duplicate of row 1" in client.get(f"/datasets/{body['id']}").text


LATIN1 = '[{"instruction": "caf\xe9", "output": "ok"}]'.encode("latin-1")
BAD_INPUTS = {
    "not JSON": (b"hello, world", "not JSON"),
    "truncated JSON": (ALPACA[:-20], "truncated JSON"),
    "object instead of a list": (b'{"data": [{"instruction": "a", "output": "b"}]}', "holds a list of objects"),
    "empty file": (b"", "the file is empty"),
    "empty list": (b"[ ]", "empty list"),
    "latin-1": (LATIN1, f"invalid UTF-8 at byte {LATIN1.index(0xE9)}"),
    "a row that is a string": (b'[{"instruction": "a", "output": "b"}, "just text"]', "row 2 is a JSON string"),
    "instruction as a number": (b'[{"instruction": 42, "output": "b"}]', "'instruction' is a number"),
    "history not pairs": (b'[{"instruction": "a", "output": "b", "history": [["one"]]}]', "'history'[0] has 1 items"),
}


@pytest.mark.parametrize("content,expected", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_and_nothing_is_stored(client, session, data_dir, content, expected) -> None:
    response = upload(client, content)
    assert response.status_code == 400, response.text
    assert expected in response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_object_on_one_line_is_refused_too(client, session, data_dir) -> None:
    response = upload(client, b'{\n "data": [{"instruction": "a", "output": "b"}]\n}')
    assert response.status_code == 400 and "not a list of rows" in response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_utf8_bom_is_accepted_and_removed(client, data_dir) -> None:
    body = upload(client, b"\xef\xbb\xbf" + ALPACA).json()
    stored = (data_dir / "datasets" / str(body["id"]) / "data.json").read_bytes()
    assert stored == ALPACA  # `datasets` (json.load) refuses a BOM: the stored file has none
    assert body["row_count"] == 5 and body["size_bytes"] == len(ALPACA)


def test_a_50_mb_row_is_refused(client, session, data_dir) -> None:
    row = json.dumps([{"instruction": "x" * (50 * 1024 * 1024), "output": "y"}]).encode()
    response = upload(client, row)
    assert response.status_code == 400 and "over the limit" in response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_upload_over_the_size_limit_is_413(client, session, data_dir, monkeypatch) -> None:
    monkeypatch.setenv("TUNEBOARD_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    big = json.dumps(alpaca_rows(100)).encode()
    response = upload(client, big)
    assert response.status_code == 413, response.text
    assert_nothing_stored(session, data_dir)


def test_name_taken_and_same_content_are_409(client, session) -> None:
    first = upload(client, ALPACA, name="taken").json()
    other = json.dumps(alpaca_rows(2, "other")).encode()
    name_clash = upload(client, other, name="taken")
    assert name_clash.status_code == 409 and "already taken" in name_clash.json()["detail"]
    same = upload(client, ALPACA, name="again")
    assert same.status_code == 409
    assert f"already uploaded as dataset 'taken' (id {first['id']})" in same.json()["detail"]
    assert upload(client, other, name="bad name!").status_code == 400
    assert len(session.exec(select(Dataset)).all()) == 1


def test_a_filename_is_never_a_path(client, data_dir, tmp_path) -> None:
    body = upload(client, ALPACA, "../../etc/passwd").json()
    assert body["name"] == "passwd" and body["original_filename"] == "../../etc/passwd"
    assert sorted(p.name for p in (data_dir / "datasets" / str(body["id"])).iterdir()) == [
        "data.json", "preview.json", "sample.jsonl"]
    download = client.get(f"/api/v1/datasets/{body['id']}/download")
    assert download.headers["content-disposition"] == "attachment; filename=\"passwd\"; filename*=UTF-8''passwd"
    # A name in another script keeps its characters in the UTF-8 form, and an ASCII fallback.
    chinese = upload(client, ALPACA + b"\n", "训练数据.json", name="cn").json()
    disposition = client.get(f"/api/v1/datasets/{chinese['id']}/download").headers["content-disposition"]
    assert disposition == "attachment; filename=\"_.json\"; filename*=UTF-8''%E8%AE%AD%E7%BB%83%E6%95%B0%E6%8D%AE.json"


def test_a_write_error_stores_nothing(client, session, data_dir, monkeypatch) -> None:
    """The disk filling up, simulated by making the file write raise OSError(ENOSPC)."""
    def disk_full(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset_service.IncomingFile, "_write", disk_full)
    response = upload(client, ALPACA)
    assert response.status_code == 507 and "disk is full" in response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_rename_describe_delete_and_refusal_while_a_run_uses_it(client, session, data_dir) -> None:
    dataset = dataset_factory(session, "first")
    dataset_id = dataset.id
    patched = client.patch(f"/api/v1/datasets/{dataset_id}", json={"name": "renamed", "description": "d"})
    assert patched.status_code == 200 and patched.json()["name"] == "renamed"
    dataset_factory(session, "second")
    assert client.patch(f"/api/v1/datasets/{dataset_id}", json={"name": "second"}).status_code == 409
    page = client.post(f"/datasets/{dataset_id}/edit", data={"name": "x y", "description": ""}).text
    assert "invalid name" in page and "field-error" in page

    config = TrainConfig(name="c", dataset_ids=[dataset_id])
    session.add(config)
    session.commit()
    run = Run(name="busy", config_id=config.id, status=RunStatus.running)
    session.add(run)
    session.commit()
    refused = client.delete(f"/api/v1/datasets/{dataset_id}")
    assert refused.status_code == 409 and "'busy'" in refused.json()["detail"]
    assert "unfinished run" in client.post(f"/datasets/{dataset_id}/delete").text

    run.status = RunStatus.succeeded
    session.add(run)
    session.commit()
    assert client.delete(f"/api/v1/datasets/{dataset_id}").status_code == 204
    assert not (data_dir / "datasets" / str(dataset_id)).exists()
    assert client.get(f"/api/v1/datasets/{dataset_id}").status_code == 404


def test_registry_for_runs_and_worker_file_route(client, session, tmp_path) -> None:
    plain = dataset_factory(session, "plain")
    mapped = dataset_factory(session, "mapped", [{"q": "a", "a": "b"}], jsonl=True, formatting="alpaca",
                             columns={"prompt": "q", "response": "a"})
    run_dir = tmp_path / "run" / "data"
    info = write_run_dataset_dir([plain, mapped], run_dir)
    assert info == {
        "plain": {"file_name": f"dataset_{plain.id}.json", "formatting": "alpaca"},
        "mapped": {"file_name": f"dataset_{mapped.id}.jsonl", "formatting": "alpaca",
                   "columns": {"prompt": "q", "response": "a"}},
    }
    assert json.loads((run_dir / "dataset_info.json").read_text()) == info
    assert (run_dir / f"dataset_{mapped.id}.jsonl").read_text() == '{"q": "a", "a": "b"}\n'

    assert client.get(f"/internal/v1/datasets/{plain.id}/file").status_code == 401
    token = {"Authorization": f"Bearer {get_settings().worker_token}"}
    served = client.get(f"/internal/v1/datasets/{mapped.id}/file", headers=token)
    assert served.status_code == 200 and served.text == '{"q": "a", "a": "b"}\n'


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path, content in entries.items():
            zf.writestr(path, content)
    return buffer.getvalue()


DATASET_INFO = {
    "alpaca_demo": {"file_name": "alpaca_demo.json"},
    "chat_demo": {"file_name": "sub/chat.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "conversations"}},
    "dpo_demo": {"file_name": "dpo.json", "ranking": True,
                 "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "c4_demo": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
    "hub_demo": {"hf_hub_url": "someone/data"},
}
CHAT = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}).encode()


def test_import_a_zip_of_a_data_folder(client, session) -> None:
    dpo = json.dumps([{"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}]).encode()
    archive = _zip({"data/dataset_info.json": json.dumps(DATASET_INFO).encode(),
                    "data/alpaca_demo.json": ALPACA, "data/sub/chat.jsonl": CHAT, "data/dpo.json": dpo,
                    "data/c4.jsonl": b'{"text": "a document"}\n'})
    response = client.post("/api/v1/datasets/import", files={"archive": ("data.zip", archive)})
    assert response.status_code == 201, response.text
    body = response.json()
    # Preference and pre-training entries are registered with their kind (issue 18); only the hub entry is not.
    kinds = sorted((d["name"], d["kind"]) for d in body["registered"])
    assert kinds == [("alpaca_demo", "sft"), ("c4_demo", "pretrain"), ("chat_demo", "sft"), ("dpo_demo", "ranking")]
    assert {s["name"] for s in body["skipped"]} == {"hub_demo"}
    assert "not a local file" in body["skipped"][0]["reason"]


def test_import_files_and_the_page_form(client, session) -> None:
    info = {"alpaca_demo": {"file_name": "alpaca_demo.json"}}
    files = [("dataset_info", ("dataset_info.json", json.dumps(info).encode())),
             ("files", ("alpaca_demo.json", ALPACA))]
    page = client.post("/datasets/import", files=files).text
    assert "Registered 1" in page and "alpaca_demo" in page
    again = client.post("/datasets/import", files=files).text
    assert "already taken" in again


@pytest.mark.parametrize("evil", ["../escape.json", "/etc/evil.json", "data/../../x.json"])
def test_a_zip_escaping_its_folder_is_refused(client, session, data_dir, evil) -> None:
    archive = _zip({"dataset_info.json": json.dumps({"a": {"file_name": "alpaca_demo.json"}}).encode(),
                    "alpaca_demo.json": ALPACA, evil: ALPACA})
    response = client.post("/api/v1/datasets/import", files={"archive": ("data.zip", archive)})
    assert response.status_code == 400 and "outside the archive" in response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_an_import_with_one_bad_file_stores_nothing(client, session, data_dir) -> None:
    info = {"good": {"file_name": "good.json"}, "bad": {"file_name": "bad.json"}}
    archive = _zip({"dataset_info.json": json.dumps(info).encode(), "good.json": ALPACA, "bad.json": b"[1, 2"})
    response = client.post("/api/v1/datasets/import", files={"archive": ("data.zip", archive)})
    assert response.status_code == 400 and response.json()["detail"].startswith("dataset 'bad':")
    assert_nothing_stored(session, data_dir)
