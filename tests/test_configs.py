"""Configs: the form, the API, YAML both ways, versions, diffs and every refused input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlmodel import select

from app.models import Run, TrainConfig
from app.services.configs import freeze, render_train_yaml
from tests.factories import alpaca_rows, dataset_factory
from tests.test_model_registry import write_model

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"

DEFAULT_YAML = """\
### model
model_name_or_path: {model}
flash_attn: auto

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: alpaca_demo
template: qwen
cutoff_len: 1024
max_samples: 15000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 8

### output
output_dir: saves/qwen2.5-0.5b-instruct/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
include_num_input_tokens_seen: non_padding

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


@pytest.fixture
def registered(client, session, data_dir):
    """One registered Instruct model and one 40-row Alpaca dataset."""
    folder = write_model(data_dir.parent / "models", "Qwen2.5-0.5B-Instruct")
    model = client.post("/api/v1/models", json={"path": str(folder)}).json()
    dataset = dataset_factory(session, "alpaca_demo", alpaca_rows(40))
    return {"model": model, "dataset_id": dataset.id, "path": str(folder)}


def form_fields(client) -> dict:
    """What the browser sends for /configs/new untouched: every field with its shown value."""
    import re

    html = client.get("/configs/new").text
    fields: dict = {}
    for tag in re.findall(r"<input [^>]*>", html):
        name = re.search(r'name="([^"]+)"', tag)
        if not name or name.group(1) in ("csrf_token", "dataset_ids"):
            continue
        value = re.search(r'value="([^"]*)"', tag)
        if 'type="checkbox"' in tag:
            if " checked" in tag:
                fields[name.group(1)] = value.group(1)
        else:
            fields[name.group(1)] = value.group(1) if value else ""
    for select_html in re.findall(r'<select id="([^"]+)" name="[^"]+"[^>]*>(.*?)</select>', html, re.S):
        chosen = re.search(r'<option value="([^"]*)" selected', select_html[1])
        fields[select_html[0]] = chosen.group(1) if chosen else re.search(r'<option value="([^"]*)"', select_html[1]).group(1)
    fields["advanced"] = re.search(r'<textarea id="advanced" name="advanced"[^>]*>(.*?)</textarea>', html, re.S).group(1)
    return fields


def config_count(session) -> int:
    session.expire_all()
    return len(session.exec(select(TrainConfig)).all())


# ----------------------------------------------------------------------------- the form


def test_new_form_starts_from_the_well_known_config(client, registered) -> None:
    page = client.get("/configs/new")
    assert page.status_code == 200
    for field_id in ("name", "model_id", "template", "learning_rate", "max_samples", "gradient_checkpointing",
                     "quantization_bit", "packing", "neat_packing", "enable_liger_kernel", "seed", "report_to",
                     "lora_alpha", "lora_dropout", "advanced", "gpus", f"dataset-{registered['dataset_id']}"):
        assert f'id="{field_id}"' in page.text, field_id
    for section, title in (("model", "Model"), ("method", "Fine-tuning method"), ("dataset", "Data"),
                           ("output", "Logging and checkpoints"), ("train", "Training"), ("eval", "Evaluation")):
        assert f'id="section-{section}"' in page.text and f"<strong>{title}</strong>" in page.text
    assert "debug" in page.text and "full training" in page.text and "the whole dataset" in page.text
    assert 'id="output_dir"' not in page.text and 'id="dataset_dir"' not in page.text

    fields = form_fields(client)
    fields.update(name="first", dataset_ids=[str(registered["dataset_id"])])
    created = client.post("/configs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303, created.text
    config_id = int(created.headers["location"].rsplit("/", 1)[1])
    exported = client.get(f"/api/v1/configs/{config_id}/yaml").text
    assert exported == DEFAULT_YAML.format(model=registered["path"])
    detail = client.get(f"/configs/{config_id}")
    assert 'id="config-yaml"' in detail.text and 'data-copy="#config-yaml"' in detail.text
    download = client.get(f"/api/v1/configs/{config_id}/yaml?download=true")
    assert "attachment" in download.headers["content-disposition"] and download.text == exported


def test_form_maps_gradient_checkpointing_and_keeps_advanced_keys(client, registered) -> None:
    fields = form_fields(client)
    fields.pop("gradient_checkpointing")  # unchecked
    fields.update(name="no-gc", dataset_ids=[str(registered["dataset_id"])], packing="true", seed="7",
                  quantization_bit="", report_to="tensorboard",
                  advanced=fields["advanced"] + "weight_decay: 0.01\nmax_grad_norm: 1.0\n")
    created = client.post("/configs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303, created.text
    args = yaml.safe_load(client.get(created.headers["location"].replace("/configs/", "/api/v1/configs/") + "/yaml").text)
    assert args["disable_gradient_checkpointing"] is True
    assert (args["packing"], args["seed"], args["report_to"]) == (True, 7, "tensorboard")
    assert (args["weight_decay"], args["max_grad_norm"]) == (0.01, 1.0)
    assert "quantization_bit" not in args and "neat_packing" not in args


def test_live_estimates(client, session, registered) -> None:
    small = dataset_factory(session, "small", alpaca_rows(10, "s"))
    fields = form_fields(client)
    fields.update(name="est", dataset_ids=[str(registered["dataset_id"]), str(small.id)], max_samples="25",
                  per_device_train_batch_size="2", gradient_accumulation_steps="2", num_train_epochs="2.0")
    fragment = client.post("/configs/form/estimate", data=fields, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and fragment.text.lstrip().startswith('<div id="estimates"')
    # 25 of alpaca_demo's 40 rows + all 10 of small = 35; 4 held out (val_size 0.1) → 31 train rows;
    # ceil(31 / 2) = 16 batches → 8 steps per epoch, 16 in 2 epochs.
    assert "35 of 50 rows" in fragment.text and "15 left out by max_samples" in fragment.text
    assert '<dd id="est-steps-epoch">8</dd>' in fragment.text
    assert '<dd id="est-total-steps">16</dd>' in fragment.text
    assert "characters ÷ 4" in fragment.text
    assert "max_samples 25 leaves 15 of them out" in fragment.text  # sampling drops data


# ------------------------------------------------------------------------------ refusals


def _api_body(registered, **params):
    from app.services.llamafactory_params import default_params

    return {"name": "bad", "model_id": registered["model"]["id"], "dataset_ids": [registered["dataset_id"]],
            "params": {**default_params(), **params}}


@pytest.mark.parametrize(("params", "field", "words"), [
    ({"learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"learning_rate": -1e-4}, "learning_rate", "greater than 0"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "greater than 0"),
    ({"num_train_epochs": -1}, "num_train_epochs", "greater than 0"),
    ({"num_train_epochs": 0}, "num_train_epochs", "greater than 0"),
    ({"val_size": 1}, "val_size", "below 1"),
    ({"val_size": 1.5}, "val_size", "below 1"),
    ({"val_size": 0, "eval_strategy": "steps"}, "eval_strategy", "needs evaluation data"),
    ({"template": "no_such_template"}, "template", "unknown template"),
    ({"output_dir": "/etc/evil"}, "output_dir", "set by the panel"),
    ({"dataset_dir": "/root"}, "dataset_dir", "set by the panel"),
    ({"deepspeed": "/tmp/ds.json"}, "deepspeed", "bundled DeepSpeed config"),
    ({"learning_rate": "fast"}, "learning_rate", "must be a number"),
])
def test_bad_input_is_refused_next_to_the_field(client, session, registered, params, field, words) -> None:
    answer = client.post("/api/v1/configs", json=_api_body(registered, **params))
    assert answer.status_code == 422, answer.text
    errors = {e["field"]: e["message"] for e in answer.json()["errors"]}
    assert words in errors[field], errors
    assert config_count(session) == 0


def test_model_refusals(client, session, registered) -> None:
    for body, words in [
        ({**_api_body(registered), "model_id": 999}, "does not exist"),
        ({**_api_body(registered), "model_id": None,
          "params": {"model_name_or_path": "/etc", "template": "qwen"}}, "outside"),
        ({**_api_body(registered), "model_id": None,
          "params": {"model_name_or_path": "../../etc", "template": "qwen"}}, "outside"),
    ]:
        answer = client.post("/api/v1/configs", json=body)
        assert answer.status_code == 422, answer.text
        assert words in {e["field"]: e["message"] for e in answer.json()["errors"]}["model_id"]
    assert config_count(session) == 0


def test_form_errors_are_shown_next_to_fields(client, session, registered) -> None:
    fields = form_fields(client)
    fields.update(name="bad", learning_rate="-1", val_size="0", template="nope", advanced="output_dir: /etc\n")
    answer = client.post("/configs/new", data=fields)
    assert answer.status_code == 422
    for field in ("learning_rate", "eval_strategy", "template", "output_dir"):
        assert f'id="error-{field}"' in answer.text, field
    assert "Nothing was saved" in answer.text and config_count(session) == 0


@pytest.mark.parametrize(("text", "words"), [
    ("- just\n- a list\n", "mapping"),
    ("plain words", "mapping"),
    ("", "mapping"),
    ("stage: [unclosed", "not valid YAML"),
    ("!!python/object/apply:os.system ['touch {marker}']\n", "not allowed"),
    ("stage: sft\nx: !!python/object/apply:os.system ['touch {marker}']\n", "not allowed"),
    ("stage: sft\ndeepspeed: /home/me/ds.json\n", "bundled DeepSpeed config"),
    ("stage: sft\nadapter_name_or_path: /etc\n", "set by the panel"),
])
def test_bad_yaml_is_refused_and_never_executed(client, session, tmp_path, text, words) -> None:
    marker = tmp_path / "executed"
    answer = client.post("/api/v1/configs/import", json={"yaml": text.format(marker=marker)})
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["detail"]
    assert not marker.exists()
    assert config_count(session) == 0


# -------------------------------------------------------------------------- YAML both ways


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_import_llamafactory_examples_keeps_every_key(client, session, fixture) -> None:
    text = (FIXTURES / fixture).read_text()
    original = yaml.safe_load(text)
    answer = client.post("/api/v1/configs/import", files={"file": (fixture, text.encode())})
    assert answer.status_code == 201, answer.text
    config, notices = answer.json()["config"], answer.json()["notices"]
    assert config["name"] == fixture.removesuffix(".yaml")
    assert any("output_dir" in n for n in notices)
    exported = client.get(f"/api/v1/configs/{config['id']}/yaml").text
    again = yaml.safe_load(exported)
    dropped = {"output_dir", "trust_remote_code"}  # the panel's per-run folder; remote code never runs
    for key, value in original.items():
        if key not in dropped:
            assert again[key] == value, key
    # Importing the export changes nothing.
    second = client.post("/api/v1/configs/import", json={"yaml": exported, "name": "again"}).json()["config"]
    assert client.get(f"/api/v1/configs/{second['id']}/yaml").text == exported


def test_panel_yaml_round_trip_is_byte_identical(client, registered) -> None:
    body = _api_body(registered, lora_alpha=16, lora_dropout=0.05, warmup_ratio=0.03, learning_rate=2e-5,
                     neat_packing=True, packing=True, report_to="none", weight_decay=0.0)
    body["name"], body["gpus"] = "mine", 1
    created = client.post("/api/v1/configs", json=body)
    assert created.status_code == 201, created.text
    first = client.get(f"/api/v1/configs/{created.json()['id']}/yaml").text
    assert "learning_rate: 2.0e-5\n" in first
    imported = client.post("/api/v1/configs/import", json={"yaml": first, "name": "copy"}).json()
    assert imported["config"]["model_id"] == registered["model"]["id"]
    assert imported["config"]["dataset_ids"] == [registered["dataset_id"]]
    second = client.get(f"/api/v1/configs/{imported['config']['id']}/yaml").text
    assert second == first
    # And through the page: paste into the import form.
    page = client.post("/configs/import", data={"yaml": first, "name": "pasted", "file": ""},
                       files={"file": ("", b"")})
    assert page.status_code == 200 and first.splitlines()[1] in page.text


def test_import_page_shows_the_error(client, session) -> None:
    answer = client.post("/configs/import", files={"file": ("", b"")}, data={"yaml": "- a\n- b\n", "name": "x"})
    assert answer.status_code == 422 and 'id="error-import-yaml"' in answer.text
    assert config_count(session) == 0


def test_render_train_yaml_for_a_run(client, session, registered) -> None:
    config_id = client.post("/api/v1/configs", json={**_api_body(registered), "name": "run"}).json()["id"]
    config = session.get(TrainConfig, config_id)
    config.params = {**config.params, "save_steps": 5}
    text = render_train_yaml(config, output_dir="/data/runs/1/output", dataset_dir="/data/runs/1/data",
                             dataset_names=["alpaca_demo", "more"], gpus=0)
    args = yaml.safe_load(text)
    assert text.startswith("### model\nmodel_name_or_path: ")
    assert (args["output_dir"], args["dataset_dir"], args["dataset"]) == (
        "/data/runs/1/output", "/data/runs/1/data", "alpaca_demo,more")
    assert args["save_steps"] == 5
    assert args["bf16"] is False  # gpus 0: a CPU run trains in fp32
    assert [line for line in text.splitlines() if line.startswith("###")] == [
        "### model", "### method", "### dataset", "### output", "### train", "### eval"]
    # The run's GPUs decide, not the config's: a run given a GPU keeps bf16 from a CPU config.
    assert config.gpus == 0
    assert yaml.safe_load(render_train_yaml(config, output_dir="o", dataset_dir="d", dataset_names=["a"], gpus=1))["bf16"]


def test_cpu_bf16_is_announced(client, registered) -> None:
    answer = client.post("/api/v1/configs/estimate", json=_api_body(registered))
    assert answer.status_code == 200
    fields = form_fields(client)
    assert "bf16" not in fields  # no GPU worker: the form starts with bf16 off
    fields.update(name="cpu", dataset_ids=[str(registered["dataset_id"])], bf16="true")
    fragment = client.post("/configs/form/estimate", data=fields)
    assert "bf16 needs a GPU; the run will use fp32 on CPU" in fragment.text


def test_instruct_model_with_a_base_template_warns(client, registered) -> None:
    fields = form_fields(client)
    fields.update(name="alp", dataset_ids=[str(registered["dataset_id"])], template="alpaca")
    fragment = client.post("/configs/form/estimate", data=fields)
    assert "Instruct/Chat model" in fragment.text


# ------------------------------------------------------------------- versions and diffs


def test_editing_a_frozen_config_makes_a_new_version(client, session, registered) -> None:
    config_id = client.post("/api/v1/configs", json={**_api_body(registered), "name": "v"}).json()["id"]
    body = client.get(f"/api/v1/configs/{config_id}").json()
    body["params"]["learning_rate"] = 2e-4
    edited = client.put(f"/api/v1/configs/{config_id}", json=body).json()
    assert edited["id"] == config_id and edited["version"] == 1  # not frozen: in place

    freeze(session, session.get(TrainConfig, config_id))
    body["params"]["lora_rank"] = 16
    fields = form_fields(client)  # the page form too
    new = client.put(f"/api/v1/configs/{config_id}", json=body).json()
    assert (new["parent_id"], new["version"], new["frozen"]) == (config_id, 2, False)
    session.expire_all()
    assert session.get(TrainConfig, config_id).params["lora_rank"] == 8

    diff = client.get(f"/api/v1/configs/{config_id}/diff/{new['id']}").json()["changes"]
    assert diff == [{"key": "lora_rank", "a": 8, "b": 16, "only_in": None}]
    page = client.get(f"/configs/{config_id}/diff/{new['id']}")
    assert page.status_code == 200 and 'data-key="lora_rank"' in page.text
    assert f'href="/configs/{config_id}/diff/{new["id"]}"' in client.get(f"/configs/{new['id']}").text

    edit_page = client.get(f"/configs/{config_id}/edit")
    assert "saving creates version 2" in edit_page.text
    fields.update(name="v", model_id=str(registered["model"]["id"]), dataset_ids=[str(registered["dataset_id"])],
                  lora_rank="32")
    saved = client.post(f"/configs/{config_id}/edit", data=fields, follow_redirects=False)
    assert saved.status_code == 303
    third = client.get(saved.headers["location"].replace("/configs/", "/api/v1/configs/")).json()
    assert (third["parent_id"], third["version"], third["params"]["lora_rank"]) == (config_id, 2, 32)


def test_delete(client, session, registered) -> None:
    config_id = client.post("/api/v1/configs", json={**_api_body(registered), "name": "d"}).json()["id"]
    session.add(Run(name="r", config_id=config_id))
    session.commit()
    assert client.delete(f"/api/v1/configs/{config_id}").status_code == 409
    other = client.post("/api/v1/configs", json={**_api_body(registered), "name": "e"}).json()["id"]
    assert client.delete(f"/api/v1/configs/{other}").status_code == 204
    assert client.get(f"/api/v1/configs/{other}").status_code == 404


def test_list_page_and_empty_state(client, registered) -> None:
    assert "No configs yet" in client.get("/configs").text
    client.post("/api/v1/configs", json={**_api_body(registered), "name": "listed"})
    page = client.get("/configs")
    assert "listed" in page.text and 'id="import-yaml"' in page.text


def test_imported_dataset_names_resolve_or_are_kept(client, session) -> None:
    identity = dataset_factory(session, "identity", alpaca_rows(3, "id"))
    text = (FIXTURES / "llama3_lora_sft.yaml").read_text()
    config = client.post("/api/v1/configs/import", json={"yaml": text, "name": "mixed"}).json()["config"]
    assert config["dataset_ids"] == [identity.id] and config["params"]["dataset"] == "alpaca_en_demo"
    assert "dataset: identity,alpaca_en_demo\n" in client.get(f"/api/v1/configs/{config['id']}/yaml").text
    # What the API returns can be sent back unchanged.
    assert client.put(f"/api/v1/configs/{config['id']}", json=config).status_code == 200
    edit = client.get(f"/configs/{config['id']}/edit")
    assert "alpaca_en_demo" in edit.text and "not registered" in edit.text


def test_an_emptied_advanced_box_still_trains(client, registered) -> None:
    """do_train has no field of its own: clearing the advanced lines must not make an eval-only run."""
    fields = form_fields(client)
    fields.update(name="no-advanced", dataset_ids=[str(registered["dataset_id"])], advanced="")
    created = client.post("/configs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303, created.text
    args = yaml.safe_load(client.get(created.headers["location"].replace("/configs/", "/api/v1/configs/") + "/yaml").text)
    assert args["do_train"] is True and args["stage"] == "sft"
