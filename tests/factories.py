"""Factories for rows the tests need, shared by every area: add yours below."""

from __future__ import annotations

import io
import json
from typing import Any

from sqlmodel import Session

from app.models import Dataset
from app.services import datasets as dataset_service


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


def finished_run_factory(
    session: Session, output_dir: str, base_model: str, *, status: str = "succeeded", name: str = "demo",
    checkpoints: list[dict[str, Any]] | None = None, template: str = "qwen",
):
    """A finished run whose output (adapter, checkpoints) is `output_dir`, as the runs service
    records it when the worker reports the finish."""
    import yaml

    from app.models import Run, TrainConfig

    config = TrainConfig(name=f"{name}-config", params={"model_name_or_path": base_model})
    session.add(config)
    session.flush()
    run = Run(
        name=name, config_id=config.id, status=status, output_dir=output_dir,
        adapter_path=output_dir if status == "succeeded" else None, checkpoints=checkpoints or [],
        train_yaml=yaml.safe_dump({"model_name_or_path": base_model, "template": template,
                                   "finetuning_type": "lora", "output_dir": "{OUTPUT_DIR}"}),
    )
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


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
    from app.models import ModelEntry, TrainConfig

    model = ModelEntry(name=f"{name}-model", path=model_path, model_type="qwen2")
    session.add(model)
    session.commit()
    dataset = dataset_factory(session, f"{name}-data", alpaca_rows(rows, prefix=name))
    config = TrainConfig(
        name=f"{name}-config", model_id=model.id, dataset_ids=[dataset.id], gpus=gpus,
        params={**TINY_TRAIN_PARAMS, **(params or {})},
    )
    session.add(config)
    session.commit()
    session.refresh(config)
    return config
