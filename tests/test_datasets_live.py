"""Datasets against a real uvicorn server (an upload cut off mid-stream, the CLI) and through
LLaMA-Factory's own template code with the tiny model (token stats, a rendered row)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from app.cli import cli
from app.db import get_engine
from app.models import Dataset, ModelEntry
from app.models.user import UserRole
from app.services.users import create_token, create_user
from tests.factories import alpaca_rows, dataset_factory
from tests.live import app_in_thread


@pytest.fixture
def live_server(data_dir: Path) -> Iterator[tuple[int, str]]:
    """The real app on a free port and an API token of an admin."""
    with app_in_thread() as port:
        with Session(get_engine()) as session:
            user = create_user(session, "admin", "long enough password", role=UserRole.admin)
            _, token = create_token(session, user, "tests")
        yield port, token


def test_an_upload_cut_off_mid_stream_stores_nothing(live_server, data_dir) -> None:
    port, token = live_server
    content = json.dumps(alpaca_rows(60000)).encode()  # ~3.5 MiB: half is past the first 1 MiB hand-off
    boundary = "tuneboardboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ncut\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.json\"\r\n"
            "Content-Type: application/json\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + len(content) + len(tail)
    request = (f"POST /api/v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()
    incoming = data_dir / "datasets" / ".incoming"
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(request + head + content[: len(content) // 2])
        deadline = time.monotonic() + 10
        while not (incoming.exists() and any(incoming.iterdir())):  # the server is writing the upload
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
    # The connection dropped: the partial file goes and no dataset appears.
    deadline = time.monotonic() + 10
    while any(incoming.iterdir()):
        assert time.monotonic() < deadline, list(incoming.iterdir())
        time.sleep(0.05)
    with Session(get_engine()) as session:
        assert session.exec(select(Dataset)).all() == []
    assert [p.name for p in (data_dir / "datasets").iterdir()] == [".incoming"]


def test_cli_adds_and_lists_datasets(live_server, tmp_path, monkeypatch) -> None:
    port, token = live_server
    monkeypatch.setenv("TUNEBOARD_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TUNEBOARD_TOKEN", token)
    path = tmp_path / "from cli.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in alpaca_rows(7)) + "\n")
    runner = CliRunner()
    added = runner.invoke(cli, ["dataset", "add", str(path), "--name", "cli_data", "--description", "via cli"])
    assert added.exit_code == 0, added.output
    assert "added dataset cli_data" in added.output and "7 rows" in added.output
    again = runner.invoke(cli, ["dataset", "add", str(path)])
    assert again.exit_code == 1 and "already uploaded as dataset 'cli_data'" in again.output
    listed = runner.invoke(cli, ["dataset", "list"])
    assert listed.exit_code == 0 and "cli_data" in listed.output and "jsonl" in listed.output
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}]))
    added = runner.invoke(cli, ["dataset", "add", str(pairs), "--kind", "ranking"])
    assert added.exit_code == 0 and "ranking alpaca json" in added.output, added.output
    listed = runner.invoke(cli, ["dataset", "list", "--kind", "ranking"])
    assert listed.exit_code == 0 and "pairs" in listed.output and "cli_data" not in listed.output


@pytest.mark.slow
def test_token_stats_and_a_row_rendered_by_llamafactory(client, session, tiny_model) -> None:
    model = ModelEntry(name="tiny", path=str(tiny_model), suggested_template="qwen")
    session.add(model)
    session.commit()
    rows = alpaca_rows(6) + [{"instruction": "long " * 200, "input": "", "output": "short"}]
    dataset = dataset_factory(session, "tokens", rows)

    stats = client.get(f"/api/v1/datasets/{dataset.id}/stats", params={"model_id": model.id, "cutoff_len": 100})
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["template"] == "qwen" and body["sampled_rows"] == 7 and body["dropped_rows"] == 0
    assert body["truncated_rows"] == 1 and body["truncated_share"] == round(1 / 7, 4)
    assert sum(body["histogram"]["counts"]) == 7 and body["response_tokens"]["min"] >= 2
    # Cached by model+template: another cutoff_len is answered from the report, without LLaMA-Factory.
    started = time.monotonic()
    wide = client.get(f"/api/v1/datasets/{dataset.id}/stats",
                      params={"model_id": model.id, "template": "qwen", "cutoff_len": 100000}).json()
    assert time.monotonic() - started < 2
    assert wide["truncated_rows"] == 0 and wide["computed_at"] == body["computed_at"]

    preview = client.get(f"/api/v1/datasets/{dataset.id}/preview",
                         params={"model_id": model.id, "template": "qwen", "row": 2}).json()
    segments = preview["rendered"]["segments"]
    assert "<|im_start|>user\nrow 1: say hi<|im_end|>" in segments[0]["text"] and not segments[0]["trained"]
    assert segments[-1]["trained"] and segments[-1]["text"].startswith("hi 1<|im_end|>")

    fragment = client.get(f"/datasets/{dataset.id}/tokens",
                          params={"model_id": model.id, "template": "qwen", "cutoff_len": 100, "row": 1}).text
    assert "token-chart" in fragment and "as the model sees it" in fragment and "14.3 %" in fragment


@pytest.mark.slow
def test_browser_upload_with_progress_column_mapping_and_errors(live_server, tmp_path, tiny_model) -> None:
    """The list page in Chromium: a file whose keys differ gets the column-mapping form; the XHR
    upload (with the page's CSRF header) lands on the detail page; a bad file shows the refusal;
    the token histogram and the rendered row appear for the tiny model."""
    from playwright.sync_api import expect

    from tests.live import chromium_page, log_in_page

    port, _ = live_server
    url = f"http://127.0.0.1:{port}"
    with Session(get_engine()) as session:
        session.add(ModelEntry(name="tiny", path=str(tiny_model), suggested_template="qwen"))
        session.commit()
    mapped = tmp_path / "qa.jsonl"
    mapped.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(3000)))
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\xe9", "output": "ok"}]'.encode("latin-1"))
    with chromium_page() as page:
        log_in_page(page, url, "admin", "long enough password")

        page.goto(f"{url}/datasets")
        expect(page.locator(".empty")).to_contain_text("Upload your first dataset")
        page.set_input_files("#upload-file", str(latin))
        page.click("#upload-button")
        expect(page.locator("#upload-error")).to_contain_text("invalid UTF-8 at byte 21")

        page.set_input_files("#upload-file", str(mapped))
        expect(page.locator("#column-mapping")).to_be_visible()
        expect(page.locator("#mapping-keys")).to_have_text("q, a")
        page.select_option("#map-prompt", "q")
        page.select_option("#map-response", "a")
        page.fill("#upload-name", "qa_pairs")
        page.click("#upload-button")
        page.wait_for_url(f"{url}/datasets/*")
        expect(page.locator("h1")).to_have_text("qa_pairs")
        expect(page.locator("#dataset-info")).to_contain_text('"prompt": "q"')
        expect(page.locator("table").first).to_contain_text("question 0")

        expect(page.locator("#tok-template")).to_have_value("qwen")
        page.fill("#tok-cutoff", "64")
        page.click("#tokens-form button[type=submit]")
        expect(page.locator("#token-chart canvas")).to_be_visible(timeout=180_000)
        expect(page.locator("#tokens")).to_contain_text("would be truncated")
        expect(page.locator("pre.rendered mark")).to_contain_text("answer 0")


LOAD_WITH_LLAMAFACTORY = """
import json, sys
from llamafactory.data.loader import _load_single_dataset
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams import get_train_args
model_path, dataset_dir, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model_args, data_args, training_args, *_ = get_train_args({
    "model_name_or_path": model_path, "stage": "sft", "do_train": True, "finetuning_type": "lora",
    "dataset": ",".join(names), "dataset_dir": dataset_dir, "template": "qwen",
    "output_dir": dataset_dir + "/out", "report_to": "none"})
loaded = {}
for attr in get_dataset_list(names, dataset_dir):
    rows = _load_single_dataset(attr, model_args, data_args, training_args)
    loaded[attr.dataset_name] = [rows[0]["_prompt"][-1]["content"], rows[0]["_response"][0]["content"], len(rows)]
print("RESULT" + json.dumps(loaded))
"""


@pytest.mark.slow
def test_llamafactory_loads_a_runs_dataset_dir(client, session, tiny_model, tmp_path) -> None:
    """The generated dataset_info.json and files, read by LLaMA-Factory's own loader (a BOM upload
    and a mapped JSONL)."""
    import subprocess

    from tests.factories import write_run_dataset_dir
    from app.settings import get_settings

    bom = client.post("/api/v1/datasets", data={"name": "bom"},
                      files={"file": ("bom.json", b"\xef\xbb\xbf" + json.dumps(alpaca_rows(3)).encode())})
    assert bom.status_code == 201, bom.text
    mapped = dataset_factory(session, "mapped", [{"q": "x", "a": "y"}] * 2, jsonl=True, formatting="alpaca",
                             columns={"prompt": "q", "response": "a"})
    run_dir = tmp_path / "run_data"
    write_run_dataset_dir([session.get(Dataset, bom.json()["id"]), mapped], run_dir)
    result = subprocess.run(
        [get_settings().train_python, "-c", LOAD_WITH_LLAMAFACTORY, str(tiny_model), str(run_dir), "bom,mapped"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    line = next((part for part in result.stdout.splitlines() if part.startswith("RESULT")), None)
    assert line is not None, result.stderr[-3000:]
    # LLaMA-Factory names a file dataset by its file_name.
    assert json.loads(line.removeprefix("RESULT")) == {
        f"dataset_{bom.json()['id']}.json": ["row 0: say hi", "hi 0", 3], f"dataset_{mapped.id}.jsonl": ["x", "y", 2]}
