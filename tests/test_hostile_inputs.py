"""Hostile inputs, round 2 (issue 14): inputs shaped differently from what the schema describes,
sent to `POST /api/v1/datasets` and `POST /api/v1/configs/import`. Each gets a clear 4xx naming the
row or line it failed at, and nothing is stored; the seed tutorial's own YAML imports with its model
and datasets left to resolve; a prod panel over plain http says why logging in does not stick.
The same families, generated at random, run against a live panel in tests/test_fuzz.py."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.db import get_engine
from app.main import create_app
from app.models import ModelEntry, TrainConfig
from app.models.user import UserRole
from app.services.users import create_user
from app.settings import get_settings
from tests.conftest import ADMIN_PASSWORD, ADMIN_USERNAME, log_in, page_csrf_token
from tests.factories import alpaca_rows
from tests.test_configs import config_count
from tests.test_datasets import assert_nothing_stored, upload
from tests.test_model_registry import write_model

GOOD_ROW = {"instruction": "say hi", "input": "", "output": "hi"}


def rows_with(bad_row: str, before: int = 2) -> bytes:
    """A JSON array: `before` good rows, then `bad_row` (raw JSON text), then a good one."""
    good = [json.dumps({**GOOD_ROW, "instruction": f"say hi {i}"}) for i in range(before + 1)]
    return ("[" + ",".join([*good[:before], bad_row, good[before]]) + "]").encode()


def refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    detail = json.dumps(response.json()["detail"])
    for word in words:
        assert word in detail, detail
    return detail


# ------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("bad_row", [
    "[" * 100_000 + "]" * 100_000,  # past Python's recursion limit (was a RecursionError: 500)
    json.dumps({**GOOD_ROW, "meta": json.loads("[" * 200 + "]" * 200)}),  # below it, past the bound
    '{"instruction": "q", "output": "a", "meta": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}",
])
def test_deep_nesting_is_refused_at_its_row(client, session, data_dir, bad_row) -> None:
    refused(upload(client, rows_with(bad_row)), 400, "row 3", "levels deep")
    assert_nothing_stored(session, data_dir)
    assert client.get("/api/v1/datasets").status_code == 200  # still up


@pytest.mark.parametrize("escape", ["\\udc00", "\\ud800", "\\ud83d x", "\\udfff\\ud800"])
def test_a_lone_surrogate_escape_is_refused_at_its_row(client, session, data_dir, escape) -> None:
    bad = '{"instruction": "q", "input": "", "output": "a ' + escape + '"}'
    refused(upload(client, rows_with(bad, before=3)), 400, "row 4", "'output'", "lone surrogate")
    assert_nothing_stored(session, data_dir)
    in_a_key = '{"instruction": "q", "output": "a", "\\udc00": "x"}'
    refused(upload(client, rows_with(in_a_key)), 400, "row 3", "lone surrogate")
    assert_nothing_stored(session, data_dir)


def test_escaped_emoji_pairs_are_text(client) -> None:
    row = '{"instruction": "q \\ud83d\\ude00", "input": "", "output": "\\ud83d\\udc4d"}'
    created = upload(client, rows_with(row), "emoji.json")
    assert created.status_code == 201, created.text
    assert created.json()["row_count"] == 4


@pytest.mark.parametrize(("content", "words"), [
    (json.dumps(alpaca_rows(3)).encode("utf-16"), ("UTF-16", "byte order mark")),
    (json.dumps(alpaca_rows(3)).encode("utf-16-le"), ("UTF-16", "without a byte order mark")),
    (json.dumps(alpaca_rows(3)).encode("utf-16-be"), ("UTF-16", "without a byte order mark")),
    (json.dumps(alpaca_rows(3)).encode("utf-32"), ("UTF-16",)),
    (rows_with(json.dumps({**GOOD_ROW, "output": "café"}, ensure_ascii=False)).replace("é".encode(), b"\xe9"),
     ("row 3", "invalid UTF-8", "byte 0xE9")),
    (rows_with(json.dumps({**GOOD_ROW, "output": "x"})).replace(b'"x"', b'"\xed\xa0\x80"'),  # an encoded surrogate
     ("row 3", "invalid UTF-8")),
    (rows_with(json.dumps(GOOD_ROW), before=1)[:-3] + b"\xe4\xb8", ("the file ends in the middle of a UTF-8",)),
])
def test_other_encodings_are_refused_with_where(client, session, data_dir, content, words) -> None:
    refused(upload(client, content), 400, *words)
    assert_nothing_stored(session, data_dir)


def test_invalid_utf8_in_jsonl_names_its_line(client, session, data_dir) -> None:
    lines = [json.dumps({**GOOD_ROW, "instruction": f"q{i}"}).encode() for i in range(5)]
    lines[3] = lines[3].replace(b"q3", b"q\xff")
    refused(upload(client, b"\n".join(lines), "rows.jsonl"), 400, "row 4", "invalid UTF-8")
    assert_nothing_stored(session, data_dir)


def test_an_enormous_single_row_is_refused_at_its_row(client, session, data_dir) -> None:
    huge = json.dumps({**GOOD_ROW, "output": "x" * (33 * 1024 * 1024)})
    refused(upload(client, rows_with(huge)), 400, "row 3", "over the limit", "per row")
    refused(upload(client, ("\n".join([json.dumps(GOOD_ROW), huge]) + "\n").encode(), "huge.jsonl"), 400, "row 2")
    assert_nothing_stored(session, data_dir)


def test_enormous_key_counts_are_refused_at_their_row(client, session, data_dir) -> None:
    many = json.dumps({**GOOD_ROW, **{f"k{i}": 1 for i in range(1500)}})
    refused(upload(client, rows_with(many)), 400, "row 3", "more than 1000 distinct keys")
    spread = ",".join(json.dumps({**GOOD_ROW, **{f"r{row}k{i}": "v" for i in range(300)}}) for row in range(6))
    refused(upload(client, f"[{spread}]".encode()), 400, "row 4", "distinct keys")
    long_key = json.dumps({**GOOD_ROW, "k" * 5000: 1})
    refused(upload(client, rows_with(long_key)), 400, "row 3", "a key of 5000 characters")
    assert_nothing_stored(session, data_dir)


def test_rows_with_nothing_to_train_on(client, session, data_dir) -> None:
    empty = {"instruction": "", "input": "", "output": ""}
    refused(upload(client, json.dumps([empty]).encode()), 400, "no row has anything to train on", "row 1")
    refused(upload(client, json.dumps([empty, {"instruction": "q", "input": ""}]).encode()), 400,
            "no row has anything to train on")
    chats = [{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}]}] * 2
    refused(upload(client, json.dumps(chats).encode()), 400, "no row has anything to train on")
    assert_nothing_stored(session, data_dir)
    # One empty row among trainable ones is registered, and flagged.
    created = upload(client, json.dumps([GOOD_ROW, empty, {**GOOD_ROW, "output": "hello"}]).encode())
    assert created.status_code == 201, created.text
    report = client.get(f"/api/v1/datasets/{created.json()['id']}").json()["report"]
    assert report["issue_counts"] == {"nothing_to_train": 1} and report["trainable_rows"] == 2
    assert report["issues"][0]["row"] == 2 and "nothing to train on" in report["issues"][0]["message"]


@pytest.mark.parametrize(("rows", "words"), [
    ([{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
       "rejected": {"from": "gpt", "value": "bad"}}], ("row 1", "'chosen' and 'rejected'", "preference")),
    ([{"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}], ("row 1", "preference")),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "kto_tag": True}],
     ("row 1", "'kto_tag'", "KTO")),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False}],
     ("row 1", "'label'", "KTO")),
])
def test_preference_files_are_named_and_refused_as_sft(client, session, data_dir, rows, words) -> None:
    """Asked to register preference or KTO rows as SFT, the upload says what they are (left to
    detect, they are registered with their kind: tests/test_dataset_kinds.py)."""
    for formatting in ("auto", "sharegpt" if "instruction" not in rows[0] else "alpaca"):
        refused(upload(client, json.dumps(rows * 3).encode(), formatting=formatting, kind="sft"), 400, *words)
    assert_nothing_stored(session, data_dir)


def test_dataset_info_and_mappings_that_nest_or_escape_badly(client, session, data_dir) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    answer = client.post("/api/v1/datasets/import", files={"dataset_info": ("dataset_info.json", deep)})
    refused(answer, 400, "dataset_info.json nests too deeply")
    info = b'{"x": {"file_name": "x.json", "description": "\\udc00"}}'
    answer = client.post("/api/v1/datasets/import", files={"dataset_info": ("dataset_info.json", info),
                                                            "files": ("x.json", json.dumps([GOOD_ROW]).encode())})
    refused(answer, 400, "lone surrogate")
    refused(upload(client, json.dumps([GOOD_ROW]).encode(), formatting="alpaca", columns="[" * 30_000), 400,
            "columns nests too deeply")
    assert_nothing_stored(session, data_dir)


# -------------------------------------------------------------------------------------- configs


def import_yaml(client, text: str | bytes, name: str = ""):
    if isinstance(text, bytes):
        return client.post("/api/v1/configs/import", files={"file": ("config.yaml", text)}, data={"name": name})
    return client.post("/api/v1/configs/import", json={"yaml": text, "name": name})


def laughs(levels: int, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_before_it_expands(client, session) -> None:
    text = laughs(6)
    assert len(text) < 400
    refused(import_yaml(client, text), 422, "line 7", "anchors and aliases expand", "billion laughs")
    merges = "m0: &m0 {a: 1, b: 2, c: 3}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}\n" for i in range(1, 7))
    refused(import_yaml(client, merges), 422, "anchors and aliases expand")
    refused(import_yaml(client, "stage: sft\nreport_to: &a [*a]\n"), 422, "line 2", "expand")
    assert config_count(session) == 0
    assert client.get("/configs").status_code == 200


def test_small_anchors_and_merge_keys_still_import(client, session) -> None:
    text = ("<<: {stage: sft, finetuning_type: lora}\nlora_rank: &rank 16\nlora_alpha: *rank\n"
            "template: qwen\nlearning_rate: 2.0e-4\n")
    answer = import_yaml(client, text, "anchored")
    assert answer.status_code == 201, answer.text
    params = answer.json()["config"]["params"]
    assert (params["stage"], params["finetuning_type"], params["lora_rank"], params["lora_alpha"]) == (
        "sft", "lora", 16, 16)


def test_the_size_of_a_configs_parameters_is_capped(client, session) -> None:
    refused(import_yaml(client, "stage: sft\nrun_name: " + "x" * 100_000 + "\n"), 422, "over the limit of 65536")
    refused(import_yaml(client, "stage: sft\nrun_name: " + "x" * 300_000 + "\n"), 413, "over the limit of 262144")
    refused(import_yaml(client, "".join(f"k{i}: {i}\n" for i in range(20_000))), 422,
            "20000 parameters", "fewer than 512")
    body = {"name": "big", "params": {"stage": "sft", "report_to": ["tensorboard" * 10] * 1000}}
    refused(client.post("/api/v1/configs", json=body), 422, "over the limit of 65536")
    body = {"name": "deep", "params": {"stage": "sft", "report_to": json.loads("[" * 20 + "]" * 20)}}
    refused(client.post("/api/v1/configs", json=body), 422, "report_to nests", "levels deep")
    assert config_count(session) == 0


def test_unknown_keys_are_refused_with_the_closest_known_one(client, session) -> None:
    text = "stage: sft\nlerning_rate: 1.0e-4\nnum_train_epoch: 3\nfinetuning_type: lora\nzzz_not_close: 1\n"
    answer = import_yaml(client, text)
    refused(answer, 422)
    errors = {e["field"]: e["message"] for e in answer.json()["errors"]}
    assert errors == {
        "lerning_rate": "lerning_rate is not a LLaMA-Factory training argument: did you mean learning_rate?",
        "num_train_epoch": "num_train_epoch is not a LLaMA-Factory training argument: did you mean num_train_epochs?",
        "zzz_not_close": "zzz_not_close is not a LLaMA-Factory training argument",
    }
    api = client.post("/api/v1/configs", json={"name": "typo", "params": {"lora_rnak": 8}})
    refused(api, 422, "did you mean lora_rank?")
    assert config_count(session) == 0
    # transformers' Seq2SeqTrainingArguments are LLaMA-Factory arguments too.
    known = import_yaml(client, "stage: sft\nweight_decay: 0.01\nmax_grad_norm: 1.0\nadam_beta2: 0.95\n")
    assert known.status_code == 201, known.text


@pytest.mark.parametrize(("text", "words"), [
    ("stage: sft\nx: !!python/object/apply:os.system ['touch {marker}']\n", ("line 2", "!!python/object/apply")),
    ("stage: sft\nrun_name: !!python/name:os.system\n", ("line 2", "!!python/name")),
    ("stage: sft\nrun_name: !!binary aGVsbG8=\n", ("line 2", "!!binary")),
    ("stage: sft\nreport_to: !!set {{a: null}}\n", ("line 2", "!!set")),
    ("stage: sft\nrun_name: !local thing\n", ("line 2", "!local")),
    ("stage: sft\n---\nstage: pt\n", ("line 2", "several YAML documents")),
    ("stage: sft\n...\n---\n!!python/object/apply:os.system ['touch {marker}']\n", ("several YAML documents",)),
    ("stage: sft\nreport_to: " + "[" * 40 + "]" * 40 + "\n", ("line 2", "nest more than 8 levels")),
    ('stage: sft\nrun_name: "\\udc00"\n', ("line 2", "surrogate")),
    ("stage: sft\nrun_name: a\x00b\n", ("line 2", "#x0000")),
    ("stage: sft\n? [a, b]\n: 1\n", ("line 2", "unhashable key")),
])
def test_yaml_features_are_refused_at_their_line(client, session, tmp_path, text, words) -> None:
    marker = tmp_path / "executed"
    refused(import_yaml(client, text.format(marker=marker)), 422, *words)
    assert not marker.exists() and config_count(session) == 0


@pytest.mark.parametrize(("content", "words"), [
    ("stage: sft\n".encode("utf-16"), ("UTF-16",)),
    ("stage: sft\n".encode("utf-16-le"), ("UTF-16",)),
    ("stage: sft\n".encode("utf-32"), ("UTF-16 or UTF-32",)),
    (b"stage: sft\ntemplate: qwen\nrun_name: caf\xe9\n", ("line 3", "invalid UTF-8", "0xE9")),
])
def test_yaml_files_in_other_encodings_are_refused(client, session, content, words) -> None:
    refused(import_yaml(client, content), 422, *words)
    page = client.post("/configs/import", files={"file": ("c.yaml", content)}, data={"yaml": "", "name": ""})
    assert page.status_code == 422 and 'id="error-import-yaml"' in page.text
    assert config_count(session) == 0
    bom = import_yaml(client, "\ufeffstage: sft\n".encode(), "bom")  # UTF-8's byte order mark is fine
    assert bom.status_code == 201, bom.text


def test_lone_surrogates_in_json_bodies_are_refused(client, session) -> None:
    headers = {"Content-Type": "application/json"}
    body = '{"yaml": "stage: sft\\nrun_name: \\udc00"}'
    refused(client.post("/api/v1/configs/import", content=body, headers=headers), 422, "line 1", "surrogate")
    body = '{"name": "x", "params": {"stage": "sft", "run_name": "\\udc00"}}'
    refused(client.post("/api/v1/configs", content=body, headers=headers), 422, "lone surrogate")
    body = '{"name": "\\udc00", "params": {"stage": "sft"}}'
    refused(client.post("/api/v1/configs", content=body, headers=headers), 422, "lone surrogate")
    assert config_count(session) == 0


# The seed tutorial's YAML, as its readers have it: paths relative to their own machine.
SEED_TUTORIAL_YAML = """\
### model
model_name_or_path: ../model_hub/Qwen2.5-7B-Instruct

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset_dir: data
dataset: alpaca_clue_train
template: qwen
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/qwen2.5-7b-instruct/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_the_seed_tutorials_yaml_imports_with_its_model_and_datasets_to_resolve(client, session, data_dir) -> None:
    folder = write_model(data_dir.parent / "models", "Qwen2.5-7B-Instruct")
    model = client.post("/api/v1/models", json={"path": str(folder)}).json()
    answer = import_yaml(client, SEED_TUTORIAL_YAML, "tutorial")
    assert answer.status_code == 201, answer.text
    config, notices = answer.json()["config"], " ".join(answer.json()["notices"])
    assert config["model_id"] is None and config["dataset_ids"] == []
    assert "../model_hub/Qwen2.5-7B-Instruct is kept unresolved" in notices
    assert "outside the allowed folders" in notices and "Qwen2.5-7B-Instruct has the same folder name" in notices
    assert "datasets alpaca_clue_train are not registered" in notices
    # Every parameter is kept; only the panel's per-run folders are dropped.
    exported = yaml.safe_load(client.get(f"/api/v1/configs/{config['id']}/yaml").text)
    for key, value in yaml.safe_load(SEED_TUTORIAL_YAML).items():
        if key not in ("output_dir", "dataset_dir"):
            assert exported[key] == value, key
    assert len(session.exec(select(ModelEntry)).all()) == 1  # nothing registered on the way

    # The page says why it cannot run, and offers the model of the same folder name.
    page = client.get(f"/configs/{config['id']}").text
    assert 'id="start-run"' not in page and 'id="run-blockers"' in page
    assert "../model_hub/Qwen2.5-7B-Instruct is not a registered model" in page
    assert "Datasets still to register: alpaca_clue_train" in page
    assert 'id="use-suggested-model"' in page and f'name="model_id" value="{model["id"]}"' in page
    started = client.post("/api/v1/runs", json={"config_id": config["id"]})
    assert started.status_code == 400 and "has no base model" in started.json()["detail"]

    chosen = client.post(f"/configs/{config['id']}/use-model", data={"model_id": str(model["id"])},
                         follow_redirects=False)
    assert chosen.status_code == 303
    resolved = client.get(f"/api/v1/configs/{config['id']}").json()
    assert resolved["model_id"] == model["id"] and "model_name_or_path" not in resolved["params"]
    page = client.get(f"/configs/{config['id']}").text
    assert 'id="start-run"' not in page and "Datasets still to register: alpaca_clue_train" in page
    started = client.post("/api/v1/runs", json={"config_id": config["id"]})
    assert started.status_code == 400 and "has no dataset" in started.json()["detail"]

    # Registering the dataset under its name and choosing it resolves the last blocker.
    dataset = upload(client, json.dumps(alpaca_rows(20)).encode(), name="alpaca_clue_train").json()
    edited = client.put(f"/api/v1/configs/{config['id']}", json={**resolved, "dataset_ids": [dataset["id"]]})
    assert edited.status_code == 200, edited.text
    assert edited.json()["dataset_ids"] == [dataset["id"]] and "dataset" not in edited.json()["params"]
    page = client.get(f"/configs/{config['id']}").text
    assert 'id="start-run"' in page and 'id="run-blockers"' not in page
    assert yaml.safe_load(client.get(f"/api/v1/configs/{config['id']}/yaml").text)["dataset"] == "alpaca_clue_train"


def test_an_unmatched_model_reference_asks_the_user_to_pick_one(client, session) -> None:
    for reference in ("../model_hub/Some-Model", "/opt/elsewhere/Some-Model", "Qwen/Qwen3-4B-Instruct-2507"):
        answer = import_yaml(client, f"model_name_or_path: {reference}\nstage: sft\ntemplate: qwen\n")
        assert answer.status_code == 201, answer.text
        assert "choose a registered model, or register its folder" in " ".join(answer.json()["notices"])
        config = answer.json()["config"]
        assert config["params"]["model_name_or_path"] == reference
        page = client.get(f"/configs/{config['id']}").text
        assert 'id="start-run"' not in page and "No dataset is chosen" in page
        assert 'id="use-suggested-model"' not in page
        # An edit keeps the reference as the YAML wrote it.
        assert client.put(f"/api/v1/configs/{config['id']}", json=config).status_code == 200
    # Typed in the API rather than imported, a path must still name an allowed folder.
    typed = client.post("/api/v1/configs", json={"name": "typed", "params": {"model_name_or_path": "/etc"}})
    refused(typed, 422, "outside the allowed folders")
    assert config_count(session) == 3


# ------------------------------------------------------------------------------ prod over http


@pytest.fixture
def prod(data_dir, monkeypatch):
    """The data dir's settings, but TUNEBOARD_ENVIRONMENT=prod (Secure session cookies)."""
    monkeypatch.setenv("TUNEBOARD_ENVIRONMENT", "prod")
    monkeypatch.setenv("TUNEBOARD_SECRET_KEY", "a secret of this test, long enough")
    get_settings.cache_clear()
    get_engine.cache_clear()
    return monkeypatch


def _admin() -> None:
    with Session(get_engine()) as session:
        create_user(session, ADMIN_USERNAME, ADMIN_PASSWORD, role=UserRole.admin)


def test_prod_over_plain_http_says_why_logging_in_does_not_stick(prod, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="app.security"), TestClient(create_app()) as http_client:
        assert 'id="needs-https"' in http_client.get("/setup").text  # the first admin's form too
        _admin()
        page = http_client.get("/login")
        assert 'id="needs-https"' in page.text and "TUNEBOARD_ALLOW_HTTP=true" in page.text
        assert "secure" in page.headers["set-cookie"].lower()
        # The browser keeps the Secure cookie to itself over http: the form's own check fails.
        form = {"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD, "csrf_token": page_csrf_token(page.text)}
        answer = http_client.post("/login", data=form, follow_redirects=False)
        assert answer.status_code == 403 and 'id="needs-https"' in answer.text
    assert any("TUNEBOARD_ALLOW_HTTP=true" in record.getMessage() for record in caplog.records)
    with TestClient(create_app(), base_url="https://testserver") as https_client:
        assert 'id="needs-https"' not in https_client.get("/login").text
        log_in(https_client, ADMIN_USERNAME, ADMIN_PASSWORD)
        assert https_client.get("/account").status_code == 200


def test_allow_http_keeps_the_cookie_usable_over_http(prod, caplog) -> None:
    prod.setenv("TUNEBOARD_ALLOW_HTTP", "true")
    get_settings.cache_clear()
    with caplog.at_level(logging.WARNING, logger="app.security"), TestClient(create_app()) as http_client:
        _admin()
        page = http_client.get("/login")
        assert 'id="needs-https"' not in page.text and "secure" not in page.headers["set-cookie"].lower()
        log_in(http_client, ADMIN_USERNAME, ADMIN_PASSWORD)
        assert http_client.get("/account").status_code == 200
    assert not any("TUNEBOARD_ALLOW_HTTP" in record.getMessage() for record in caplog.records)


def test_a_config_refused_for_its_keys_registers_no_model(client, session, data_dir) -> None:
    """An in-roots model folder named by a refused YAML is not registered (nothing stored)."""
    folder = write_model(data_dir.parent / "models", "Qwen2.5-0.5B-Instruct")
    refused(import_yaml(client, f"model_name_or_path: {folder}\nlerning_rate: 1.0e-4\n"), 422, "learning_rate")
    assert session.exec(select(ModelEntry)).all() == [] and session.exec(select(TrainConfig)).all() == []
    accepted = import_yaml(client, f"model_name_or_path: {folder}\nlearning_rate: 1.0e-4\n")
    assert accepted.status_code == 201 and accepted.json()["config"]["model_id"] is not None
