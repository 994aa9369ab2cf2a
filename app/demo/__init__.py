"""The demo: a tiny random Qwen2 model, a small Alpaca dataset and a CPU-sized config, so a
newcomer can click through the whole loop on a laptop CPU in minutes.

Installed by the web app at start-up when TUNEBOARD_DEMO is set (`tuneboard up --demo`):
the app stays the only writer of its database. Idempotent: what exists is left alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sqlmodel import Session, select

from app.models import Dataset, ModelEntry, TrainConfig
from app.services import configs, datasets, model_registry
from app.settings import get_settings
from workers import train_env

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo-qwen2-tiny"
DEMO_DATASET_NAME = "demo-alpaca"
DEMO_CONFIG_NAME = "demo-lora-cpu"
DEMO_DATASET_FILE = Path(__file__).with_name("demo_alpaca.json")
# Building it imports transformers and writes < 1 MB: seconds, minutes on a very busy machine.
DEMO_MODEL_TIMEOUT_S = 600

# Sized for a CPU: a random tiny model needs a high learning rate and several epochs to show a
# visible loss curve (measured: lr 1e-4 barely moves it); bf16 needs a GPU.
DEMO_PARAMS = {
    "template": "qwen",
    "cutoff_len": 256,
    "max_samples": 1000,
    "preprocessing_num_workers": 1,
    "dataloader_num_workers": 0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5.0e-3,
    "num_train_epochs": 4.0,
    "logging_steps": 1,
    "save_steps": 10,
    "eval_steps": 10,
    "val_size": 0.1,
    "bf16": False,
    "report_to": "none",
}


def build_demo_model(target: Path) -> str:
    """Build the model with the training env (it needs transformers and tokenizers); returns
    the script's one-line JSON summary."""
    answer = train_env.run_script("demo_model.py", args=(str(target),), timeout_s=DEMO_MODEL_TIMEOUT_S,
                                  what="building the demo model")
    return json.dumps(answer)


def install_demo(session: Session) -> None:
    settings = get_settings()
    model = session.exec(select(ModelEntry).where(ModelEntry.name == DEMO_MODEL_NAME)).first()
    if model is None:
        root = settings.model_roots[0].expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        build_demo_model(root / DEMO_MODEL_NAME)
        model = model_registry.add_model(session, str(root / DEMO_MODEL_NAME), DEMO_MODEL_NAME)
        log.info("demo model registered: %s", model.path)

    dataset = session.exec(select(Dataset).where(Dataset.name == DEMO_DATASET_NAME)).first()
    if dataset is None:
        with DEMO_DATASET_FILE.open("rb") as stream:
            incoming = datasets.ingest_file(stream, datasets.UploadOptions(), DEMO_DATASET_FILE.name)
        (dataset,) = datasets.register(
            session, [(incoming, DEMO_DATASET_NAME, "200 synthetic Alpaca rows for the demo")]
        )
        log.info("demo dataset registered: %s rows", dataset.row_count)

    if session.exec(select(TrainConfig).where(TrainConfig.name == DEMO_CONFIG_NAME)).first() is None:
        data = configs.TrainConfigInput(
            name=DEMO_CONFIG_NAME,
            description="LoRA SFT of the tiny demo model on the demo dataset; trains on a CPU in under a minute.",
            model_id=model.id,
            dataset_ids=[dataset.id],
            params={**configs.TrainConfigInput().params, **DEMO_PARAMS},
        )
        configs.create_config(session, data)
        log.info("demo config created")
