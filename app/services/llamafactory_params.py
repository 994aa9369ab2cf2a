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

# The stages a config may train (PPO is not offered: STAGE_NOT_OFFERED) and the dataset kinds each
# one reads (app/models/dataset.py's Dataset.kind).
STAGES = ("sft", "dpo", "kto", "rm", "pt")
STAGE_DATASET_KINDS: dict[str, tuple[str, ...]] = {
    "sft": ("sft",), "dpo": ("ranking",), "rm": ("ranking",), "kto": ("kto",), "pt": ("pretrain",),
}
DATASET_KIND_WORDS = {
    "sft": "an SFT dataset (instruction → response rows)",
    "ranking": "a preference dataset (chosen and rejected responses)",
    "kto": "a KTO dataset (responses tagged desirable or not)",
    "pretrain": "a pre-training dataset (plain text)",
}
STAGE_HELP = {
    "sft": "Supervised fine-tuning: the model learns to give each row's response to its prompt.",
    "dpo": "Direct preference optimisation: from pairs of a chosen and a rejected response, the model learns to"
           " prefer the chosen one. Start from an SFT model; learning rates are lower than SFT's (5e-6 is usual"
           " for full fine-tuning, 5e-5 for LoRA). The run charts the rewards of both and their margin.",
    "kto": "KTO: like DPO, but from single responses tagged desirable or undesirable (no pairs needed). The run"
           " charts the rewards of both kinds and their margin.",
    "rm": "Reward model: learns a score that puts the chosen response above the rejected one. It is not a chat"
          " model; the run charts the share of held-out pairs it ranks right (needs held-out rows: val_size).",
    "pt": "Continued pre-training: next-token prediction on plain text (no template roles), in chunks of the"
          " max tokens per example.",
}
STAGE_NOT_OFFERED = {
    "ppo": "PPO needs a reward model (a finished rm run's adapter) loaded beside the"
           " policy, and the panel cannot hand one to a run yet. Train an rm run, or use dpo or kto, which need"
           " no reward model.",
}


def dataset_misfit(stage: str, dataset_name: str, kind: str) -> str:
    """Why a dataset of `kind` cannot train `stage`, and what would."""
    needs = " or ".join(DATASET_KIND_WORDS[k] for k in STAGE_DATASET_KINDS[stage])
    fitting = [s for s, kinds in STAGE_DATASET_KINDS.items() if kind in kinds]
    return (f"{dataset_name} is {DATASET_KIND_WORDS.get(kind, f'a {kind} dataset')}: stage {stage} trains on {needs}."
            f" Choose such a dataset, or stage {' or '.join(fitting)} for this one")


# LLaMA-Factory 0.9.5's FinetuningArguments.pref_loss.
PREF_LOSSES = ("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")


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
    # The stages and fine-tuning types it applies to (empty: all); the form shows it only there.
    stages: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def applies(self, stage: str | None, finetuning_type: str | None) -> bool:
        return ((not self.stages or (stage or "sft") in self.stages)
                and (not self.types or (finetuning_type or "lora") in self.types))

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
          "QLoRA: load the base model in 4 or 8 bits and train LoRA on top. GPU only (bitsandbytes, which the"
          " training environment must have); a CPU run refuses it. Empty = no quantization.",
          choices=("4", "8"), nullable=True, types=("lora", "oft")),
    Param("flash_attn", "model", str, "auto", "Attention kernel: auto picks the fastest available.",
          choices=("auto", "disabled", "sdpa", "fa2", "fa3")),
    Param("enable_liger_kernel", "model", bool, None, "Liger's fused Triton kernels (GPU only, needs the liger-kernel"
          " package): less memory and faster steps. On by default for GPU runs.",
          nullable=True),
    Param("disable_gradient_checkpointing", "model", bool, None,
          "LLaMA-Factory checkpoints activations unless this is true.", in_form=False, nullable=True),
    # ### method
    Param("stage", "method", str, "sft",
          "What is trained, and so which datasets fit: sft on instruction → response rows, dpo and rm on"
          " preference pairs, kto on responses tagged good or bad, pt on plain text. PPO is not offered (see below).",
          choices=STAGES),
    Param("do_train", "method", bool, True, "Train (false only evaluates or predicts).", in_form=False),
    Param("finetuning_type", "method", str, "lora",
          "lora trains small adapter matrices beside a frozen base (QLoRA: on a quantized base); freeze trains the"
          " last layers of the model itself; full trains every weight (the most memory: a whole model per run).",
          choices=("lora", "freeze", "full", "oft")),
    Param("lora_rank", "method", int, 8, "Rank of the LoRA matrices: capacity of the adapter (8–64 is usual).",
          types=("lora",)),
    Param("lora_alpha", "method", int, None, "LoRA scaling numerator; empty = 2 × rank.", nullable=True,
          types=("lora",)),
    Param("lora_dropout", "method", float, None, "Dropout on the LoRA path (0–0.1 is usual); empty = 0.",
          nullable=True, types=("lora",)),
    Param("lora_target", "method", str, "all",
          "Modules that get adapters: all linear layers, or names like q_proj,v_proj.", types=("lora",)),
    Param("use_dora", "method", bool, None,
          "DoRA: splits each weight into magnitude and direction and adapts both; often closer to full"
          " fine-tuning at the same rank, slower steps.", nullable=True, types=("lora",)),
    Param("use_rslora", "method", bool, None,
          "rsLoRA: scales the adapter by alpha/√rank instead of alpha/rank, which keeps high ranks learning.",
          nullable=True, types=("lora",)),
    Param("pissa_init", "method", bool, None,
          "PiSSA: starts the adapter from the principal singular vectors of each weight (faster convergence)."
          " Not with kto, nor with dpo losses that need a reference model (sigmoid, hinge, ipo, kto_pair).",
          nullable=True, types=("lora",)),
    Param("loraplus_lr_ratio", "method", float, None,
          "LoRA+: the B matrices learn this many times faster than A (16 is the paper's value). Empty = off.",
          nullable=True, types=("lora",)),
    Param("freeze_trainable_layers", "method", int, None,
          "Layers trained: the last N (a negative number: the first N). Empty = LLaMA-Factory's 2.",
          nullable=True, types=("freeze",)),
    Param("freeze_trainable_modules", "method", str, None,
          "Modules trained inside those layers: all, or names like mlp,self_attn. Empty = all.",
          nullable=True, types=("freeze",)),
    Param("freeze_extra_modules", "method", str, None,
          "Modules outside the layers trained too, e.g. embed_tokens,lm_head. Empty = none.",
          nullable=True, types=("freeze",)),
    Param("deepspeed", "method", str, None,
          "A DeepSpeed config bundled with LLaMA-Factory (examples/deepspeed/ds_z{0,2,3}[_offload]_config.json).",
          in_form=False, nullable=True),
    Param("pref_beta", "method", float, None,
          "How far the model may move from the reference: larger keeps it closer (DPO's β; KTO's too)."
          " Empty = 0.1.", nullable=True, stages=("dpo", "kto")),
    Param("pref_loss", "method", str, None,
          "DPO's loss: sigmoid (DPO), hinge, ipo, kto_pair, or orpo and simpo, which need no reference model"
          " (less memory). Empty = sigmoid.", choices=PREF_LOSSES, nullable=True, stages=("dpo",)),
    Param("pref_ftx", "method", float, None,
          "Weight of an SFT loss on the chosen responses added to DPO's (0 = none). Empty = 0.",
          nullable=True, stages=("dpo",)),
    Param("simpo_gamma", "method", float, None, "SimPO's target reward margin (pref_loss simpo). Empty = 0.5.",
          nullable=True, stages=("dpo",)),
    Param("dpo_label_smoothing", "method", float, None,
          "cDPO: the share of pairs assumed mislabelled, 0–0.5 (pref_loss sigmoid only). Empty = 0.",
          nullable=True, stages=("dpo",)),
    Param("kto_chosen_weight", "method", float, None,
          "Weight of the desirable responses' loss (raise it when they are rarer). Empty = 1.",
          nullable=True, stages=("kto",)),
    Param("kto_rejected_weight", "method", float, None,
          "Weight of the undesirable responses' loss. Empty = 1.", nullable=True, stages=("kto",)),
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
    "use_dora": "DoRA", "use_rslora": "rsLoRA", "pissa_init": "PiSSA initialisation", "loraplus_lr_ratio": "LoRA+ ratio",
    "freeze_trainable_layers": "Trainable layers", "freeze_trainable_modules": "Trainable modules",
    "freeze_extra_modules": "Extra trainable modules", "pref_beta": "Preference beta", "pref_loss": "Preference loss",
    "pref_ftx": "SFT loss weight", "simpo_gamma": "SimPO gamma", "dpo_label_smoothing": "Label smoothing (cDPO)",
    "kto_chosen_weight": "Desirable weight", "kto_rejected_weight": "Undesirable weight",
    "eval_strategy": "When to evaluate", "eval_steps": "Evaluate every N steps",
}
BASIC = frozenset({
    "stage", "finetuning_type", "pref_beta", "pref_loss", "freeze_trainable_layers", "lora_rank", "template", "cutoff_len", "max_samples", "logging_steps", "save_steps",
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
