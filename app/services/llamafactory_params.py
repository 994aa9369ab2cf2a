"""The LLaMA-Factory training arguments the panel knows: section, type, default, help and choices.

Sections and their order follow LLaMA-Factory's examples/train_lora/*.yaml (### model, ### method,
### dataset, ### output, ### train, ### eval). Any other argument is kept as an "advanced" key and
checked by LLaMA-Factory's own parser (workers/envscripts/validate_args.py). Every key must be one of
LLaMA-Factory's argument names (`argument_names`, read from the training env).
"""

from __future__ import annotations

import difflib
import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.settings import get_settings
from workers import train_env

# Importing LLaMA-Factory takes 5 s on an idle machine, far more on a busy one.
ARGUMENT_NAMES_TIMEOUT_S = 300

SECTIONS = ("model", "method", "dataset", "output", "train", "eval")


@dataclass(frozen=True)
class Param:
    name: str
    section: str
    type: type  # bool | int | float | str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    # Shown in the form (the rest are only known for placement and typing of imported YAML).
    in_form: bool = True
    nullable: bool = False

    @property
    def label(self) -> str:
        """What the form calls it (the YAML key is shown under it)."""
        return LABELS.get(self.name, self.name.replace("_", " ").capitalize())

    @property
    def basic(self) -> bool:
        """Shown up front; the others of its section fold under "More settings"."""
        return self.name in BASIC


# The well-known LoRA SFT starting config; `None` marks "unset" (the key is not written).
PARAMS: tuple[Param, ...] = (
    # ### model
    Param("model_name_or_path", "model", str, None, "The base model folder (a registered model).", in_form=False),
    Param("trust_remote_code", "model", bool, None, "Run the model's own Python code from its folder.",
          in_form=False, nullable=True),
    Param("quantization_bit", "model", int, None,
          "QLoRA: load the base model in 4 or 8 bits (bitsandbytes, GPU only). Empty = no quantization.",
          choices=("4", "8"), nullable=True),
    Param("flash_attn", "model", str, "auto", "Attention kernel: auto picks the fastest available.",
          choices=("auto", "disabled", "sdpa", "fa2", "fa3")),
    Param("enable_liger_kernel", "model", bool, None, "Liger's fused Triton kernels (GPU only, needs the liger-kernel"
          " package): less memory and faster steps. On by default for GPU runs.",
          nullable=True),
    Param("disable_gradient_checkpointing", "model", bool, None,
          "LLaMA-Factory checkpoints activations unless this is true.", in_form=False, nullable=True),
    # ### method
    Param("stage", "method", str, "sft", "Training stage; the panel's form is made for SFT.",
          choices=("sft", "pt", "rm", "ppo", "dpo", "kto")),
    Param("do_train", "method", bool, True, "Train (false only evaluates or predicts).", in_form=False),
    Param("finetuning_type", "method", str, "lora", "LoRA trains small adapter matrices; the base stays frozen.",
          choices=("lora", "freeze", "full", "oft")),
    Param("lora_rank", "method", int, 8, "Rank of the LoRA matrices: capacity of the adapter (8–64 is usual)."),
    Param("lora_alpha", "method", int, None, "LoRA scaling numerator; empty = 2 × rank.", nullable=True),
    Param("lora_dropout", "method", float, None, "Dropout on the LoRA path (0–0.1 is usual); empty = 0.",
          nullable=True),
    Param("lora_target", "method", str, "all",
          "Modules that get adapters: all linear layers, or names like q_proj,v_proj."),
    Param("deepspeed", "method", str, None,
          "A DeepSpeed config bundled with LLaMA-Factory (examples/deepspeed/ds_z{0,2,3}[_offload]_config.json).",
          in_form=False, nullable=True),
    Param("pref_beta", "method", float, None, "Preference loss beta (DPO/KTO).", in_form=False, nullable=True),
    Param("pref_loss", "method", str, None, "Preference loss (DPO).", in_form=False, nullable=True),
    # ### dataset
    Param("dataset", "dataset", str, None, "Registered datasets, comma-joined.", in_form=False),
    Param("dataset_dir", "dataset", str, None, "Set by the panel per run.", in_form=False),
    Param("template", "dataset", str, "qwen",
          "Chat template used to format prompts; must match the model family (and the one used at inference)."),
    Param("cutoff_len", "dataset", int, 1024, "Maximum tokens per example; longer ones are truncated."),
    Param("max_samples", "dataset", int, 15000,
          "Rows taken from each dataset. Empty = the whole dataset.", nullable=True),
    Param("overwrite_cache", "dataset", bool, True, "Re-tokenize instead of reusing the preprocessing cache."),
    Param("preprocessing_num_workers", "dataset", int, 16, "Processes that tokenize the dataset."),
    Param("dataloader_num_workers", "dataset", int, 8, "Processes that feed batches during training."),
    Param("packing", "dataset", bool, None,
          "Pack several short examples into one sequence of cutoff_len, so that little time goes to padding:"
          " much faster on short examples. On by default for GPU runs (docs/benchmarks.md).", nullable=True),
    Param("neat_packing", "dataset", bool, None,
          "Packing without cross-attention between packed examples (SFT only).", nullable=True),
    # ### output
    Param("output_dir", "output", str, None, "Set by the panel per run.", in_form=False),
    Param("logging_steps", "output", int, 10, "Log loss and learning rate every N optimizer steps."),
    Param("save_steps", "output", int, 500, "Save a checkpoint every N steps."),
    Param("plot_loss", "output", bool, True, "Write loss plots at the end."),
    Param("overwrite_output_dir", "output", bool, True, "Start fresh in the run's folder."),
    Param("save_only_model", "output", bool, False, "Checkpoints without optimizer state (smaller; no exact resume)."),
    Param("report_to", "output", str, None, "Experiment tracker; none keeps everything in the panel.",
          choices=("none", "tensorboard", "wandb", "swanlab", "mlflow"), nullable=True),
    Param("include_num_input_tokens_seen", "output", str, "non_padding",
          "Count the tokens trained on, padding left out: the run's tokens/s chart and its tokens axis need it.",
          choices=("non_padding", "all", "no")),
    # ### train
    Param("per_device_train_batch_size", "train", int, 4,
          "Examples per GPU in each forward pass. Larger batches use more GPU memory and fill the GPU better;"
          " with the automatic micro-batch on, a GPU run picks this and the accumulation itself (same product)."),
    Param("gradient_accumulation_steps", "train", int, 8,
          "Forward passes summed per optimizer step (effective batch = batch × accumulation × GPUs)."),
    Param("learning_rate", "train", float, 1.0e-4, "Peak learning rate (1e-4 to 2e-4 is usual for LoRA)."),
    Param("num_train_epochs", "train", float, 3.0, "Passes over the training data."),
    Param("lr_scheduler_type", "train", str, "cosine", "How the learning rate decays after warmup.",
          choices=("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")),
    Param("warmup_ratio", "train", float, 0.1, "Fraction of the steps spent warming the learning rate up."),
    Param("bf16", "train", bool, True, "bfloat16 mixed precision (GPU; on a CPU-only run the panel uses fp32)."),
    Param("fp16", "train", bool, None, "float16 mixed precision (older GPUs).", in_form=False, nullable=True),
    Param("ddp_timeout", "train", int, 180000000, "Seconds multi-GPU processes wait for each other."),
    Param("resume_from_checkpoint", "train", str, None, "Set by the panel when a run resumes.", in_form=False,
          nullable=True),
    Param("seed", "train", int, None, "Random seed (shuffling, LoRA init); empty = 42.", nullable=True),
    # ### eval
    Param("eval_dataset", "eval", str, None, "Separate evaluation datasets (names); usually use val_size instead.",
          in_form=False, nullable=True),
    Param("val_size", "eval", float, 0.1, "Share of the data held out for evaluation (0 = none)."),
    Param("per_device_eval_batch_size", "eval", int, 1, "Examples per GPU per evaluation pass."),
    Param("eval_strategy", "eval", str, "steps", "When to evaluate.", choices=("no", "steps", "epoch")),
    Param("eval_steps", "eval", int, 500, "Evaluate every N steps (with eval_strategy steps)."),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}

SECTION_TITLES = {
    "model": "Model", "method": "Fine-tuning method", "dataset": "Data", "output": "Logging and checkpoints",
    "train": "Training", "eval": "Evaluation",
}
LABELS = {
    "quantization_bit": "Quantization (QLoRA)", "flash_attn": "Attention kernel", "enable_liger_kernel": "Liger kernels",
    "stage": "Training stage", "finetuning_type": "Fine-tuning type", "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "lora_target": "LoRA target modules",
    "template": "Chat template", "cutoff_len": "Max tokens per example", "max_samples": "Rows per dataset",
    "overwrite_cache": "Tokenize again each run", "preprocessing_num_workers": "Tokenizer processes",
    "dataloader_num_workers": "Data loader processes", "packing": "Pack short examples",
    "neat_packing": "Pack without cross-attention", "logging_steps": "Log every N steps",
    "save_steps": "Checkpoint every N steps", "plot_loss": "Loss plots", "overwrite_output_dir": "Start from an empty folder",
    "save_only_model": "Checkpoints without optimizer state", "report_to": "Experiment tracker",
    "include_num_input_tokens_seen": "Count tokens", "per_device_train_batch_size": "Batch size per device",
    "gradient_accumulation_steps": "Gradient accumulation steps", "learning_rate": "Learning rate",
    "num_train_epochs": "Epochs", "lr_scheduler_type": "Learning-rate schedule", "warmup_ratio": "Warm-up share",
    "bf16": "bf16 mixed precision", "ddp_timeout": "Multi-GPU timeout (s)", "seed": "Random seed",
    "val_size": "Held-out share for evaluation", "per_device_eval_batch_size": "Eval batch size per device",
    "eval_strategy": "When to evaluate", "eval_steps": "Evaluate every N steps",
}
BASIC = frozenset({
    "lora_rank", "template", "cutoff_len", "max_samples", "logging_steps", "save_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "bf16",
    "val_size", "eval_strategy", "eval_steps",
})

# Keys the panel fills per run: never typed by the user.
PANEL_OWNED = frozenset({"output_dir", "dataset_dir"})
# Keys filled from the config's own fields (model_id, dataset_ids).
DERIVED = frozenset({"model_name_or_path", "dataset"})

# Templates the LLaMA-Factory README names for "base" models; an Instruct/Chat model must not use them.
BASE_TEMPLATES = frozenset({"default", "alpaca", "vicuna"})

MAX_SAMPLES_PRESETS = (
    ("debug", 1000, "500–1000: verify the pipeline end to end in minutes"),
    ("small experiment", 10000, "5000–10000: compare settings cheaply"),
    ("full training", None, "unset: the whole dataset"),
)


# The panel's recommended GPU defaults, measured against the usual config on one H100 (docs/benchmarks.md,
# bench/gpu/gpu_bench.py): packed sequences, no activation recomputation and Liger's fused kernels.
GPU_DEFAULTS: dict[str, Any] = {
    "packing": True, "disable_gradient_checkpointing": True, "enable_liger_kernel": True,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3,
}


def default_params(gpus: int = 0) -> dict[str, Any]:
    """The well-known starting config (resume_from_checkpoint: null included, as people write it);
    with GPUs, the recommended GPU defaults on top (Liger's kernels and the speed-ups need a GPU)."""
    params = {p.name: p.default for p in PARAMS if p.default is not None and p.name not in DERIVED}
    params["resume_from_checkpoint"] = None
    if gpus > 0:
        params.update(GPU_DEFAULTS)
    return params


def form_params(section: str) -> list[Param]:
    return [p for p in PARAMS if p.section == section and p.in_form]


def coerce(name: str, value: Any) -> Any:
    """A value of the parameter's type; form strings ("3", "on", "") become 3.0, True, None.

    Raises ValueError with a message meant for the field.
    """
    param = BY_NAME.get(name)
    if param is None:
        return value
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if param.type is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "on", "1", "yes"):
            return True
        if text in ("false", "off", "0", "no"):
            return False
        raise ValueError("must be true or false")
    if param.type is int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
    if param.type is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
    # Lists (report_to: [wandb, tensorboard]) pass through as LLaMA-Factory accepts them.
    return value.strip() if isinstance(value, str) else value


# ------------------------------------------------------------------------- LLaMA-Factory's own names


def llamafactory_cache_file(train_python: str, what: str) -> Path | None:
    """A cache file in the data dir for an answer of the training env, named after its llamafactory
    dist-info so that an upgrade asks again (None when llamafactory is not installed there)."""
    env_root = Path(train_python).parent.parent
    dist_infos = sorted(env_root.glob("lib/python*/site-packages/llamafactory-*.dist-info"))
    if not dist_infos:
        return None
    return get_settings().path("cache") / f"{what}-{dist_infos[-1].name}.json"


# A burst of requests on a cold cache would each start the training env: the first asks, the others wait.
_argument_names_lock = threading.Lock()


@lru_cache
def argument_names(train_python: str) -> frozenset[str]:
    """Every key `llamafactory-cli train` accepts (its five argument dataclasses, transformers'
    Seq2SeqTrainingArguments included): asked once per installed LLaMA-Factory version, then read
    from a cache file. Raises train_env.TrainEnvError."""
    with _argument_names_lock:
        cache = llamafactory_cache_file(train_python, "train-arguments")
        if cache is not None and cache.exists():
            return frozenset(json.loads(cache.read_text()))
        answer = train_env.run_script("train_arg_names.py", python=train_python, timeout_s=ARGUMENT_NAMES_TIMEOUT_S,
                                      what="listing LLaMA-Factory's arguments")
        names = sorted(answer["names"])
        if cache is not None:
            cache.write_text(json.dumps(names))
        return frozenset(names)


def closest_argument(key: str, names: frozenset[str]) -> str | None:
    """The known name a mistyped key most likely meant (lerning_rate → learning_rate), if any is close."""
    matches = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    return matches[0] if matches else None
