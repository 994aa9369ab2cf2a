"""The config pages as the browser gets them (real app, real SQLite; LLaMA-Factory's own checks in
the training environment): a config without a dataset needs an explicit "save without a dataset",
refused fields are marked, keys typed into "Advanced" get their messages under that box, labels
are words with the key under them, defaults follow the worker a run would land on, measured
token counts feed the estimate, and the list pages read no config's parameters."""

from __future__ import annotations

import json
import re
import socket

from sqlmodel import Session, func, select

from app.models import Dataset, TrainConfig
from app.services import configs as config_service
from tests.test_configs import form_fields, registered  # noqa: F401  (the fixture)


def _beat(client, worker_id: str, *, gpus: int = 0, cpu_count: int | None = None, bf16: bool | None = None,
          hostname: str = "elsewhere") -> None:
    facts: dict = {}
    if cpu_count is not None:
        facts["cpu_count"] = cpu_count
    if bf16 is not None:
        facts["training_env"] = {"torch": {"bf16_supported": bf16}}
    from app.settings import get_settings

    response = client.post("/internal/v1/workers/heartbeat", headers={"Authorization": f"Bearer {get_settings().worker_token}"}, json={
        "worker_id": worker_id, "hostname": hostname, "cpu_train_slots": 0 if gpus else 1,
        "gpus": [{"index": i, "name": "H200", "memory_total_mib": 143771} for i in range(gpus)],
        "doctor": {"checks": [], "facts": facts} if facts else None,
    })
    assert response.status_code == 200, response.text


def _config_count(session: Session) -> int:
    session.expire_all()
    return session.exec(select(func.count()).select_from(TrainConfig)).one()


def _input(html: str, field_id: str) -> str:
    return re.search(rf'<(?:input|select|textarea) [^>]*id="{field_id}"[^>]*>', html).group(0)


# --------------------------------------------------------------------------- saving
def test_a_config_without_a_dataset_needs_an_explicit_save(client, session, registered) -> None:  # noqa: F811
    fields = form_fields(client)
    fields["name"] = "no data yet"
    refused = client.post("/configs/new", data=fields, follow_redirects=False)
    assert refused.status_code == 422 and _config_count(session) == 0
    warning = re.search(r'<div class="alert warning" role="alert" id="no-dataset-warning".*?</div>', refused.text, re.S)
    assert warning and "No dataset is chosen" in warning.group(0) and "data-autofocus" in warning.group(0)
    assert 'value="no data yet"' in refused.text  # what was typed is still there

    saved = client.post("/configs/new", data={**fields, "save_without_dataset": "1"}, follow_redirects=False)
    assert saved.status_code == 303 and _config_count(session) == 1
    with_dataset = {**fields, "name": "with data", "dataset_ids": [str(registered["dataset_id"])]}
    assert client.post("/configs/new", data=with_dataset, follow_redirects=False).status_code == 303


def test_refused_fields_are_marked_and_described(client, session, registered) -> None:  # noqa: F811
    fields = form_fields(client)
    fields.update(name="bad", dataset_ids=[str(registered["dataset_id"])], learning_rate="-1",
                  advanced=fields["advanced"] + "output_dir: /tmp/elsewhere\n")
    page = client.post("/configs/new", data=fields).text
    field = _input(page, "learning_rate")
    assert 'aria-invalid="true"' in field and 'aria-describedby="error-learning_rate"' in field
    assert 'aria-invalid' not in _input(page, "cutoff_len")
    # A key typed into "Advanced" is refused under that box, not only in the side panel.
    advanced = re.search(r'<div id="advanced-messages"\s*>(.*?)</div>\n', page, re.S).group(1)
    assert "output_dir is set by the panel" in advanced
    marked = json.loads(re.search(r"data-invalid='([^']*)'", page).group(1))
    assert set(marked) == {"learning_rate", "output_dir"}  # what configs.js keeps marked as the form changes

    live = client.post("/configs/form/estimate", data=fields).text
    assert '<div id="advanced-messages" hx-swap-oob="true">' in live and "output_dir is set by the panel" in live
    assert page.count('id="advanced-messages"') == 1  # the page has one box; only the fragment swaps it


def test_llamafactory_refusing_an_unknown_key_says_so_under_advanced(client, registered) -> None:  # noqa: F811
    fields = form_fields(client)
    fields.update(name="typo", model_id=str(registered["model"]["id"]), dataset_ids=[str(registered["dataset_id"])],
                  advanced=fields["advanced"] + "lerning_rate: 0.1\n")
    findings = client.post("/configs/form/validate", data=fields).text
    under_advanced = re.search(r'<div class="field-error" id="lf-error-advanced" hx-swap-oob="true">(.*?)</div>\n',
                               findings, re.S).group(1)
    assert "lerning_rate is not a LLaMA-Factory training argument" in under_advanced


def test_deleting_a_config_asks_first(client, session, registered) -> None:  # noqa: F811
    fields = {**form_fields(client), "name": "to delete", "dataset_ids": [str(registered["dataset_id"])]}
    location = client.post("/configs/new", data=fields, follow_redirects=False).headers["location"]
    page = client.get(location).text
    form = re.search(r'<form method="post" action="/configs/\d+/delete"[^>]*>', page).group(0)
    assert 'data-confirm="Delete config to delete v1?' in form


# --------------------------------------------------------------------------- the form's words
def test_fields_have_human_labels_and_basic_settings_come_first(client, registered) -> None:  # noqa: F811
    page = client.get("/configs/new").text
    assert "###" not in page
    label = re.search(r'<label for="learning_rate">(.*?)</label>', page, re.S).group(1)
    assert label.startswith("Learning rate") and '<span class="field-key">learning_rate</span>' in label
    train = re.search(r'<fieldset class="panel" id="section-train">(.*?)</fieldset>', page, re.S).group(1)
    basic, more = train.split('<details class="more-settings"', 1)
    assert 'id="learning_rate"' in basic and 'id="num_train_epochs"' in basic
    assert 'id="lr_scheduler_type"' in more and 'id="gradient_checkpointing"' in more
    # Help reads as advice, not as benchmark notes.
    packing = re.search(r'<label for="packing".*?</label>', page, re.S).group(0)
    assert "H100" not in packing and "×" not in packing and "GiB" not in page


def test_defaults_follow_a_cpu_worker(client, registered) -> None:  # noqa: F811
    _beat(client, "laptop", cpu_count=2)
    page = client.get("/configs/new").text
    assert "checked" not in _input(page, "bf16")
    assert 'value="1"' in _input(page, "preprocessing_num_workers")
    assert 'value="0"' in _input(page, "dataloader_num_workers")
    assert 'value="0"' in _input(page, "gpus")
    assert "Defaults for worker laptop: no GPU, 2 CPU cores." in page


def test_the_embedded_worker_counts_this_machines_cores(client, registered) -> None:  # noqa: F811
    import os

    _beat(client, "embedded", hostname=socket.gethostname())
    page = client.get("/configs/new").text
    expected = max(1, min(16, os.cpu_count() // 2))
    assert f'value="{expected}"' in _input(page, "preprocessing_num_workers")


def test_defaults_follow_a_gpu_worker(client, registered) -> None:  # noqa: F811
    _beat(client, "laptop", cpu_count=2)
    _beat(client, "gpu-box", gpus=2, cpu_count=64, bf16=True)
    page = client.get("/configs/new").text
    assert 'value="1"' in _input(page, "gpus") and "checked" in _input(page, "bf16")
    assert 'value="16"' in _input(page, "preprocessing_num_workers")
    assert 'value="8"' in _input(page, "dataloader_num_workers")
    assert "Defaults for worker gpu-box: 2 GPU(s), 64 CPU cores, bf16." in page


def test_an_older_gpu_gets_fp16(client, registered) -> None:  # noqa: F811
    _beat(client, "v100-box", gpus=1, cpu_count=8, bf16=False)
    page = client.get("/configs/new").text
    assert "checked" not in _input(page, "bf16")
    advanced = re.search(r'<textarea id="advanced"[^>]*>(.*?)</textarea>', page, re.S).group(1)
    assert "fp16: true" in advanced and "fp16 (no bf16)" in page


# --------------------------------------------------------------------------- estimates
def test_the_token_estimate_uses_any_measured_counts(client, session, registered) -> None:  # noqa: F811
    dataset = session.get(Dataset, registered["dataset_id"])
    data = config_service.TrainConfigInput(name="cjk", model_id=registered["model"]["id"], dataset_ids=[dataset.id])
    data.params.update(template="qwen", max_samples=None, val_size=0.0, cutoff_len=4096)
    by_chars = config_service.estimate(session, data)
    assert not by_chars["tokens_measured"]
    # Measured once with another template (a CJK-heavy text: ~1 token per character, not 1 per 4).
    dataset.report = {**dataset.report, "token_stats": {
        f"{registered['model']['id']}:chatml": {"lengths": [[100, 50]] * 10, "computed_at": "now"}}}
    session.add(dataset)
    session.commit()
    measured = config_service.estimate(session, data)
    assert measured["tokens_measured"] and measured["tokens_per_epoch"] == 150 * dataset.row_count


# --------------------------------------------------------------------------- list pages
def test_the_configs_list_shows_the_model_and_dataset_count_without_parameters(client, session, registered) -> None:  # noqa: F811
    fields = {**form_fields(client), "name": "listed", "model_id": str(registered["model"]["id"]),
              "dataset_ids": [str(registered["dataset_id"])]}
    assert client.post("/configs/new", data=fields, follow_redirects=False).status_code == 303
    imported = client.post("/api/v1/configs/import", json={"yaml": "model_name_or_path: org/hub-model\nlearning_rate: 1.0e-4\n",
                                                           "name": "from the hub"})
    assert imported.status_code == 201, imported.text
    page = client.get("/configs").text
    rows = {name: row for row, name in re.findall(r'(<tr id="config-\d+">.*?<a href="/configs/\d+">([^<]+)</a>.*?</tr>)', page, re.S)}
    cells = lambda row: re.findall(r"<td>(.*?)</td>", rows[row], re.S)  # noqa: E731
    assert cells("listed")[2:4] == [registered["model"]["name"], "1"]
    assert cells("from the hub")[2:4] == ["org/hub-model", "0"]
    runs_page = client.get("/runs").text
    assert re.search(r'<option value="\d+" >listed v1</option>', runs_page)
