"""The automatic micro-batch (issue 19): the probe's plan and the choice on probes recorded on an H200
(tests/fixtures/batch_probe/, from bench/gpu/gpu_bench.py --phases auto), the worker's out-of-memory
detection, the estimates, and the panel's side of the protocol through the real app (TestClient,
real SQLite): a claim asks for a probe, the report is stored and answered with the split, the next
run takes it from the cache, a fallback teaches the cache, a finish is measured against the estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.db import get_engine
from app.models import BatchProbe, Run
from app.services import batching
from app.services import runs as run_service
from app.settings import get_settings
from tests.factories import run_config_factory
from workers import batching as worker_batching
from workers.envscripts import microbatch

FIXTURES = Path(__file__).parent / "fixtures" / "batch_probe"
H200 = {"index": 0, "name": "NVIDIA H200", "memory_total_mib": 143771.0, "memory_used_mib": 0.0, "utilization": 0.0}
# What the trainer printed when a micro-batch of 256 sequences of the 0.5B shape did not fit (H200).
H200_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.19 GiB. GPU 0 has a total capacity of "
            "139.80 GiB of which 697.12 MiB is free. Including non-PyTorch memory, this process has 139.11 GiB memory "
            "in use.\n")
# The panel's GPU defaults (packing, no gradient checkpointing, Liger) at 4 × 3, bf16.
GPU_PARAMS = {"packing": True, "disable_gradient_checkpointing": True, "enable_liger_kernel": True, "bf16": True,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "cutoff_len": 1024,
              "val_size": 0.0, "eval_strategy": "no"}


def recorded(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def budget_of(probe: dict[str, Any]) -> float:
    return microbatch.memory_budget_mib(probe["total_mib"], probe["overhead_mib"], probe["margin"])


# --------------------------------------------------------------------------- the probe's plan and the choice
def test_the_probe_goes_1_2_4_and_up_to_the_step_size() -> None:
    assert microbatch.probe_plan(12) == [1, 2, 4, 8, 12]
    assert microbatch.probe_plan(8) == [1, 2, 4, 8]
    assert microbatch.probe_plan(1) == [1]
    assert microbatch.divisors(12) == [1, 2, 3, 4, 6, 12] and microbatch.divisors(4096)[-1] == 4096


@pytest.mark.parametrize("name", ["h200_7b_probe.json", "h200_0.5b_probe_a.json", "h200_0.5b_probe_b.json",
                                  "h200_7b_probe_loop.json", "h200_0.5b_probe_loop.json", "cpu_tiny_oom_at_8.json"])
def test_replaying_a_recorded_probe_asks_for_the_sizes_it_measured_then_stops(name: str) -> None:
    probe = recorded(name)
    seen: list[dict[str, Any]] = []
    for measurement in probe["measurements"]:
        assert microbatch.plan_next(seen, probe["step"], budget_of(probe), probe["base_mib"]) == measurement["micro"]
        seen.append(measurement)
    assert microbatch.plan_next(seen, probe["step"], budget_of(probe), probe["base_mib"]) is None


def test_below_an_out_of_memory_size_the_probe_measures_the_divisor_in_between() -> None:
    probe = recorded("h200_7b_probe.json")
    fitted = {m["micro"]: m for m in probe["measurements"]}
    seen = [fitted[1], fitted[2], fitted[4], {"micro": 8, "ok": False, "error": "out of memory"}]
    # 6 divides the step of 12 and lies between 4 (fitted) and 8 (did not).
    assert microbatch.plan_next(seen, 12, budget_of(probe), probe["base_mib"]) == 6
    seen.append({**fitted[4], "micro": 6, "peak_reserved_mib": 46_800.0, "fb_s": 0.43})
    assert microbatch.plan_next(seen, 12, budget_of(probe), probe["base_mib"]) is None


def test_the_probe_does_not_try_a_size_its_own_line_puts_past_the_budget() -> None:
    probe = recorded("h200_7b_probe.json")
    fitted = {m["micro"]: m for m in probe["measurements"]}
    seen = [fitted[1], fitted[2], fitted[4]]
    # 36.2 GiB at 4, 25.6 at 2: 8 would take ~57 GiB, past a 50 GiB budget; 6 (~46.9 GiB) fits.
    assert microbatch.extrapolated_memory(seen, 8, probe["base_mib"]) == pytest.approx(57_514, rel=1e-3)
    assert microbatch.plan_next(seen, 12, 50_000, probe["base_mib"]) == 6


def test_the_7b_choice_is_12_x_1_on_an_h200_and_smaller_splits_are_its_fallbacks() -> None:
    probe = recorded("h200_7b_probe.json")
    chosen = microbatch.choose(probe["measurements"], 12, budget_of(probe), probe["seq_len"])
    assert (chosen["micro"], chosen["accumulation"]) == (12, 1)
    assert chosen["peak_reserved_mib"] == 78_784.0 and chosen["measured"]
    assert chosen["fallbacks"] == [6, 4, 3, 2, 1]  # 6 and 3: interpolated between measured sizes
    four = next(o for o in chosen["options"] if o["micro"] == 4)
    assert chosen["tokens_per_s"] > four["tokens_per_s"]  # 4 × 3 is the slower split of the same step


def test_a_smaller_gpu_gets_the_largest_split_that_fits_it() -> None:
    probe = recorded("h200_7b_probe.json")
    chosen = microbatch.choose(probe["measurements"], 12, 40_000, probe["seq_len"])
    assert (chosen["micro"], chosen["accumulation"]) == (4, 3)  # 36.2 GiB; 6 would need ~46.9 GiB
    assert microbatch.choose(probe["measurements"], 12, 10_000, probe["seq_len"])["micro"] is None


def with_loop(measurements: list[dict[str, Any]], micro: int, loop_step_s: float, accumulation: int = 1) -> list[dict[str, Any]]:
    """A recorded probe's measurements as if its trainer loop had run at `micro` × `accumulation`."""
    return [{**m, "loop_step_s": loop_step_s, "loop_accumulation": accumulation, "loop_steps": 16}
            if m["micro"] == micro else m for m in measurements]


def test_the_trainer_loop_sets_the_time_per_step_and_the_passes_keep_the_choice() -> None:
    """The second 0.5B probe on an H200 timed 144 ms of passes + 12 ms of optimizer step at 12 packs,
    where its runs took 219–238 ms per step (bench/gpu/results/h200_auto_0.5b_again.json): the
    passes alone miss the trainer loop's own cost. A loop measured at the chosen split corrects every
    split alike, so the choice stays the same."""
    probe = recorded("h200_0.5b_probe_b.json")
    plain = microbatch.choose(probe["measurements"], 12, budget_of(probe), probe["seq_len"])
    assert microbatch.loop_factor(probe["measurements"]) == 1.0
    looped = with_loop(probe["measurements"], 12, 0.2188)
    passes = 0.14405 + microbatch.optimizer_step_s(probe["measurements"])
    assert microbatch.loop_factor(looped) == pytest.approx(0.2188 / passes)
    chosen = microbatch.choose(looped, 12, budget_of(probe), probe["seq_len"])
    assert (chosen["micro"], chosen["accumulation"]) == (plain["micro"], plain["accumulation"]) == (12, 1)
    assert chosen["step_s"] == pytest.approx(0.2188)
    assert chosen["fallbacks"] == plain["fallbacks"]
    four, plain_four = (next(o for o in found["options"] if o["micro"] == 4) for found in (chosen, plain))
    assert four["step_s"] / plain_four["step_s"] == pytest.approx(0.2188 / passes)
    # A loop run at 6 × 2 counts its two passes.
    assert microbatch.loop_factor(with_loop(probe["measurements"], 4, 0.6, accumulation=3)) == pytest.approx(
        0.6 / (3 * 0.14493 + microbatch.optimizer_step_s(probe["measurements"])))


@pytest.mark.parametrize("name", ["h200_0.5b_probe_loop.json", "h200_7b_probe_loop.json"])
def test_a_probe_with_its_trainer_loop_predicts_the_next_runs_time_per_epoch_within_15_percent(name: str) -> None:
    """Each fixture's `measured_run`: the run that followed the probe on the same H200
    (bench/gpu/results/h200_auto_*_loop.json). 0.5B: a loop step of 231.8 ms where the passes alone
    said 186.5 ms."""
    probe = recorded(name)
    chosen = microbatch.choose(probe["measurements"], probe["step"], budget_of(probe), probe["seq_len"])
    assert (chosen["micro"], chosen["accumulation"]) == (12, 1)
    assert chosen["step_s"] == pytest.approx(probe["measurements"][-1]["loop_step_s"])
    run = probe["measured_run"]
    epoch_s = run["steps"] * chosen["step_s"] + batching.LOOP_START_S
    assert abs(epoch_s / run["train_runtime"] - 1) < 0.15


def test_predictions_interpolate_between_measured_sizes_and_never_extrapolate() -> None:
    probe = recorded("cpu_tiny_oom_at_8.json")
    fitted = {m["micro"]: m for m in probe["measurements"] if m["ok"]}
    three = microbatch.predict(probe["measurements"], 3)
    assert three["peak_reserved_mib"] == pytest.approx((fitted[2]["peak_reserved_mib"] + fitted[4]["peak_reserved_mib"]) / 2)
    assert microbatch.predict(probe["measurements"], 8) is None  # it ran out of memory
    assert microbatch.predict(probe["measurements"], 6) is None  # nothing measured above it fitted
    assert microbatch.covers(probe["measurements"], 8, budget_of(probe))  # stopped by the failure at 8
    assert not microbatch.covers([m for m in probe["measurements"] if m["ok"]], 8, budget_of(probe))


def test_after_an_out_of_memory_error_the_worker_takes_the_next_smaller_split(tmp_path: Path) -> None:
    from app.wire import BatchChoice

    choice = BatchChoice(per_device_train_batch_size=12, gradient_accumulation_steps=1, source="probe",
                         fallbacks=[6, 4, 3, 2, 1])
    assert worker_batching.smaller_split(choice, 12, 1) == (6, 2)
    assert worker_batching.smaller_split(choice.model_copy(update={"fallbacks": []}), 8, 2) == (4, 4)
    assert worker_batching.smaller_split(choice, 1, 12) is None
    log = tmp_path / "stdout.log"
    log.write_text("probe [ 20.1s] micro-batch 24: out of memory\n")
    launched = log.stat().st_size
    assert not worker_batching.ran_out_of_memory(log, launched)  # the probe's line is not the trainer's
    log.write_text(log.read_text() + "Traceback (most recent call last):\n" + H200_OOM)
    assert worker_batching.ran_out_of_memory(log, launched)


def test_the_split_is_written_into_train_yaml_and_the_peak_read_back(tmp_path: Path) -> None:
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("per_device_train_batch_size: 4\ngradient_accumulation_steps: 3\nlearning_rate: 1.0e-4\n")
    worker_batching.apply_split(train_yaml, 12, 1)
    assert worker_batching.current_split(train_yaml) == (12, 1)
    assert "learning_rate: 0.0001" in train_yaml.read_text()
    (tmp_path / "trainer_log.jsonl").write_text(
        '{"current_steps": 1, "loss": 12.1, "vram_allocated": 76.27, "vram_reserved": 76.96}\n'
        '{"current_steps": 2, "loss": 12.0, "vram_allocated": 76.2, "vram_reserved": 76.9}\n{"current_st')
    assert worker_batching.peak_memory(tmp_path) == {"reserved_mib": 78807.0, "allocated_mib": 78100.5}


# --------------------------------------------------------------------------- estimates
QWEN_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}


def test_the_formula_counts_the_published_qwen_shapes() -> None:
    # bench/gpu/make_assets.py's shapes: 494 M and 7.62 B parameters (biases aside).
    assert batching.formula_params(QWEN_05B)["params"] == pytest.approx(494e6, rel=0.01)
    assert batching.formula_params(QWEN_7B)["params"] == pytest.approx(7.62e9, rel=0.01)


def test_the_formula_is_within_its_measured_error_of_the_h200_runs() -> None:
    """bench/gpu/results/h200_auto_*.json: 7B 12 × 1 peaked at 78.8 GiB reserved; 0.5B at 15.1 GiB."""
    args = {**GPU_PARAMS, "lora_rank": 8}
    assert batching.formula_memory_mib(QWEN_7B, args, 12) == pytest.approx(78_807, rel=0.12)
    assert batching.formula_memory_mib(QWEN_05B, args, 12) == pytest.approx(15_442, rel=0.12)
    # 7B: 0.834 s of forward + backward per 12 packs measured by the probe.
    assert batching.formula_step_s(QWEN_7B, args, 12, "NVIDIA H200") == pytest.approx(0.834, rel=0.15)


def test_packing_is_counted_like_llamafactorys_knapsack() -> None:
    # With packing LLaMA-Factory cuts rows to cutoff_len - 1 and fills packs of that size.
    assert batching.packed_share([511] * 4, 1024) == 0.5
    assert batching.packed_share([600] * 3 + [400] * 3, 1024) == pytest.approx(3 / 6)
    assert batching.packed_share([5000], 1024) == 1.0
    assert batching.padded_share([100, 1000], 1024, 2) == pytest.approx(1000 / 1024)


# --------------------------------------------------------------------------- the panel's side
@pytest.fixture
def worker_headers(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {get_settings().worker_token}"}


@pytest.fixture
def model_dir(data_dir: Path) -> Path:
    """A registered-looking 7B-shaped model folder (config.json only: the shape is what matters)."""
    folder = data_dir.parent / "models" / "qwen7b-shape"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                                    **QWEN_7B}))
    return folder


def gpu_worker(client: TestClient, headers: dict[str, str], worker_id: str = "gpu@box") -> None:
    beat = client.post("/internal/v1/workers/heartbeat", headers=headers,
                       json={"worker_id": worker_id, "hostname": "box", "gpus": [H200]})
    assert beat.status_code == 200, beat.text


def start_and_claim(client: TestClient, headers: dict[str, str], config_id: int, worker_id: str = "gpu@box") -> dict:
    run = client.post("/api/v1/runs", json={"config_id": config_id}).json()
    with Session(get_engine()) as db:
        row = db.get(Run, run["id"])
        if row.dispatch_id is None:
            run_service.dispatch_runs(db, [run_service.Dispatch(row.id, row.attempt, worker_id, [0])])
        db.refresh(row)
        dispatch_id = row.dispatch_id
    claim = client.post(f"/internal/v1/runs/{run['id']}/claim", headers=headers,
                        json={"attempt": 1, "dispatch_id": dispatch_id, "worker_id": worker_id})
    assert claim.status_code == 200, claim.text
    return {"id": run["id"], "spec": claim.json()}


def probe_report(name: str, **change: Any) -> dict[str, Any]:
    probe = recorded(name)
    measurements = [{k: v for k, v in m.items() if k != "times"} for m in probe["measurements"]]
    return {"attempt": 1, "worker_id": "gpu@box", "ok": True, **{k: probe[k] for k in (
        "device", "total_mib", "overhead_mib", "base_mib", "seq_len", "step", "load_s", "probe_s", "versions")},
        "measurements": measurements, **change}


def test_a_gpu_run_probes_once_and_the_next_run_takes_the_split_from_the_cache(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    config = run_config_factory(session, str(model_dir), gpus=1, params=GPU_PARAMS)
    gpu_worker(client, worker_headers)
    first = start_and_claim(client, worker_headers, config.id)
    assert first["spec"]["batch"] is None
    assert first["spec"]["probe"] == {"step": 12, "margin": 0.1, "timed_steps": 3, "warmup_steps": 1,
                                      "device": "auto", "memory_limit_mib": None}
    page = client.get(f"/runs/{first['id']}").text
    assert "probing the worker's GPU for the fastest split of 12 sequences per step" in page

    answer = client.post(f"/internal/v1/runs/{first['id']}/probe", headers=worker_headers,
                         json=probe_report("h200_7b_probe.json"))
    assert answer.status_code == 200, answer.text
    choice = answer.json()
    assert (choice["per_device_train_batch_size"], choice["gradient_accumulation_steps"], choice["source"]) == (12, 1, "probe")
    assert "the config's 4 × 3" in choice["reason"] and "NVIDIA H200" in choice["reason"]
    assert choice["fallbacks"] == [6, 4, 3, 2, 1]
    [stored] = session.exec(select(BatchProbe)).all()
    assert stored.gpu_name == "NVIDIA H200" and [m["micro"] for m in stored.measurements] == [1, 2, 4, 8, 12]
    assert stored.key_fields["cutoff_len"] == 1024 and stored.key_fields["packing"] is True
    plan = client.get(f"/api/v1/runs/{first['id']}").json()["batch_plan"]
    assert plan["state"] == "chosen" and plan["estimate_probe"]["peak_mem_mib"] == 78_784.0
    assert "12 × 1" in client.get(f"/runs/{first['id']}").text

    second = start_and_claim(client, worker_headers, config.id)
    assert second["spec"]["probe"] is None
    assert second["spec"]["batch"]["source"] == "cache"
    assert (second["spec"]["batch"]["per_device_train_batch_size"],
            second["spec"]["batch"]["gradient_accumulation_steps"]) == (12, 1)
    assert client.get("/api/v1/batch-probes").json()[0]["run_id"] == first["id"]


def test_an_out_of_memory_fallback_is_recorded_and_the_cache_learns_it(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    config = run_config_factory(session, str(model_dir), gpus=1, params=GPU_PARAMS)
    gpu_worker(client, worker_headers)
    run = start_and_claim(client, worker_headers, config.id)
    client.post(f"/internal/v1/runs/{run['id']}/probe", headers=worker_headers,
                json=probe_report("h200_7b_probe.json")).raise_for_status()
    fallback = client.post(f"/internal/v1/runs/{run['id']}/batch-fallback", headers=worker_headers, json={
        "attempt": 1, "worker_id": "gpu@box", "failed_micro": 12, "per_device_train_batch_size": 6,
        "gradient_accumulation_steps": 2, "logged_steps": 0,
        "reason": "micro-batch 12 ran out of memory after 0 logged step(s): training again at 6 × 2"})
    assert fallback.status_code == 200, fallback.text
    plan = client.get(f"/api/v1/runs/{run['id']}").json()["batch_plan"]
    assert plan["fallback"]["failed_micro"] == 12 and plan["choice"]["batch"]["source"] == "fallback"
    page = client.get(f"/runs/{run['id']}").text
    assert "Out of memory:" in page and "training again at 6 × 2" in page
    # The next run of the key is not sent to a size that did not fit.
    again = start_and_claim(client, worker_headers, config.id)
    assert (again["spec"]["batch"]["per_device_train_batch_size"], again["spec"]["batch"]["source"]) == (6, "cache")
    # A report for an attempt that is over changes nothing.
    stale = client.post(f"/internal/v1/runs/{run['id']}/probe", headers=worker_headers,
                        json=probe_report("h200_7b_probe.json", attempt=2))
    assert stale.status_code == 409


def test_the_estimate_from_a_probe_takes_the_time_per_step_of_its_trainer_loop(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    config = run_config_factory(session, str(model_dir), gpus=1, params=GPU_PARAMS)
    gpu_worker(client, worker_headers)
    run = start_and_claim(client, worker_headers, config.id)
    report = probe_report("h200_7b_probe.json")
    report["measurements"] = with_loop(report["measurements"], 12, 0.929)
    client.post(f"/internal/v1/runs/{run['id']}/probe", headers=worker_headers, json=report).raise_for_status()
    [stored] = session.exec(select(BatchProbe)).all()
    assert stored.measurements[-1]["loop_step_s"] == 0.929 and stored.measurements[-1]["loop_accumulation"] == 1
    plan = client.get(f"/api/v1/runs/{run['id']}").json()["batch_plan"]
    assert plan["predicted"]["step_s"] == pytest.approx(0.929)
    estimate = plan["estimate_probe"]
    assert estimate["source"].startswith("probe ") and estimate["micro"] == 12
    assert estimate["step_s"] == pytest.approx(0.929, abs=1e-4)
    # Time per epoch: its optimizer steps at the loop's time, and the loop's start (spread over the epochs).
    speed = batching._config_estimate(session, config, 1, "NVIDIA H200", 143_771.0)
    start = batching.LOOP_START_S / max(1.0, float(config.params.get("num_train_epochs") or 0))
    assert estimate["epoch_s"] == pytest.approx(speed["steps_per_epoch"] * 0.929 + start, abs=0.06)


def test_a_finished_run_is_measured_against_the_estimate_it_was_shown(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    config = run_config_factory(session, str(model_dir), gpus=1, params=GPU_PARAMS)
    gpu_worker(client, worker_headers)
    run = start_and_claim(client, worker_headers, config.id)
    assert client.get(f"/api/v1/runs/{run['id']}").json()["batch_plan"]["estimate"]["source"].startswith("formula")
    client.post(f"/internal/v1/runs/{run['id']}/probe", headers=worker_headers,
                json=probe_report("h200_7b_probe.json")).raise_for_status()
    client.post(f"/internal/v1/runs/{run['id']}/events", headers=worker_headers, json={
        "attempt": 1, "worker_id": "gpu@box", "status": "running",
        "progress": {"current_steps": 2, "total_steps": 2}}).raise_for_status()
    finish = client.post(f"/internal/v1/runs/{run['id']}/finish", headers=worker_headers, json={
        "attempt": 1, "worker_id": "gpu@box", "outcome": "succeeded", "exit_code": 0,
        "results": {"train_runtime": 1.858, "epoch": 1.0},
        "peak_memory": {"reserved_mib": 78807.0, "allocated_mib": 78100.5}})
    assert finish.status_code == 200, finish.text
    plan = client.get(f"/api/v1/runs/{run['id']}").json()["batch_plan"]
    assert plan["measured"] == {"peak_reserved_mib": 78807.0, "peak_allocated_mib": 78100.5, "epoch_s": 1.86,
                                "train_runtime_s": 1.86, "step_s": 0.929, "epochs": 1.0, "micro": 12}
    # The probe's own estimate of the peak was 78,784 MiB: 0.03 % under.
    assert plan["errors"]["estimate_probe"]["memory"] == pytest.approx(78_784 / 78_807 - 1, abs=1e-4)
    page = client.get(f"/runs/{run['id']}").text
    assert "measured 77.0 GiB" in page
    # The config page now estimates from that run, and says how far the estimate shown before it was.
    config_page = client.get(f"/configs/{config.id}").text
    assert f"past run {run['id']}" in config_page and 'id="est-accuracy"' in config_page


def test_the_form_has_the_optimizer_step_and_hints_the_square_root_rule(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    config = run_config_factory(session, str(model_dir), gpus=1, params={**GPU_PARAMS, "learning_rate": 1.0e-4})
    gpu_worker(client, worker_headers)
    page = client.get(f"/configs/{config.id}/edit").text
    assert 'id="step_size" name="step_size" value="12"' in page and 'id="auto_batch"' in page
    assert "the loss curve does" in page  # why the split does not matter to learning, only to speed
    form = {"name": config.name, "model_id": str(config.model_id), "dataset_ids": [str(config.dataset_ids[0])],
            "gpus": "1", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "3",
            "learning_rate": "1.0e-4", "cutoff_len": "1024", "packing": "true", "enable_liger_kernel": "true",
            "bf16": "true", "val_size": "0", "eval_strategy": "no", "auto_batch": "true",
            "step_size": "48", "previous_step_size": "12"}
    fragment = client.post("/configs/form/estimate", data=form).text
    assert "from 12 to 48 sequences" in fragment and "0.0002" in fragment  # 1e-4 × √4
    assert "nothing is changed for you" in fragment
    assert 'id="est-step">48 sequences' in fragment and "NVIDIA H200" in fragment
    # Saved: the step sets batch × accumulation (the batch kept where it divides it).
    saved = client.post(f"/configs/{config.id}/edit", data=form, follow_redirects=False)
    assert saved.status_code == 303, saved.text
    new_id = int(saved.headers["location"].rsplit("/", 1)[-1])
    stored = client.get(f"/api/v1/configs/{new_id}").json()
    assert (stored["params"]["per_device_train_batch_size"], stored["params"]["gradient_accumulation_steps"]) == (4, 12)
    assert stored["auto_batch"] is True
    refused = client.post("/api/v1/configs/estimate", json={"name": "x", "gpus": 2, "step_size": 13,
                                                             "params": GPU_PARAMS})
    assert refused.status_code == 200
    created = client.post("/api/v1/configs", json={"name": "odd", "gpus": 2, "step_size": 13, "params": GPU_PARAMS,
                                                   "model_id": config.model_id, "dataset_ids": config.dataset_ids})
    assert created.status_code == 422 and "do not split over 2 GPUs" in created.text


def test_cpu_runs_and_configs_with_it_off_keep_their_split(
        client: TestClient, session: Session, worker_headers: dict[str, str], model_dir: Path) -> None:
    cpu = run_config_factory(session, str(model_dir), name="cpu", gpus=0, params=GPU_PARAMS)
    client.post("/internal/v1/workers/heartbeat", headers=worker_headers,
                json={"worker_id": "cpu@box", "hostname": "box", "cpu_train_slots": 1}).raise_for_status()
    run = start_and_claim(client, worker_headers, cpu.id, worker_id="cpu@box")
    assert run["spec"]["probe"] is None and run["spec"]["batch"] is None
    assert "CPU run" in client.get(f"/api/v1/runs/{run['id']}").json()["batch_plan"]["reason"]
    off = run_config_factory(session, str(model_dir), name="off", gpus=1, params=GPU_PARAMS)
    off.auto_batch = False
    session.add(off)
    session.commit()
    gpu_worker(client, worker_headers)
    run = start_and_claim(client, worker_headers, off.id)
    assert run["spec"]["probe"] is None and run["spec"]["batch"] is None
