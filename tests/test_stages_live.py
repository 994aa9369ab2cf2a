"""Every stage and fine-tuning type trained for real through the panel: datasets uploaded (their kind
detected), configs made with the API, runs started and trained by a worker with `llamafactory-cli train`
on the tiny model; the stage's own curves reach the run's metrics, its event stream and its page.

One worker session trains all five runs one after the other (the CPU is shared): DPO sigmoid on LoRA,
DPO ORPO on DoRA, KTO on freeze, RM on LoRA and PT on full."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from sqlmodel import Session, select

from app.db import get_engine
from app.models import RunMetric
from tests.factories import TINY_TRAIN_PARAMS, model_factory
from tests.live import LivePanel, live_panel, parse_sse  # noqa: F401  (the fixture)
from tests.test_stages import kto_rows, pretrain_rows, ranking_rows

pytestmark = pytest.mark.slow

TRAINING_TIMEOUT_S = 900.0
FINISHED = {"succeeded", "failed", "cancelled", "lost"}
# 16 rows, a quarter held out: 3 optimizer steps of 4 (PT packs its texts into fewer), evaluated at step 2.
SMALL = {**TINY_TRAIN_PARAMS, "num_train_epochs": 1.0, "val_size": 0.25, "eval_steps": 2, "save_steps": 2,
         "cutoff_len": 64}
WITHOUT_LORA = {key: value for key, value in SMALL.items() if key not in ("lora_rank", "lora_target")}
RUNS = {
    "dpo-sigmoid-lora": ("pairs", {**SMALL, "stage": "dpo", "pref_loss": "sigmoid", "pref_beta": 0.1}),
    "dpo-orpo-dora": ("pairs", {**SMALL, "stage": "dpo", "pref_loss": "orpo", "use_dora": True}),
    "kto-freeze": ("tagged", {**WITHOUT_LORA, "stage": "kto", "finetuning_type": "freeze",
                              "freeze_trainable_layers": 1}),
    "rm-lora": ("pairs", {**SMALL, "stage": "rm"}),
    "pt-full": ("texts", {**WITHOUT_LORA, "stage": "pt", "finetuning_type": "full", "learning_rate": 1.0e-4}),
}
REWARDS = ("rewards_chosen", "rewards_rejected", "rewards_margins")


def upload(panel: LivePanel, name: str, rows: list[dict]) -> dict:
    answer = panel.api.post("/api/v1/datasets", data={"name": name},
                            files={"file": (f"{name}.json", json.dumps(rows).encode())}, timeout=120)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_each_stage_and_type_trains_through_the_panel(live_panel: LivePanel, tiny_model: Path) -> None:
    panel = live_panel
    datasets = {"pairs": upload(panel, "pairs", ranking_rows(16)), "tagged": upload(panel, "tagged", kto_rows(16)),
                "texts": upload(panel, "texts", pretrain_rows(16))}
    assert [datasets[n]["kind"] for n in ("pairs", "tagged", "texts")] == ["ranking", "kto", "pretrain"]
    with Session(get_engine()) as session:
        model_id = model_factory(session, str(tiny_model), "tiny").id

    run_ids = {}
    for name, (dataset, params) in RUNS.items():
        created = panel.api.post("/api/v1/configs", json={
            "name": name, "model_id": model_id, "dataset_ids": [datasets[dataset]["id"]], "params": params},
            timeout=300)  # the first check asks the training env for LLaMA-Factory's argument names
        assert created.status_code == 201, created.text
        started = panel.api.post("/api/v1/runs", json={"config_id": created.json()["id"]})
        assert started.status_code in (200, 201, 202), started.text
        run_ids[name] = started.json()["id"]

    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    runs = {}
    for name, run_id in run_ids.items():
        while (run := panel.api.get(f"/api/v1/runs/{run_id}").json())["status"] not in FINISHED:
            assert time.monotonic() < deadline, f"{name} stayed {run['status']}\n{panel.log()}"
            time.sleep(0.5)
        assert run["status"] == "succeeded", f"{name}: {run['status_reason']}\n{panel.log()}"
        runs[name] = run

    with Session(get_engine()) as session:
        points = {name: session.exec(select(RunMetric).where(RunMetric.run_id == run_id)
                                     .order_by(RunMetric.step)).all() for name, run_id in run_ids.items()}
    for name, rows in points.items():
        train = [row for row in rows if row.loss is not None]
        assert [row.step for row in train] == list(range(1, runs[name]["total_steps"] + 1)), name
    # DPO's rewards at every train step, and its held-out accuracy at the evaluation of step 2.
    for name in ("dpo-sigmoid-lora", "dpo-orpo-dora"):
        train = [row for row in points[name] if row.loss is not None]
        assert all(getattr(row, field) is not None for row in train for field in (*REWARDS, "rewards_accuracies")), name
        assert all(row.rewards_margins == pytest.approx(row.rewards_chosen - row.rewards_rejected, abs=2e-3)
                   for row in train), name
        assert next(row for row in points[name] if row.step == 2).eval_accuracy is not None
    # KTO: rewards of both kinds and the margin (KTO logs no accuracy).
    kto = [row for row in points["kto-freeze"] if row.loss is not None]
    assert all(getattr(row, field) is not None for row in kto for field in REWARDS)
    assert all(row.rewards_accuracies is None for row in kto)
    # RM: the share of held-out pairs ranked right, at its evaluation; no rewards.
    rm = {row.step: row for row in points["rm-lora"]}
    assert 0.0 <= rm[2].eval_accuracy <= 1.0 and rm[2].eval_loss is not None
    assert all(row.rewards_chosen is None for row in rm.values())
    assert all(row.rewards_chosen is None and row.eval_accuracy is None for row in points["pt-full"])

    # Over the wire: the run's event stream carries the rewards as metric fields, and its page charts them.
    dpo_id = run_ids["dpo-sigmoid-lora"]
    with panel.api.stream("GET", f"/api/v1/runs/{dpo_id}/events?after=0", timeout=60) as response:
        events = []
        for event in parse_sse(response.iter_lines()):
            events.append(event)
            if event.get("event") == "end":
                break
    streamed = [json.loads(e["data"]) for e in events if e["event"] == "metric"]
    assert {p["step"] for p in streamed if p.get("rewards_chosen") is not None} == {1, 2, 3}
    page = panel.api.get(f"/runs/{dpo_id}").text
    assert 'id="chart-rewards"' in page
    initial = json.loads(page.split('id="run-data">')[1].split("</script>")[0])
    assert all(m["rewards_margins"] is not None for m in initial["metrics"] if m["loss"] is not None)

    # Each run trained with its stage's and type's own arguments, as the config said.
    for name, run_id in run_ids.items():
        args = yaml.safe_load(panel.api.get(f"/api/v1/runs/{run_id}/yaml").text)
        for key, value in RUNS[name][1].items():
            assert args[key] == value, (name, key)
