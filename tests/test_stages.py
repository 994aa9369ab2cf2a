"""Stages (sft, dpo, kto, rm, pt) and fine-tuning types (LoRA and its variants, QLoRA, freeze, full) in the
config form, the API, the YAML both ways and LLaMA-Factory's own checks; which datasets a stage reads;
the Trainer's stage metrics (rewards, accuracy) read from a run's files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from app.services.configs import TrainConfigInput, check
from app.services.llamafactory_params import default_params
from tests.factories import alpaca_rows, dataset_factory
from tests.test_configs import form_fields
from tests.test_model_registry import write_model
from workers.log_tail import RunTails


def ranking_rows(count: int) -> list[dict]:
    return [{"instruction": f"Greet person {i}", "input": "", "chosen": f"Hello, friend {i}!", "rejected": "Go away."}
            for i in range(count)]


def kto_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Greet person {i}"},
                          {"role": "assistant", "content": f"Hello {i}!" if i % 2 else "Go away."}],
             "kto_tag": bool(i % 2)} for i in range(count)]


def pretrain_rows(count: int) -> list[dict]:
    return [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog."} for i in range(count)]


@pytest.fixture
def kinds(client, session, data_dir):
    """A registered model and one uploaded dataset of each kind (the upload detects the kind)."""
    folder = write_model(data_dir.parent / "models", "Qwen2.5-0.5B-Instruct")
    model = client.post("/api/v1/models", json={"path": str(folder)}).json()
    datasets = {
        "sft": dataset_factory(session, "sft_data", alpaca_rows(20)),
        "ranking": dataset_factory(session, "pairs", ranking_rows(20)),
        "kto": dataset_factory(session, "tagged", kto_rows(20)),
        "pretrain": dataset_factory(session, "texts", pretrain_rows(20)),
    }
    assert {kind: d.kind for kind, d in datasets.items()} == {kind: kind for kind in datasets}
    return {"model_id": model["id"], **{kind: d.id for kind, d in datasets.items()}}


# One case per stage and per fine-tuning type: the stage, the dataset kind it reads, its own parameters.
CASES = {
    "dpo-sigmoid": ("ranking", {"stage": "dpo", "pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.5,
                                "dpo_label_smoothing": 0.1}),
    "dpo-orpo": ("ranking", {"stage": "dpo", "pref_loss": "orpo", "pref_beta": 0.2}),
    "dpo-simpo": ("ranking", {"stage": "dpo", "pref_loss": "simpo", "simpo_gamma": 1.0}),
    "kto": ("kto", {"stage": "kto", "pref_beta": 0.1, "kto_chosen_weight": 1.5, "kto_rejected_weight": 1.0}),
    "rm": ("ranking", {"stage": "rm"}),
    "pt": ("pretrain", {"stage": "pt"}),
    "lora-variants": ("sft", {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16.0}),
    "pissa": ("sft", {"pissa_init": True}),
    "freeze": ("sft", {"finetuning_type": "freeze", "freeze_trainable_layers": 1,
                       "freeze_trainable_modules": "mlp,self_attn", "freeze_extra_modules": "embed_tokens"}),
    "full": ("sft", {"finetuning_type": "full"}),
}


def case_body(kinds, case: str, **more) -> dict:
    kind, params = CASES[case]
    base = default_params()
    if params.get("finetuning_type") in ("freeze", "full"):
        for key in ("lora_rank", "lora_target"):
            base.pop(key)
    return {"name": case, "model_id": kinds["model_id"], "dataset_ids": [kinds[kind]],
            "params": {**base, **params, **more}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_stage_and_type_goes_through_api_form_and_yaml_unchanged(client, kinds, case) -> None:
    body = case_body(kinds, case)
    created = client.post("/api/v1/configs", json=body)
    assert created.status_code == 201, created.text
    config = created.json()
    assert config["params"] == body["params"]
    exported = client.get(f"/api/v1/configs/{config['id']}/yaml").text
    args = yaml.safe_load(exported)
    for key, value in CASES[case][1].items():
        assert args[key] == value, key
    # YAML both ways: importing the export gives the same YAML, byte for byte.
    imported = client.post("/api/v1/configs/import", json={"yaml": exported, "name": f"{case}-copy"}).json()["config"]
    assert client.get(f"/api/v1/configs/{imported['id']}/yaml").text == exported

    # The edit form shows this stage's and type's fields and saves them back unchanged.
    page = client.get(f"/configs/{config['id']}/edit").text
    for key in CASES[case][1]:
        assert f'id="{key}"' in page, key
    fields = form_fields_of(page)
    fields["dataset_ids"] = [str(d) for d in config["dataset_ids"]]
    saved = client.post(f"/configs/{config['id']}/edit", data=fields, follow_redirects=False)
    assert saved.status_code == 303, saved.text
    assert client.get(f"/api/v1/configs/{config['id']}/yaml").text == exported


def refused_message(answer, field: str) -> str:
    """The message of an API refusal about `field` (a config's refusal lists every field's)."""
    return next(e["message"] for e in answer.json()["errors"] if e["field"] == field)


def form_fields_of(html: str) -> dict:
    """form_fields for an already fetched page (the edit form)."""
    class Page:
        text = html

    class Client:
        def get(self, _url):
            return Page

    return form_fields(Client())


def test_the_form_offers_each_stage_with_its_help_and_says_ppo_is_not_offered(client, kinds) -> None:
    html = client.get("/configs/new").text
    options = re.search(r'<select id="stage" name="stage"[^>]*>(.*?)</select>', html, re.S).group(1)
    assert re.findall(r'<option value="([^"]*)"', options) == ["sft", "dpo", "kto", "rm", "pt"]
    assert 'id="ppo-not-offered"' in html and "PPO needs a reward model" in html
    # sft shown, the other stages' notes and fields hidden until chosen (configs.js follows the choice).
    assert re.search(r'data-stages="sft" data-types="" >', html)
    assert re.search(r'data-stages="dpo" data-types="" hidden', html)
    assert re.search(r'<div class="param-field" data-stages="dpo" data-types="" hidden>\s*<label for="pref_loss">', html)
    assert re.search(r'<div class="param-field" data-stages="" data-types="freeze" hidden>', html)
    assert "DeepSpeed</strong> (ZeRO) is not offered" in html
    # Each dataset says its kind; the stage → kinds table drives the "does not fit" marks.
    assert json.loads(re.search(r"data-stage-kinds='([^']*)'", html).group(1))["dpo"] == ["ranking"]
    assert 'data-kind="ranking"' in html and 'data-kind="kto"' in html


def test_the_form_sends_only_the_chosen_stage_and_types_fields(client, kinds) -> None:
    fields = form_fields(client)
    # A user typed DPO and freeze values, then went back to sft LoRA: those hidden values are not saved.
    fields.update(name="sft-after-all", dataset_ids=[str(kinds["sft"])], pref_beta="0.5", pref_loss="orpo",
                  freeze_trainable_layers="3", use_dora="true")
    created = client.post("/configs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303, created.text
    args = yaml.safe_load(client.get(created.headers["location"].replace("/configs/", "/api/v1/configs/") + "/yaml").text)
    assert args["stage"] == "sft" and args["use_dora"] is True
    assert not {"pref_beta", "pref_loss", "freeze_trainable_layers"} & set(args)

    fields.update(name="dpo-now", stage="dpo", dataset_ids=[str(kinds["ranking"])], finetuning_type="freeze")
    created = client.post("/configs/new", data=fields, follow_redirects=False)
    assert created.status_code == 303, created.text
    args = yaml.safe_load(client.get(created.headers["location"].replace("/configs/", "/api/v1/configs/") + "/yaml").text)
    assert (args["stage"], args["pref_beta"], args["pref_loss"], args["freeze_trainable_layers"]) == ("dpo", 0.5, "orpo", 3)
    assert not {"use_dora", "lora_rank", "lora_target"} & set(args)


@pytest.mark.parametrize(("stage", "kind", "needs"), [
    ("dpo", "sft", "a preference dataset"), ("rm", "kto", "a preference dataset"),
    ("kto", "ranking", "a KTO dataset"), ("pt", "sft", "a pre-training dataset"), ("sft", "ranking", "an SFT dataset"),
])
def test_the_stage_decides_which_datasets_fit(client, kinds, stage, kind, needs) -> None:
    body = {"name": "misfit", "model_id": kinds["model_id"], "dataset_ids": [kinds[kind]],
            "params": {**default_params(), "stage": stage}}
    refused = client.post("/api/v1/configs", json=body)
    assert refused.status_code == 422, refused.text
    assert f"stage {stage} trains on {needs}" in refused_message(refused, "dataset_ids")
    # The form says why, next to the datasets, and saves nothing.
    fields = form_fields(client)
    fields.update(name="misfit", stage=stage, dataset_ids=[str(kinds[kind])])
    page = client.post("/configs/new", data=fields, follow_redirects=False)
    assert page.status_code == 422 and f"stage {stage} trains on {needs}" in page.text
    assert client.get("/api/v1/configs").json() == []


def test_ppo_and_a_cpu_qlora_and_a_deepspeed_run_are_refused(client, kinds) -> None:
    ppo = case_body(kinds, "lora-variants", stage="ppo")
    refused = client.post("/api/v1/configs", json=ppo)
    assert refused.status_code == 422
    assert refused_message(refused, "stage").startswith("stage ppo is not offered: PPO needs a reward model")

    qlora = case_body(kinds, "lora-variants", quantization_bit=4)
    refused = client.post("/api/v1/configs", json=qlora)
    assert refused.status_code == 422 and "needs a GPU" in refused_message(refused, "quantization_bit")
    gpu_config = client.post("/api/v1/configs", json={**qlora, "gpus": 1})
    assert gpu_config.status_code == 201
    # A run of it asking for no GPU is refused before anything starts.
    on_cpu = client.post("/api/v1/runs", json={"config_id": gpu_config.json()["id"], "gpus": 0})
    assert on_cpu.status_code == 400 and "QLoRA (bitsandbytes) needs a GPU" in on_cpu.json()["detail"]
    assert client.get("/api/v1/runs").json() == []
    # The form says so before anything is submitted when the config asks for no GPU.
    html = client.get("/configs/new").text
    assert re.search(r'<p class="field-warning" id="qlora-cpu-note" >', html)

    # A bundled DeepSpeed config is kept for export, but a panel run cannot use it.
    full = client.post("/api/v1/configs", json={**case_body(kinds, "full", deepspeed="examples/deepspeed/ds_z3_config.json"),
                                                "name": "ds3", "gpus": 1}).json()
    assert "deepspeed: examples/deepspeed/ds_z3_config.json" in client.get(f"/api/v1/configs/{full['id']}/yaml").text
    findings = client.post("/api/v1/configs/validate", json=case_body(kinds, "full", deepspeed="ds_z3_config.json")).json()
    assert any(e["field"] == "deepspeed" and "cannot use DeepSpeed" in e["message"] for e in findings["errors"])
    assert findings["llamafactory"] is None  # refused before the training env is started


def test_parameters_of_another_stage_or_type_are_said_to_be_ignored(client, session, kinds) -> None:
    data = TrainConfigInput(**case_body(kinds, "freeze", pref_beta=0.3, lora_rank=16))
    params, result = check(session, data)
    assert not result.errors and params["pref_beta"] == 0.3  # kept as written: LLaMA-Factory ignores it
    assert result.warnings["pref_beta"] == ["pref_beta applies to stage dpo/kto only: this sft freeze config ignores it"]
    assert result.warnings["lora_rank"] == ["lora_rank applies to finetuning_type lora only: this sft freeze config"
                                            " ignores it"]


@pytest.mark.slow
def test_llamafactory_validates_each_stage(client, kinds) -> None:
    """LLaMA-Factory's get_train_args on each stage's config (each distinct config starts the training env)."""
    for case in ("dpo-sigmoid", "dpo-orpo", "kto", "rm", "pt", "lora-variants", "freeze", "full"):
        answer = client.post("/api/v1/configs/validate", json=case_body(kinds, case)).json()
        assert answer["ok"] and answer["llamafactory"]["ran"], (case, answer)
    # What only LLaMA-Factory refuses: label smoothing is for the sigmoid loss, DoRA for LoRA.
    smoothing = client.post("/api/v1/configs/validate", json=case_body(kinds, "dpo-orpo", dpo_label_smoothing=0.1)).json()
    assert any(e["field"] == "dpo_label_smoothing" for e in smoothing["errors"]), smoothing
    dora = client.post("/api/v1/configs/validate", json=case_body(kinds, "freeze", use_dora=True)).json()
    assert any("use_dora" in e["message"] for e in dora["errors"]), dora


# ------------------------------------------------------------------ stage metrics from a run's files

# What `llamafactory-cli train` wrote for a 3-step DPO run with eval every 2 steps (real output of
# LLaMA-Factory 0.9.5 on the tiny model): trainer_log.jsonl, and the Trainer's log lines on stdout
# between tqdm's redraws.
DPO_TRAINER_LOG = [
    {"current_steps": 1, "total_steps": 3, "loss": 0.6931, "accuracy": 0.0, "lr": 0.005, "epoch": 0.3333333333333333},
    {"current_steps": 2, "total_steps": 3, "loss": 0.4965, "accuracy": 1.0, "lr": 0.0033, "epoch": 0.6666666666666666},
    {"current_steps": 2, "total_steps": 3, "eval_loss": 0.4166, "epoch": 0.6666666666666666},
    {"current_steps": 3, "total_steps": 3, "loss": 0.4116, "accuracy": 1.0, "lr": 0.0017, "epoch": 1.0},
    {"current_steps": 3, "total_steps": 3, "eval_loss": 0.41, "epoch": 1.0},  # after training: nothing printed
]
DPO_STDOUT = [
    "{'task': {'name': 'Causal Language Modeling', 'type': 'text-generation'}}",
    " 33%|###3      | 1/3 [00:00<00:01,  1.59it/s][INFO|2026-12-01 12:39:55] llamafactory.train.callbacks:144 >>"
    " {'loss': 0.6931, 'learning_rate': 5.0000e-03, 'epoch': 0.33}",  # LLaMA-Factory's own line: not the Trainer's
    "      {'loss': '0.6931', 'grad_norm': '1.025', 'rewards/chosen': '0',"
    " 'rewards/rejected': '0', 'rewards/accuracies': '0', 'rewards/margins': '0', 'epoch': '0.3333'}",
    "[INFO|2026-12-01 12:39:59] llamafactory.train.callbacks:144 >> {'loss': 0.4965, 'learning_rate': 3.3333e-03,"
    " 'epoch': 0.67, 'accuracy': 1.00}",
    "    {'loss': '0.4965', 'rewards/chosen': '0.2695', 'rewards/rejected': '-0.1721', 'rewards/accuracies': '1',"
    " 'rewards/margins': '0.4416', 'epoch': '0.6667'}",
    "\x1b[A{'eval_loss': '0.4166', 'eval_rewards/accuracies': '1', 'eval_rewards/margins': '0.6603', 'epoch': '0.6667'}",
    "{'loss': '0.4116', 'rewards/chosen': '0.4161', 'rewards/rejected': '-0.2589', 'rewards/accuracies': '1',"
    " 'rewards/margins': '0.675', 'epoch': '1'}",
    "{'train_runtime': '0.1253', 'train_loss': '0.429', 'epoch': '1'}",
]


def test_rewards_and_accuracy_are_read_for_their_steps(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    trainer_log, stdout = output / "trainer_log.jsonl", tmp_path / "stdout.log"
    tails = RunTails(output, stdout)
    # stdout runs ahead of trainer_log.jsonl (written by a background thread): pairs wait for both.
    stdout.write_text("\n".join(DPO_STDOUT[:5]) + "\n")
    trainer_log.write_text(json.dumps(DPO_TRAINER_LOG[0]) + "\n")
    first = tails.read()
    stage_points = [p for p in first.metrics if "rewards_chosen" in p]
    assert stage_points == [{"step": 1, "rewards_chosen": 0.0, "rewards_rejected": 0.0, "rewards_accuracies": 0.0,
                             "rewards_margins": 0.0}]
    with trainer_log.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in DPO_TRAINER_LOG[1:]))
    with stdout.open("a") as f:
        f.write("\n".join(DPO_STDOUT[5:]) + "\n")
    rest = tails.read(final=True)
    by_step: dict[int, dict] = {}
    for point in rest.metrics:
        by_step[point["step"]] = {**by_step.get(point["step"], {}), **point}
    assert by_step[2]["rewards_margins"] == 0.4416 and by_step[2]["eval_accuracy"] == 1.0
    assert by_step[2]["loss"] == 0.4965 and by_step[2]["eval_loss"] == 0.4166
    assert (by_step[3]["rewards_chosen"], by_step[3]["rewards_rejected"]) == (0.4161, -0.2589)
    assert "eval_accuracy" not in by_step[3]  # the evaluation after training printed no line
