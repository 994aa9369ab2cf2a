"""Factories for rows the tests need, shared by every area: add yours below."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from sqlmodel import Session

from app.models import Dataset
from app.services import datasets as dataset_service
from app.settings import get_settings


def alpaca_rows(count: int = 5, prefix: str = "row") -> list[dict[str, str]]:
    return [{"instruction": f"{prefix} {i}: say hi", "input": "", "output": f"hi {i}"} for i in range(count)]


def dataset_factory(
    session: Session, name: str = "demo", rows: list[dict[str, Any]] | None = None, *, jsonl: bool = False,
    formatting: str = "auto", columns: dict[str, str | None] | None = None, description: str = "",
) -> Dataset:
    """A registered dataset, through the same validation and storage as an upload."""
    rows = rows if rows is not None else alpaca_rows(prefix=name)
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows)
    options = dataset_service.UploadOptions.parse(formatting, columns, None)
    incoming = dataset_service.ingest_file(io.BytesIO(text.encode()), options, f"{name}.{'jsonl' if jsonl else 'json'}")
    [dataset] = dataset_service.register(session, [(incoming, name, description)])
    return dataset


def write_run_dataset_dir(datasets: list[Dataset], run_dataset_dir: Path) -> dict[str, dict[str, Any]]:
    """A run's dataset_dir as a worker lays it out (each file under its run_file_name, beside the
    dataset_info.json the claim carries); returns that info."""
    run_dataset_dir.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        (run_dataset_dir / dataset_service.run_file_name(dataset)).write_bytes(
            dataset_service.data_file(dataset).read_bytes())
    info = dataset_service.dataset_info_for(datasets)
    (run_dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return info


def store_folder(session: Session, run_id: int, attempt: int, folder: Path, name: str, step: int | None = None):
    """Put a folder into the artifact store as the run's artifact `name`, the way a worker's
    upload ends (blobs in the store, then the manifest recorded)."""
    from app.services import artifacts as artifact_service
    from app.wire import ArtifactManifest, ArtifactRecord, FileEntry

    files = sorted(p for p in (folder.rglob("*") if name != "adapter" else folder.iterdir()) if p.is_file())
    entries = []
    for path in files:
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        staged = get_settings().path("artifacts", "test-staging") / sha256
        staged.write_bytes(data)
        artifact_service.get_store().put(sha256, staged)
        entries.append(FileEntry(path=path.relative_to(folder).as_posix(), sha256=sha256, size=len(data)))
    manifest = ArtifactManifest(name=name, step=step, files=entries)
    artifact_service.record_artifact(session, run_id, ArtifactRecord(attempt=attempt, worker_id="test", manifest=manifest))
    return manifest


def finished_run_factory(
    session: Session, output_dir: str, base_model: str, *, status: str = "succeeded", name: str = "demo",
    checkpoints: list[dict[str, Any]] | None = None, template: str = "qwen",
):
    """A finished run whose output (adapter, checkpoints) is `output_dir`, stored in the artifact
    store as the worker's uploads leave it."""
    import yaml

    from app.models import Run, TrainConfig

    config = TrainConfig(name=f"{name}-config", params={"model_name_or_path": base_model})
    session.add(config)
    session.flush()
    run = Run(
        name=name, config_id=config.id, status=status, has_adapter=status == "succeeded",
        checkpoints=checkpoints or [],
        train_yaml=yaml.safe_dump({"model_name_or_path": base_model, "template": template,
                                   "finetuning_type": "lora", "output_dir": "{OUTPUT_DIR}"}),
    )
    session.add(run)
    session.commit()
    session.refresh(run)
    output = Path(output_dir)
    if status == "succeeded":
        store_folder(session, run.id, run.attempt, output, "adapter")
    for checkpoint in checkpoints or []:
        if checkpoint.get("complete") and (output / checkpoint["name"]).is_dir():
            store_folder(session, run.id, run.attempt, output / checkpoint["name"], checkpoint["name"], checkpoint["step"])
    session.refresh(run)
    return run


def model_factory(session: Session, path: str, name: str | None = None):
    """A registered model entry for `path` (a real folder gets its fingerprint); the one already
    registered for that path, if any."""
    from sqlmodel import select

    from app.models import ModelEntry
    from app.wire import model_fingerprint

    existing = session.exec(select(ModelEntry).where(ModelEntry.path == path)).first()
    if existing is not None:
        return existing
    entry = ModelEntry(name=name or Path(path).name, path=path, model_type="qwen2",
                       fingerprint=model_fingerprint(Path(path)) or "")
    session.add(entry)
    session.commit()
    session.refresh(entry)
    return entry


# A config that trains the tiny demo model in seconds on a CPU, with a visible curve, eval points
# and checkpoints (runs area).
TINY_TRAIN_PARAMS: dict[str, Any] = {
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
    "template": "qwen", "cutoff_len": 128, "max_samples": 100, "overwrite_cache": True,
    "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "logging_steps": 1, "save_steps": 4,
    "plot_loss": True, "overwrite_output_dir": False, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1, "learning_rate": 5.0e-3, "num_train_epochs": 2.0,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": False, "val_size": 0.2,
    "per_device_eval_batch_size": 4, "eval_strategy": "steps", "eval_steps": 4,
    "report_to": "none",
}


def run_config_factory(
    session: Session, model_path: str = "/models/tiny", *, name: str = "tiny", rows: int = 20,
    params: dict[str, Any] | None = None, gpus: int = 0,
):
    """A TrainConfig with a registered model and dataset, ready for a run."""
    from app.models import TrainConfig

    model = model_factory(session, model_path, f"{name}-model")
    dataset = dataset_factory(session, f"{name}-data", alpaca_rows(rows, prefix=name))
    config = TrainConfig(
        name=f"{name}-config", model_id=model.id, dataset_ids=[dataset.id], gpus=gpus,
        params={**TINY_TRAIN_PARAMS, **(params or {})},
    )
    session.add(config)
    session.commit()
    session.refresh(config)
    return config


def train_tiny_adapter(model: Path, work: Path) -> Path:
    """A real LoRA adapter: `llamafactory-cli train` on the tiny model (16 rows, 1 epoch, ~10 s);
    the returned folder holds the final adapter and checkpoint-2/checkpoint-4."""
    import os
    import subprocess

    import yaml

    rows = [{"instruction": f"你是谁？({i})", "input": "", "output": "我是Tuneboard演示助手。"} for i in range(16)]
    (work / "data.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (work / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "data.json"}}))
    output = work / "output"
    args = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "dataset": "tiny", "dataset_dir": str(work), "template": "qwen",
        "cutoff_len": 64, "output_dir": str(output), "per_device_train_batch_size": 4, "num_train_epochs": 1,
        "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2, "report_to": "none",
        "overwrite_output_dir": True,
    }
    (work / "train.yaml").write_text(yaml.safe_dump(args))
    result = subprocess.run(
        [get_settings().llamafactory_cli, "train", str(work / "train.yaml")], cwd=work, capture_output=True,
        text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output
