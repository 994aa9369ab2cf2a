"""LLaMA-Factory's own argument parsing (get_train_args) on a config, in the real training env.

One test on purpose: each distinct config starts the training env (~5 s idle, far more on a busy
machine), and a config seen before is answered from the app's cache."""

from __future__ import annotations

import time

import pytest

from tests.test_configs import _api_body, form_fields, registered  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def test_get_train_args_accepts_and_rejects(client, registered) -> None:  # noqa: F811
    good = _api_body(registered)
    started = time.monotonic()
    answer = client.post("/api/v1/configs/validate", json=good).json()
    first_s = time.monotonic() - started
    assert answer["ok"], answer
    assert answer["llamafactory"]["ran"] is True
    assert any("bf16 needs a GPU" in w["message"] for w in answer["warnings"])  # gpus 0: fp32

    started = time.monotonic()
    assert client.post("/api/v1/configs/validate", json=good).json()["ok"]
    assert time.monotonic() - started < 1.0 < first_s  # cached by the config's hash

    # The config page's button, and the form's (the untouched form is the same config: cached).
    config_id = client.post("/api/v1/configs", json={**good, "name": "page"}).json()["id"]
    fragment = client.post(f"/configs/{config_id}/validate", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and 'id="validation-ok"' in fragment.text
    fields = form_fields(client)
    fields.update(name="form", dataset_ids=[str(registered["dataset_id"])])
    fragment = client.post("/configs/form/validate", data=fields, headers={"HX-Request": "true"})
    assert 'id="validation-ok"' in fragment.text
    assert '<div class="field-error" id="lf-error-learning_rate" hx-swap-oob="true"></div>' in fragment.text
    fields["learning_rate"] = "0"
    fragment = client.post("/configs/form/validate", data=fields, headers={"HX-Request": "true"})
    assert 'id="lf-error-learning_rate" hx-swap-oob="true">learning_rate must be greater than 0</div>' in fragment.text

    # What only LLaMA-Factory knows: its arguments, and the names in dataset_info.json.
    unknown = _api_body(registered, not_an_argument=3)
    errors = client.post("/api/v1/configs/validate", json=unknown).json()["errors"]
    assert errors == [{"field": "not_an_argument", "message": "not_an_argument is not a LLaMA-Factory training argument"}]

    missing = _api_body(registered, eval_dataset="nowhere", val_size=0)
    errors = client.post("/api/v1/configs/validate", json=missing).json()["errors"]
    assert errors[0]["field"] == "eval_dataset" and "nowhere" in errors[0]["message"]


def test_suggested_templates_are_llamafactory_templates() -> None:
    from app.services.datasets import templates_or_empty
    from tests.test_model_registry import test_suggested_template_by_family as table

    names = set(templates_or_empty())
    assert len(names) > 50
    for mark in table.pytestmark:
        if mark.name == "parametrize":
            for _name, _type, expected in mark.args[1]:
                assert expected in names, expected
