"""The LLaMA-Factory training arguments the panel knows: section, type, default, help and choices.

Sections and their order follow LLaMA-Factory's examples/train_lora/*.yaml (### model, ### method,
### dataset, ### output, ### train, ### eval). Any other argument is kept as an "advanced" key and
checked by LLaMA-Factory's own parser (workers/envscripts/validate_args.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    Param("enable_liger_kernel", "model", bool, None, "Liger's fused Triton kernels (GPU): less memory, faster."
          " GPU default: on (the LM head's logits are never materialised: 5.8 instead of 15 GiB on Qwen2.5-0.5B).",
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
          "Pack several short examples into one sequence of cutoff_len: much faster on short data. GPU default: on"
          " (with gradient checkpointing off and Liger: 3.1× the usual config's real tokens/s on Qwen2.5-7B at"
          " batch 4 × 3, 9× on 0.5B at 12 × 1, same loss at equal tokens; measured on an H100, docs/benchmarks.md).", nullable=True),
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
    # ### train
    Param("per_device_train_batch_size", "train", int, 4,
          "Examples per GPU per forward pass. GPU default 4 × accumulation 3 = 12 packed sequences per step (about"
          " the usual 32 unpacked ones): fits a 7B model on an 80 GB card without gradient checkpointing; on"
          " models under ~2B use 12 × 1 to fill the card (2.7× faster than 4 × 3 on Qwen2.5-0.5B)."),
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


def section_of(name: str) -> str | None:
    param = BY_NAME.get(name)
    return param.section if param else None


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
