"""Evaluation jobs through the API without a worker: what is refused (a clear 4xx, nothing
created), the held-out split as LLaMA-Factory's own data pipeline holds it out, the base model's
evaluation shared by adapters evaluated on the same rows, the worker channel, best checkpoint and
the promotion gate. The generating itself (real LLaMA-Factory and vLLM) is in
tests/test_evaluations_live.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlmodel import Session, select

from app.models import Dataset, Evaluation, ModelExport, Run
from app.services import evaluations as evaluation_service
from app.settings import get_settings
from tests.factories import alpaca_rows, dataset_factory, finished_run_factory, model_factory
from tests.test_deploy import worker_headers

INTERNAL = "/internal/v1"
CHECKPOINTS = [{"name": "checkpoint-2", "step": 2, "complete": True}, {"name": "checkpoint-4", "step": 4, "complete": True}]


def _trained_run(session: Session, trained_adapter: Path, tiny_model: Path, *, val_size: float = 0.25,
                 rows: int = 40, status: str = "succeeded", checkpoints=CHECKPOINTS, name: str = "demo") -> Run:
    import yaml

    model = model_factory(session, str(tiny_model))
    dataset = dataset_factory(session, f"{name}-data", alpaca_rows(rows, prefix=name))
    run = finished_run_factory(session, str(trained_adapter), str(tiny_model), status=status,
                               checkpoints=checkpoints, name=name)
    args = yaml.safe_load(run.train_yaml)
    run.train_yaml = yaml.safe_dump({**args, "val_size": val_size, "cutoff_len": 64, "seed": 42})
    run.lineage = {"model": {"id": model.id, "name": model.name, "path": model.path},
                   "datasets": [{"id": dataset.id, "name": dataset.name, "sha256": dataset.sha256, "rows": rows,
                                 "file_name": f"dataset_{dataset.id}.json"}]}
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def _count(session: Session) -> int:
    return len(session.exec(select(Evaluation)).all())


@pytest.fixture
def run(session, trained_adapter, tiny_model) -> Run:
    return _trained_run(session, trained_adapter, tiny_model)


# --------------------------------------------------------------------------- refusals
def test_a_run_without_an_adapter_is_refused(client, session, trained_adapter, tiny_model):
    failed = _trained_run(session, trained_adapter, tiny_model, status="failed", checkpoints=[], name="failed")
    response = client.post(f"/api/v1/runs/{failed.id}/evaluations", json={})
    assert response.status_code == 409 and "no stored final adapter" in response.json()["detail"]
    assert _count(session) == 0


def test_a_dataset_of_another_format_is_refused(client, session, run):
    chat = dataset_factory(session, "chat", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": f"a{i}"}]} for i in range(3)])
    assert chat.formatting == "sharegpt"
    response = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"dataset_id": chat.id})
    assert response.status_code == 400 and "same format" in response.json()["detail"]
    assert _count(session) == 0


@pytest.mark.parametrize("payload, status, words", [
    ({"checkpoint": "checkpoint-99"}, 404, "no stored checkpoint 'checkpoint-99'"),
    ({"checkpoint": "../adapter"}, 404, "no stored checkpoint"),
    ({"dataset_id": 999}, 404, "dataset 999 not found"),
    ({"backend": "tgi"}, 422, ""),
    ({"max_rows": 0}, 422, ""),
])
def test_bad_requests_are_refused_and_create_nothing(client, session, run, payload, status, words):
    response = client.post(f"/api/v1/runs/{run.id}/evaluations", json=payload)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json())
    assert _count(session) == 0


def test_a_run_that_held_out_nothing_needs_a_dataset(client, session, trained_adapter, tiny_model):
    run = _trained_run(session, trained_adapter, tiny_model, val_size=0, name="noval")
    response = client.post(f"/api/v1/runs/{run.id}/evaluations", json={})
    assert response.status_code == 409 and "val_size is 0" in response.json()["detail"]
    assert client.post("/api/v1/runs/424242/evaluations", json={}).status_code == 404
    assert _count(session) == 0


def test_an_active_run_is_refused(client, session, run):
    session.get(Run, run.id).status = "running"
    session.commit()
    response = client.post(f"/api/v1/runs/{run.id}/evaluations", json={})
    assert response.status_code == 409 and "is running" in response.json()["detail"]


# --------------------------------------------------------------------------- rows and the base model
@pytest.mark.slow
def test_the_held_out_rows_are_the_ones_llamafactory_holds_out(client, session, run, tiny_model, tmp_path):
    """The split recorded for the evaluation is the eval split LLaMA-Factory's own data pipeline
    builds for the run's YAML (get_dataset with val_size and seed, as training evaluates)."""
    created = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 100})
    assert created.status_code == 201, created.text
    evaluation = client.get(f"/api/v1/evaluations/{created.json()['id']}").json()
    assert evaluation["source"] == "split" and evaluation["rows"] == 10  # 25 % of 40
    dataset = session.get(Dataset, run.lineage["datasets"][0]["id"])
    from app.services.datasets import data_file

    (tmp_path / "data.json").write_bytes(data_file(dataset).read_bytes())
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "data.json"}}))
    script = f"""
import json
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
args = dict(model_name_or_path={str(tiny_model)!r}, stage="sft", do_train=True, finetuning_type="lora",
            dataset="d", dataset_dir={str(tmp_path)!r}, template="qwen", cutoff_len=64, val_size=0.25, seed=42,
            output_dir={str(tmp_path / "out")!r}, report_to="none", overwrite_cache=True)
model_args, data_args, training_args, _, _ = get_train_args(args)
tok = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tok["tokenizer"], data_args)
module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tok)
print(json.dumps([tok["tokenizer"].decode(row["input_ids"]) for row in module["eval_dataset"]]))
"""
    result = subprocess.run([get_settings().train_python, "-c", script], capture_output=True, text=True,
                            timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    held_out = json.loads(result.stdout.strip().splitlines()[-1])
    rows = alpaca_rows(40, prefix="demo")
    expected = [rows[i]["instruction"] for i in evaluation["row_indices"]]
    assert len(held_out) == len(expected)
    for text, instruction in zip(held_out, expected, strict=True):
        assert instruction in text


def test_adapters_evaluated_on_the_same_rows_share_one_base_evaluation(client, session, run):
    first = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 4}).json()
    second = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 4, "checkpoint": "checkpoint-2"}).json()
    other_backend = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 4, "backend": "vllm"}).json()
    assert first["base"]["id"] == second["base"]["id"] != other_backend["base"]["id"]
    assert first["kind"] == "adapter" and first["status"] == "queued"
    base = client.get(f"/api/v1/evaluations/{first['base']['id']}").json()
    assert base["kind"] == "base" and base["run_id"] is None and base["row_indices"] == first["row_indices"]
    assert _count(session) == 5
    listed = client.get(f"/api/v1/runs/{run.id}/evaluations").json()
    assert {e["id"] for e in listed} == {first["id"], second["id"], other_backend["id"]}
    # The model's own endpoint reuses a base evaluation of the same rows too.
    dataset_id = run.lineage["datasets"][0]["id"]
    on_dataset = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 3, "dataset_id": dataset_id}).json()
    model_id = run.lineage["model"]["id"]
    alone = client.post("/api/v1/evaluations", json={"model_id": model_id, "dataset_id": dataset_id, "max_rows": 3,
                                                     "template": "qwen", "cutoff_len": 64})
    assert alone.status_code == 201 and alone.json()["id"] == on_dataset["base"]["id"]
    assert on_dataset["row_indices"] == [0, 1, 2] and on_dataset["source"] == "dataset"


# --------------------------------------------------------------------------- the worker channel
def _online(client, tiny_model: Path, cpu_slots: int, worker: str = "w1") -> None:
    """A (fake) worker comes online holding the tiny model, with `cpu_slots` CPU training slots."""
    from app.wire import model_fingerprint

    response = client.post(f"{INTERNAL}/workers/heartbeat", headers=worker_headers(), json={
        "worker_id": worker, "hostname": "h", "cpu_train_slots": cpu_slots,
        "models": {str(tiny_model): model_fingerprint(tiny_model)}})
    assert response.status_code == 200, response.text


def _dispatch(session: Session, evaluation_id: int, worker: str = "w1") -> str:
    """The scheduler's pass dispatches the queued evaluation to the online worker."""
    from app.services.scheduler import schedule

    schedule(session)  # (or the panel's own pass got there first: the same dispatch)
    evaluation = session.get(Evaluation, evaluation_id)
    session.refresh(evaluation)
    assert evaluation.status == "queued" and evaluation.dispatched_worker_id == worker, evaluation
    return evaluation.dispatch_id


def _finish(client, evaluation_id: int, metrics: dict[str, float], predictions: list[dict[str, str]],
            worker: str = "w1") -> None:
    headers = worker_headers()
    body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions).encode()
    stored = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/predictions", headers=headers,
                         data={"worker_id": worker}, files={"file": ("generated_predictions.jsonl", body)})
    assert stored.status_code == 200, stored.text
    finished = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/finish", headers=headers, json={
        "worker_id": worker, "outcome": "succeeded", "metrics": metrics, "rows": len(predictions), "generate_s": 2.0})
    assert finished.status_code == 200, finished.text


def _scores(value: float) -> dict[str, float]:
    return {"bleu-4": value, "rouge-1": value, "rouge-2": value, "rouge-l": value}


def test_claim_heartbeat_finish_rows_and_the_promotion_gate(client, session, run, tiny_model):
    headers = worker_headers()
    evaluation = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 3}).json()
    base_id = evaluation["base"]["id"]
    _online(client, tiny_model, cpu_slots=2)
    for evaluation_id in (evaluation["id"], base_id):
        dispatch_id = _dispatch(session, evaluation_id)
        wrong = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/claim", headers=headers,
                            json={"dispatch_id": "another", "worker_id": "w1"})
        assert wrong.status_code == 409
        claimed = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/claim", headers=headers,
                              json={"dispatch_id": dispatch_id, "worker_id": "w1"})
        assert claimed.status_code == 200, claimed.text
        spec = claimed.json()
        assert (spec["adapter"] is None) == (evaluation_id == base_id) and spec["rows"] == 3
        rows = client.get(INTERNAL + spec["rows_url"].removeprefix(INTERNAL), headers=headers).json()
        assert len(rows) == 3 and set(rows[0]) == {"instruction", "input", "output"}
        again = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/claim", headers=headers,
                            json={"dispatch_id": dispatch_id, "worker_id": "w1"})
        assert again.status_code == 409  # a redelivered task does nothing
        beat = client.post(f"{INTERNAL}/evaluations/{evaluation_id}/heartbeat", headers=headers,
                           json={"worker_id": "w1", "status": "running"})
        assert beat.status_code == 200 and beat.json() == {"cancel": False}
    assert client.get(f"/api/v1/evaluations/{evaluation['id']}").json()["status"] == "running"
    predictions = [{"prompt": f"p{i}", "predict": f"adapter says {i}", "label": f"ref {i}"} for i in range(3)]
    _finish(client, evaluation["id"], _scores(10.0), predictions)
    _finish(client, base_id, _scores(20.0), [{**p, "predict": f"base says {i}"} for i, p in enumerate(predictions)])
    done = client.get(f"/api/v1/evaluations/{evaluation['id']}").json()
    assert done["status"] == "succeeded" and done["metrics"] == _scores(10.0) and done["rows_per_s"] == 1.5
    assert done["base"]["metrics"] == _scores(20.0) and done["delta"]["rouge-l"] == -10.0

    page = client.get(f"/api/v1/evaluations/{evaluation['id']}/rows", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["rows"]) == 2
    assert page["rows"][0] == {"index": done["row_indices"][0], "prompt": "p0", "reference": "ref 0",
                               "base_output": "base says 0", "adapter_output": "adapter says 0"}
    found = client.get(f"/api/v1/evaluations/{evaluation['id']}/rows", params={"q": "BASE SAYS 2"}).json()
    assert found["total"] == 1 and found["rows"][0]["reference"] == "ref 2"
    jsonl = client.get(f"/api/v1/evaluations/{evaluation['id']}/rows.jsonl")
    assert [json.loads(line)["adapter_output"] for line in jsonl.text.splitlines()] == [p["predict"] for p in predictions]
    assert "attachment" in jsonl.headers["content-disposition"]
    fragment = client.get(f"/runs/{run.id}/evaluations")
    assert fragment.status_code == 200 and "final adapter" in fragment.text and "-10.00" in fragment.text

    # The pages: the generations side by side (searched, a page at a time), and Compare's table.
    detail = client.get(f"/evaluations/{evaluation['id']}").text
    assert all(words in detail for words in ("adapter says 0", "base says 0", "ref 0", "-10.00"))
    searched = client.get(f"/evaluations/{evaluation['id']}", params={"q": "BASE SAYS 2"},
                          headers={"HX-Request": "true"}).text
    assert searched.lstrip().startswith('<div id="evaluation-rows">')
    assert "ref 2" in searched and "ref 0" not in searched and "1 row(s)" in searched
    compare = client.get("/evaluations/compare", params={"ids": [run.id]}, headers={"HX-Request": "true"}).text
    assert compare.lstrip().startswith('<section class="panel" id="compare-evaluations">')
    assert f'href="/evaluations/{evaluation["id"]}"' in compare and "-10.00" in compare
    assert f'hx-get="/evaluations/compare?ids={run.id}"' in client.get("/runs/compare", params={"ids": [run.id]}).text

    # The adapter scores below the base model: a deploy is refused unless forced.
    refused = client.post("/api/v1/deployments", json={"run_id": run.id})
    assert refused.status_code == 409 and "below the base model" in refused.json()["detail"]
    assert refused.json()["field"] == "force"
    form = client.post("/deployments", data={"run_id": run.id}).text  # the form: a "deploy anyway" box
    assert 'id="deploy-force"' in form and "below the base model" in form
    assert client.get("/api/v1/deployments").json() == []
    forced = client.post("/api/v1/deployments", json={"run_id": run.id, "force": True})
    assert forced.status_code == 201, forced.text
    # A checkpoint not evaluated yet is not held back.
    assert evaluation_service.promotion_problem(session, run.id, "checkpoint-2") is None


def test_the_run_page_starts_evaluations_and_exports(client, session, run):
    fragment = client.get(f"/runs/{run.id}/evaluations").text
    assert 'id="evaluate-form"' in fragment and 'id="export-form"' in fragment
    assert 'value="checkpoint-2"' in fragment and 'value="llamafactory"' in fragment and 'value="vllm"' in fragment
    dataset_id = run.lineage["datasets"][0]["id"]
    assert f'<option value="{dataset_id}">' in fragment  # a dataset of the run's format
    started = client.post(f"/runs/{run.id}/evaluations", data={
        "checkpoint": "checkpoint-2", "dataset_id": str(dataset_id), "backend": "vllm", "max_rows": "3"})
    assert started.status_code == 200
    made = client.get(f"/api/v1/runs/{run.id}/evaluations").json()
    assert [(e["checkpoint"], e["backend"], e["rows"], e["dataset_id"]) for e in made] == [
        ("checkpoint-2", "vllm", 3, dataset_id)]
    assert f'id="evaluation-{made[0]["id"]}"' in started.text and 'hx-trigger="every 2s"' in started.text
    exported = client.post(f"/runs/{run.id}/exports", data={"checkpoint": ""})
    (export,) = session.exec(select(ModelExport)).all()
    assert export.checkpoint is None and exported.status_code == 200 and f'id="export-{export.id}"' in exported.text
    # The same merge again while it is queued: refused into the page's flash, nothing created.
    again = client.post(f"/runs/{run.id}/exports", data={"checkpoint": ""}, headers={"HX-Request": "true"})
    assert again.status_code == 409 and again.headers["HX-Retarget"] == "#flash" and "wait for it" in again.text
    assert len(session.exec(select(ModelExport)).all()) == 1


def test_best_checkpoint_by_eval_loss_or_by_a_metric(client, session, run, tiny_model):
    from app.models import RunMetric

    session.add_all([RunMetric(run_id=run.id, step=2, eval_loss=1.5), RunMetric(run_id=run.id, step=4, eval_loss=1.9)])
    session.commit()
    assert client.get(f"/api/v1/runs/{run.id}/best-checkpoint").json() == {
        "name": "checkpoint-2", "step": 2, "metric": "eval_loss"}
    assert client.get(f"/api/v1/runs/{run.id}/best-checkpoint", params={"metric": "rouge-l"}).status_code == 404
    assert client.get(f"/api/v1/runs/{run.id}/best-checkpoint", params={"metric": "f1"}).status_code == 400
    _online(client, tiny_model, cpu_slots=3)
    for checkpoint, value in (("checkpoint-2", 5.0), ("checkpoint-4", 7.0)):
        created = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 2, "checkpoint": checkpoint}).json()
        dispatch_id = _dispatch(session, created["id"])
        client.post(f"{INTERNAL}/evaluations/{created['id']}/claim", headers=worker_headers(),
                    json={"dispatch_id": dispatch_id, "worker_id": "w1"})
        _finish(client, created["id"], _scores(value), [{"prompt": "p", "predict": "x", "label": "y"}] * 2)
    best = client.get(f"/api/v1/runs/{run.id}/best-checkpoint", params={"metric": "rouge-l"}).json()
    assert (best["name"], best["value"]) == ("checkpoint-4", 7.0)


def test_cancel_a_queued_evaluation_and_a_lost_one(client, session, run, tiny_model):
    from datetime import timedelta

    from app.models.base import utcnow

    queued = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 2}).json()
    cancelled = client.post(f"/api/v1/evaluations/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/evaluations/{queued['id']}/cancel").status_code == 409
    base_id = queued["base"]["id"]
    _online(client, tiny_model, cpu_slots=1)
    dispatch_id = _dispatch(session, base_id)
    client.post(f"{INTERNAL}/evaluations/{base_id}/claim", headers=worker_headers(),
                json={"dispatch_id": dispatch_id, "worker_id": "w1"})
    later = utcnow() + timedelta(seconds=get_settings().heartbeat_timeout_s + 5)
    assert evaluation_service.mark_lost(session, later) == [base_id]
    assert client.get(f"/api/v1/evaluations/{base_id}").json()["status"] == "lost"
    # A lost base evaluation is not reused: the next evaluation of those rows queues a new one.
    again = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 2}).json()
    assert again["base"]["id"] != base_id


def test_an_evaluation_takes_a_cpu_training_slot_and_waits_for_one(client, session, run, tiny_model):
    from app.services.scheduler import schedule

    first = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 2}).json()
    schedule(session)
    assert session.get(Evaluation, first["id"]).dispatch_id is None  # no worker online yet
    _online(client, tiny_model, cpu_slots=1)
    schedule(session)
    dispatched = [e for e in session.exec(select(Evaluation)).all() if session.refresh(e) or e.dispatch_id]
    assert len(dispatched) == 1  # one slot: the adapter's and the base model's evaluations take turns
    # A worker that does not hold the model gets nothing.
    response = client.post(f"{INTERNAL}/workers/heartbeat", headers=worker_headers(), json={
        "worker_id": "w2", "hostname": "h2", "cpu_train_slots": 4, "models": {}})
    assert response.status_code == 200
    schedule(session)
    assert all(e.dispatched_worker_id != "w2" for e in session.exec(select(Evaluation)).all())


def test_early_stopping_parameters_are_accepted_in_configs(client, session, data_dir):
    """load_best_model_at_end / metric_for_best_model (transformers) and early_stopping_steps
    (LLaMA-Factory) go into the YAML llamafactory-cli reads (the live test trains with them)."""
    from tests.test_configs import _api_body, write_model

    folder = write_model(data_dir.parent / "models", "Qwen2.5-0.5B-Instruct")
    model = client.post("/api/v1/models", json={"path": str(folder)}).json()
    dataset = dataset_factory(session, "alpaca_es", alpaca_rows(40))
    body = _api_body({"model": model, "dataset_id": dataset.id}, val_size=0.2, eval_strategy="steps", eval_steps=4,
                     save_steps=4, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=False, early_stopping_steps=2)
    created = client.post("/api/v1/configs", json={**body, "name": "early-stop"})
    assert created.status_code == 201, created.text
    text = client.get(f"/api/v1/configs/{created.json()['id']}/yaml").text
    for line in ("load_best_model_at_end: true", "metric_for_best_model: eval_loss", "early_stopping_steps: 2"):
        assert line in text, text


def test_deleting_the_run_deletes_its_evaluations_and_exports(client, session, run):
    from app.models import ModelExport

    evaluation = client.post(f"/api/v1/runs/{run.id}/evaluations", json={"max_rows": 2}).json()
    client.post(f"/api/v1/evaluations/{evaluation['id']}/cancel")
    export = client.post(f"/api/v1/runs/{run.id}/exports", json={}).json()
    client.post(f"/api/v1/exports/{export['id']}/cancel")
    assert client.delete(f"/api/v1/runs/{run.id}").status_code == 204
    assert client.get(f"/api/v1/evaluations/{evaluation['id']}").status_code == 404
    assert client.get(f"/api/v1/exports/{export['id']}").status_code == 404
    # The base model's evaluation of those rows is the model's, not the run's: it stays.
    assert client.get(f"/api/v1/evaluations/{evaluation['base']['id']}").status_code == 200
    assert session.exec(select(ModelExport)).all() == []
