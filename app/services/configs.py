"""Training configs: checks, estimates, versioning, and LLaMA-Factory YAML both ways.

`TrainConfig.params` holds LLaMA-Factory arguments as they are exported, minus what the panel
derives (`model_name_or_path` from `model_id`, `dataset` from `dataset_ids`) or owns per run
(`output_dir`, `dataset_dir`). A key whose value is None is exported as `null`; an absent key is
unset (LLaMA-Factory's default applies).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Field, Session, SQLModel, select

from app.db import get_engine
from app.models import Dataset, ModelEntry, Run, TrainConfig
from app.security import PANEL_OWNED_KEYS, PathNotAllowed, confine
from app.services import llamafactory_params as catalogue
from app.services.datasets import dataset_info_for, templates_or_empty
from app.services.model_registry import model_roots, template_warning
from app.settings import PROJECT_ROOT, get_settings

VALIDATE_SCRIPT = PROJECT_ROOT / "workers" / "envscripts" / "validate_args.py"
VALIDATE_TIMEOUT_S = 120
# LLaMA-Factory's bundled DeepSpeed configs: the only `deepspeed` values a user may choose.
DEEPSPEED_CONFIG = re.compile(r"^(examples/deepspeed/)?ds_z[023](_offload)?_config\.json$")
# Keys a user may set although the panel owns their kind, when the value is harmless.
HARMLESS_VALUES: dict[str, Any] = {
    "resume_from_checkpoint": lambda v: v is None,
    "overwrite_output_dir": lambda v: isinstance(v, bool),
    "trust_remote_code": lambda v: v is None or v is False,
    "deepspeed": lambda v: v is None or (isinstance(v, str) and bool(DEEPSPEED_CONFIG.match(v))),
}
# Effective batches past this are almost always a typo (e.g. accumulation 800 instead of 8).
MAX_EFFECTIVE_BATCH = 4096
CPU_BF16_NOTICE = "bf16 needs a GPU; the run will use fp32 on CPU (gpus: 0)."


class ConfigError(ValueError):
    """Input that is refused: messages by field (None: about the config as a whole)."""

    def __init__(self, errors: dict[str | None, str], status_code: int = 422) -> None:
        super().__init__("; ".join(f"{k}: {v}" if k else v for k, v in errors.items()))
        self.errors = errors
        self.status_code = status_code


class TrainConfigInput(SQLModel):
    """What a user submits (API JSON or the form): the panel checks it before anything is saved."""

    name: str = ""
    description: str = ""
    model_id: int | None = None
    dataset_ids: list[int] = []
    gpus: int = 0
    # Omitted: the well-known LoRA SFT starting config (what the form starts from).
    params: dict[str, Any] = Field(default_factory=catalogue.default_params)


@dataclass
class CheckResult:
    errors: dict[str | None, str] = field(default_factory=dict)
    warnings: dict[str | None, list[str]] = field(default_factory=dict)

    def error(self, key: str | None, message: str) -> None:
        self.errors.setdefault(key, message)

    def warn(self, key: str | None, message: str) -> None:
        self.warnings.setdefault(key, []).append(message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "errors": [{"field": k, "message": v} for k, v in self.errors.items()],
            "warnings": [{"field": k, "message": m} for k, ms in self.warnings.items() for m in ms],
        }


# ------------------------------------------------------------------------------------ params


def normalize_params(params: dict[str, Any], result: CheckResult) -> dict[str, Any]:
    """Typed params with the panel's keys refused; errors go to `result`."""
    clean: dict[str, Any] = {}
    for raw_key, value in params.items():
        key = str(raw_key).strip()
        if not key:
            continue
        if key in catalogue.PANEL_OWNED:
            result.error(key, f"{key} is set by the panel for each run, not by the config")
            continue
        if key in PANEL_OWNED_KEYS and key != "model_name_or_path":
            check = HARMLESS_VALUES.get(key)
            if check is None or not check(value):
                what = "a bundled DeepSpeed config (ds_z0/ds_z2/ds_z3[_offload]_config.json)" if key == "deepspeed" \
                    else "set by the panel"
                result.error(key, f"{key} may not be set to {value!r} here: {what}")
                continue
        try:
            clean[key] = catalogue.coerce(key, value)
        except ValueError as error:
            result.error(key, f"{key} {error}")
    return clean


def form_to_input(form: dict[str, Any], advanced: dict[str, Any]) -> TrainConfigInput:
    """The config form's fields (strings; unchecked boxes absent) plus its "advanced" YAML lines."""
    params: dict[str, Any] = {}
    for param in catalogue.PARAMS:
        if not param.in_form:
            continue
        raw = form.get(param.name)
        if param.type is bool:
            if raw is not None:
                params[param.name] = True
            elif not param.nullable:
                params[param.name] = False
            continue
        if raw is None or str(raw).strip() == "":
            continue  # unset
        # A list (report_to: [wandb, tensorboard]) is shown and sent back in YAML's flow style.
        params[param.name] = _flow_list(str(raw)) if str(raw).lstrip().startswith("[") else raw
    # LLaMA-Factory's flag is the negation: gradient checkpointing is on unless disabled.
    if form.get("gradient_checkpointing") is None:
        params["disable_gradient_checkpointing"] = True
    # Arguments the form has no field for keep their defaults (do_train: true) unless an advanced
    # line says otherwise: clearing the advanced box must not turn a training run into an eval.
    hidden_defaults = {p.name: p.default for p in catalogue.PARAMS if not p.in_form and p.default is not None}
    for key, value in {**hidden_defaults, **advanced}.items():
        if key in params:
            continue  # the form's own field wins over a duplicate advanced line
        params[key] = value
    dataset_ids = [int(v) for v in form.get("dataset_ids", []) if str(v).strip().isdigit()]
    model_raw = str(form.get("model_id") or "").strip()
    gpus_raw = str(form.get("gpus") or "0").strip()
    return TrainConfigInput(
        name=str(form.get("name") or "").strip(),
        description=str(form.get("description") or ""),
        model_id=int(model_raw) if model_raw.isdigit() else None,
        dataset_ids=dataset_ids,
        gpus=int(gpus_raw) if gpus_raw.lstrip("-").isdigit() else -1,
        params=params,
    )


def _flow_list(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # LLaMA-Factory's parser will say what is wrong with it


# ------------------------------------------------------------------------------------ checks


def _positive(params: dict[str, Any], key: str, result: CheckResult) -> None:
    value = params.get(key)
    if key in params and (not isinstance(value, (int, float)) or value <= 0):
        result.error(key, f"{key} must be greater than 0")


def _model_for(session: Session, data: TrainConfigInput, result: CheckResult) -> ModelEntry | None:
    if data.model_id is not None:
        model = session.get(ModelEntry, data.model_id)
        if model is None:
            result.error("model_id", f"model {data.model_id} does not exist: register it on the Models page")
            return None
        if not Path(model.path).is_dir():
            result.error("model_id", f"the folder of {model.name} ({model.path}) is missing")
        return model
    path = data.params.get("model_name_or_path")
    if isinstance(path, str) and path:
        if _looks_like_path(path):
            try:
                # Outside the roots is said first, even for a path that does not exist.
                confine(path, model_roots())
                confine(path, model_roots(), must_exist=True)
            except PathNotAllowed as error:
                result.error("model_id", str(error))
                return None
        result.warn("model_id", f"{path} is not a registered model: choose one before starting a run")
    else:
        result.warn("model_id", "no model chosen yet: choose one before starting a run")
    return None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or ".." in value.split("/") or "\\" in value


def check(session: Session, data: TrainConfigInput, *, for_run: bool = False) -> tuple[dict[str, Any], CheckResult]:
    """The panel's own checks. Returns the normalized params and the findings."""
    result = CheckResult()
    if not data.name.strip():
        result.error("name", "give the config a name")
    elif len(data.name) > 100:
        result.error("name", "at most 100 characters")
    model_path = data.params.get("model_name_or_path")
    params = normalize_params({k: v for k, v in data.params.items() if k != "model_name_or_path"}, result)
    if model_path is not None and data.model_id is None:
        params = {"model_name_or_path": str(model_path), **params}
    model = _model_for(session, data, result)
    if for_run and model is None:
        result.error("model_id", "choose a registered model")

    datasets = []
    for dataset_id in data.dataset_ids:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            result.error("dataset_ids", f"dataset {dataset_id} does not exist")
        else:
            datasets.append(dataset)
    unresolved = params.get("dataset")  # names an imported YAML had that are not registered datasets
    if unresolved:
        (result.error if for_run else result.warn)(
            "dataset_ids", f"{unresolved} {'is' if ',' not in str(unresolved) else 'are'} not registered:"
                           " upload on the Datasets page, then choose registered datasets")
    elif not data.dataset_ids:
        (result.error if for_run else result.warn)("dataset_ids", "choose at least one dataset")
    if data.gpus < 0:
        result.error("gpus", "gpus must be 0 (CPU) or more")

    for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "per_device_eval_batch_size", "cutoff_len",
                "logging_steps", "save_steps", "eval_steps", "lora_rank", "max_samples"):
        if params.get(key) is not None:
            _positive(params, key, result)
    val_size = params.get("val_size")
    if isinstance(val_size, (int, float)) and not isinstance(val_size, bool):
        if val_size < 0:
            result.error("val_size", "val_size must be 0 or more")
        elif val_size >= 1:
            result.error("val_size", "val_size must be below 1 (it is the share of rows held out for evaluation)")
    for key in ("warmup_ratio", "lora_dropout"):
        value = params.get(key)
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            result.error(key, f"{key} must be between 0 and 1")
    if params.get("eval_strategy", "no") != "no" and not (val_size or params.get("eval_dataset")):
        result.error("eval_strategy", f"eval_strategy {params['eval_strategy']} needs evaluation data: set val_size"
                                      " above 0 (or an eval_dataset), or set eval_strategy to no")
    if params.get("quantization_bit") not in (None, 4, 8) and "quantization_bit" not in result.errors:
        result.error("quantization_bit", "quantization_bit must be 4 or 8 (or empty for no quantization)")
    batch, accumulation = params.get("per_device_train_batch_size"), params.get("gradient_accumulation_steps")
    if isinstance(batch, int) and isinstance(accumulation, int) and batch > 0 and accumulation > 0:
        effective = batch * accumulation * max(data.gpus, 1)
        if effective > MAX_EFFECTIVE_BATCH:
            result.error("gradient_accumulation_steps", f"effective batch {effective} (batch × accumulation × GPUs)"
                                                        f" is above {MAX_EFFECTIVE_BATCH}: is one of them a typo?")

    template = params.get("template")
    if template is not None:
        known = templates_or_empty()
        if not known:
            result.warn("template", "the training environment is not installed: template names were not checked")
        elif template not in known:
            result.error("template", f"unknown template {template!r}: LLaMA-Factory has {len(known)} templates"
                                     " (see the list in the form)")
        if model is not None:
            warning = template_warning(model.name, template)
            if warning:
                result.warn("template", warning)
            elif model.suggested_template and template != model.suggested_template:
                result.warn("template", f"{model.name} usually uses template {model.suggested_template!r}")
    if data.gpus == 0:
        if params.get("bf16") or params.get("fp16"):
            result.warn("bf16", CPU_BF16_NOTICE)
        if params.get("quantization_bit") is not None:
            result.error("quantization_bit", "QLoRA (bitsandbytes) needs a GPU: set gpus to 1 or more")
    max_samples = params.get("max_samples")
    if isinstance(max_samples, int) and max_samples > 0:
        for dataset in datasets:
            if dataset.row_count > max_samples:
                result.warn("max_samples", f"{dataset.name} has {dataset.row_count} rows: max_samples {max_samples}"
                                           f" leaves {dataset.row_count - max_samples} of them out")
    return params, result


# --------------------------------------------------------------------------- create / update


def list_configs(session: Session) -> list[TrainConfig]:
    return list(session.exec(select(TrainConfig).order_by(TrainConfig.id.desc())))


def get_config(session: Session, config_id: int) -> TrainConfig | None:
    return session.get(TrainConfig, config_id)


def to_input(config: TrainConfig) -> TrainConfigInput:
    return TrainConfigInput(name=config.name, description=config.description, model_id=config.model_id,
                            dataset_ids=list(config.dataset_ids), gpus=config.gpus, params=dict(config.params))


def create_config(session: Session, data: TrainConfigInput, *, parent: TrainConfig | None = None) -> TrainConfig:
    params, result = check(session, data)
    if result.errors:
        raise ConfigError(result.errors)
    config = TrainConfig(
        name=data.name.strip(), description=data.description, model_id=data.model_id,
        dataset_ids=list(data.dataset_ids), gpus=data.gpus, params=params,
        parent_id=parent.id if parent else None, version=parent.version + 1 if parent else 1,
    )
    session.add(config)
    session.commit()
    session.refresh(config)
    return config


def update_config(session: Session, config: TrainConfig, data: TrainConfigInput) -> TrainConfig:
    """Edit in place, or, for a frozen config (a run used it), save a new version."""
    if config.frozen:
        return create_config(session, data, parent=config)
    params, result = check(session, data)
    if result.errors:
        raise ConfigError(result.errors)
    config.name, config.description = data.name.strip(), data.description
    config.model_id, config.dataset_ids, config.gpus = data.model_id, list(data.dataset_ids), data.gpus
    config.params = params
    session.add(config)
    session.commit()
    session.refresh(config)
    return config


def delete_config(session: Session, config: TrainConfig) -> None:
    used = session.exec(select(Run.id).where(Run.config_id == config.id)).first()
    if used is not None:
        raise ConfigError({None: f"run {used} uses this config: it is kept for the run's record"}, 409)
    for child in session.exec(select(TrainConfig).where(TrainConfig.parent_id == config.id)):
        child.parent_id = config.parent_id
        session.add(child)
    session.delete(config)
    session.commit()


def freeze(session: Session, config: TrainConfig) -> TrainConfig:
    """Called by the runs service when a run uses the config: from now on edits make new versions."""
    if not config.frozen:
        config.frozen = True
        session.add(config)
        session.commit()
        session.refresh(config)
    return config


# -------------------------------------------------------------------------------------- YAML


def format_scalar(value: Any) -> str:
    """A YAML scalar as LLaMA-Factory's examples write it (1.0e-4, 3.0, true, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return yaml.safe_dump(value).strip().removesuffix("...").strip()
        if value != 0 and abs(value) < 1e-3:
            mantissa, exponent = f"{value:.15e}".split("e")
            mantissa = mantissa.rstrip("0")
            mantissa += "0" if mantissa.endswith(".") else ""
            return f"{mantissa}e{int(exponent)}"  # PyYAML needs the "." to read it back as a float
        return repr(value)
    if isinstance(value, str):
        dumped = yaml.safe_dump(value, default_style=None, width=10**9).strip()
        return dumped.removesuffix("...").strip()
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()


def ordered_args(args: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """Keys by section in the catalogue's order; unknown keys (sorted) at the end of `train`."""
    sections: dict[str, list[tuple[str, Any]]] = {section: [] for section in catalogue.SECTIONS}
    for param in catalogue.PARAMS:
        if param.name in args:
            sections[param.section].append((param.name, args[param.name]))
    for key in sorted(k for k in args if k not in catalogue.BY_NAME):
        sections["train"].append((key, args[key]))
    return sections


def dump_yaml(args: dict[str, Any]) -> str:
    blocks = []
    for section, items in ordered_args(args).items():
        if items:
            lines = [f"### {section}"] + [f"{key}: {format_scalar(value)}" for key, value in items]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _model_path(session: Session, config: TrainConfig) -> str | None:
    if config.model_id is not None:
        model = session.get(ModelEntry, config.model_id)
        return model.path if model else None
    value = config.params.get("model_name_or_path")
    return str(value) if value is not None else None


def dataset_names(session: Session, config: TrainConfig) -> list[str]:
    names = []
    for dataset_id in config.dataset_ids:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None:
            names.append(dataset.name)
    return names


def train_args(session: Session, config: TrainConfig, *, output_dir: str | None, dataset_dir: str | None,
               dataset_names_: list[str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"model_name_or_path": _model_path(session, config)}
    args.update({k: v for k, v in config.params.items() if k != "model_name_or_path"})
    # Names an imported YAML had that are not registered (a run refuses them; an export keeps them).
    unresolved = config.params.get("dataset")
    names = list(dataset_names_) + ([str(unresolved)] if unresolved else [])
    args["dataset"] = ",".join(names) if names else None
    if dataset_dir is not None:
        args["dataset_dir"] = dataset_dir
    if output_dir is not None:
        args["output_dir"] = output_dir
    if config.gpus == 0:
        # bf16/fp16 need a GPU (transformers refuses them on CPU): a CPU run trains in fp32.
        for key in ("bf16", "fp16"):
            if args.get(key):
                args[key] = False
    args.update(overrides or {})
    return {k: v for k, v in args.items() if not (v is None and k in ("model_name_or_path", "dataset"))}


def render_train_yaml(config: TrainConfig, *, output_dir: str, dataset_dir: str, dataset_names: list[str],
                      overrides: dict[str, Any] | None = None) -> str:
    """The exact YAML a run trains with (`llamafactory-cli train run.yaml`); `dataset:` = the names."""
    session = Session.object_session(config)
    if session is not None:
        return dump_yaml(train_args(session, config, output_dir=output_dir, dataset_dir=dataset_dir,
                                    dataset_names_=dataset_names, overrides=overrides))
    with Session(get_engine()) as own_session:
        return dump_yaml(train_args(own_session, config, output_dir=output_dir, dataset_dir=dataset_dir,
                                    dataset_names_=dataset_names, overrides=overrides))


def export_output_dir(session: Session, config: TrainConfig) -> str:
    """LLaMA-Factory's convention saves/<model>/<method>/<stage>; a run replaces it with its own folder."""
    model_path = _model_path(session, config) or "model"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_path.rstrip("/").rsplit("/", 1)[-1]).lower() or "model"
    return f"saves/{model}/{config.params.get('finetuning_type', 'lora')}/{config.params.get('stage', 'sft')}"


def export_yaml(session: Session, config: TrainConfig) -> str:
    """A standalone YAML for `llamafactory-cli train` (dataset_dir: LLaMA-Factory's default `data`)."""
    args = train_args(session, config, output_dir=export_output_dir(session, config), dataset_dir=None,
                      dataset_names_=dataset_names(session, config))
    if config.gpus == 0:
        # Export what the user chose; only a panel run on CPU drops bf16.
        for key in ("bf16", "fp16"):
            if key in config.params:
                args[key] = config.params[key]
    return dump_yaml(args)


@dataclass
class ImportResult:
    data: TrainConfigInput
    notices: list[str]


def parse_yaml_mapping(text: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        raise ConfigError({"yaml": f"YAML tags such as !!python/object are not allowed ({error.problem})"}) from None
    except yaml.YAMLError as error:
        raise ConfigError({"yaml": f"not valid YAML: {error}"}) from None
    if not isinstance(loaded, dict):
        kind = "empty" if loaded is None else type(loaded).__name__
        raise ConfigError({"yaml": f"a LLaMA-Factory config is a mapping of key: value lines, not {kind}"})
    return {str(k): v for k, v in loaded.items()}


def import_yaml(session: Session, text: str, *, name: str = "") -> ImportResult:
    """Any LLaMA-Factory training YAML as a config input: known keys fill the form, unknown keys are
    kept; the panel's per-run keys are dropped with a notice."""
    loaded = parse_yaml_mapping(text)
    notices: list[str] = []
    params: dict[str, Any] = {}
    model_id: int | None = None
    dataset_ids: list[int] = []
    for key, value in loaded.items():
        if key in ("output_dir", "dataset_dir"):
            notices.append(f"{key}: {value} dropped: the panel sets it for each run")
        elif key == "trust_remote_code":
            if value:
                notices.append("trust_remote_code: true dropped: the panel never runs a model's own Python code")
        elif key == "model_name_or_path":
            model_id = _match_model(session, str(value), params, notices)
        elif key == "dataset":
            unresolved = []
            for dataset_name in [n.strip() for n in str(value or "").split(",") if n.strip()]:
                dataset = session.exec(select(Dataset).where(Dataset.name == dataset_name)).first()
                if dataset is None:
                    unresolved.append(dataset_name)
                elif dataset.id not in dataset_ids:
                    dataset_ids.append(dataset.id)
            if unresolved:
                params["dataset"] = ",".join(unresolved)
                notices.append(f"datasets {', '.join(unresolved)} are not registered: upload them, then edit")
        else:
            params[key] = value
    data = TrainConfigInput(name=name.strip() or "imported config", model_id=model_id, dataset_ids=dataset_ids,
                            gpus=1 if params.get("bf16") or params.get("fp16") else 0, params=params)
    return ImportResult(data=data, notices=notices)


def _match_model(session: Session, value: str, params: dict[str, Any], notices: list[str]) -> int | None:
    for entry in session.exec(select(ModelEntry)):
        if value in (entry.path, entry.name) or entry.path.endswith("/" + value.strip("/")):
            return entry.id
    if _looks_like_path(value):
        try:
            confine(value, model_roots())
            folder = confine(value, model_roots(), must_exist=True)
        except PathNotAllowed as error:
            raise ConfigError({"model_id": str(error)}) from None
        from app.services.model_registry import ModelError, add_model

        try:
            return add_model(session, str(folder)).id
        except ModelError as error:
            raise ConfigError({"model_id": str(error)}) from None
    params["model_name_or_path"] = value
    notices.append(f"model {value} is not a registered local model: register its folder, then choose it")
    return None


def import_config(session: Session, text: str, *, name: str = "") -> tuple[TrainConfig, list[str]]:
    imported = import_yaml(session, text, name=name)
    params, result = check(session, imported.data)
    if result.errors:
        raise ConfigError(result.errors)
    config = TrainConfig(name=imported.data.name, model_id=imported.data.model_id,
                         dataset_ids=imported.data.dataset_ids, gpus=imported.data.gpus, params=params)
    session.add(config)
    session.commit()
    session.refresh(config)
    return config, imported.notices


# ------------------------------------------------------------------------------- estimates


def _mean_tokens(dataset: Dataset, model_id: int | None, template: str | None) -> tuple[float | None, bool]:
    """Mean tokens per row and whether it is measured (token stats) rather than chars/4."""
    stats = (dataset.report or {}).get("token_stats") or {}
    lengths = (stats.get(f"{model_id}:{template}") or {}).get("lengths")
    pairs = [pair for pair in lengths or [] if pair]
    if pairs:
        return sum(p + r for p, r in pairs) / len(pairs), True
    chars = 0.0
    for key in ("prompt_chars", "response_chars"):
        chars += float(((dataset.report or {}).get(key) or {}).get("mean") or 0)
    return (chars / 4 if chars else None), False


def estimate(session: Session, data: TrainConfigInput) -> dict[str, Any]:
    """Samples, steps and tokens a run of this config would see (what the form shows live)."""
    params, _ = check(session, data)
    datasets = [d for d in (session.get(Dataset, i) for i in data.dataset_ids) if d is not None]
    max_samples = params.get("max_samples")
    rows = sum(d.row_count for d in datasets)
    used = sum(min(d.row_count, max_samples) if isinstance(max_samples, int) else d.row_count for d in datasets)
    val_size = params.get("val_size") or 0
    held_out = 0
    if isinstance(val_size, (int, float)) and 0 < val_size < 1:
        held_out = math.ceil(used * val_size)
    train_rows = max(used - held_out, 0)
    batch = params.get("per_device_train_batch_size") or 1
    accumulation = params.get("gradient_accumulation_steps") or 1
    epochs = params.get("num_train_epochs") or 0
    world = max(data.gpus, 1)
    steps_per_epoch = 0
    if train_rows and batch > 0 and accumulation > 0:
        batches = math.ceil(train_rows / (batch * world))
        steps_per_epoch = max(math.ceil(batches / accumulation), 1)
    cutoff = params.get("cutoff_len") or 1024
    tokens = 0.0
    measured = bool(datasets)
    for dataset in datasets:
        mean, is_measured = _mean_tokens(dataset, data.model_id, params.get("template"))
        measured = measured and is_measured
        share = (min(dataset.row_count, max_samples) if isinstance(max_samples, int) else dataset.row_count)
        tokens += min(mean or 0, cutoff) * share * (1 - (val_size if 0 < val_size < 1 else 0))
    return {
        "rows": rows, "samples_used": used, "dropped_by_max_samples": rows - used,
        "eval_samples": held_out, "train_samples": train_rows,
        "effective_batch": batch * accumulation * world,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": math.ceil(steps_per_epoch * epochs) if epochs and epochs > 0 else 0,
        "tokens_per_epoch": int(tokens),
        "tokens_measured": measured,
        "packing": bool(params.get("packing") or params.get("neat_packing")),
    }


# ---------------------------------------------------------------------------------- diff


def flatten(session: Session, config: TrainConfig) -> dict[str, Any]:
    model = session.get(ModelEntry, config.model_id) if config.model_id else None
    flat: dict[str, Any] = {
        "name": config.name,
        "model": model.name if model else config.params.get("model_name_or_path"),
        "datasets": ",".join(dataset_names(session, config)),
        "gpus": config.gpus,
    }
    flat.update({k: v for k, v in config.params.items() if k != "model_name_or_path"})
    return flat


def diff(session: Session, a: TrainConfig, b: TrainConfig) -> list[dict[str, Any]]:
    """Every key whose value differs (absent keys are shown as None, "unset")."""
    left, right = flatten(session, a), flatten(session, b)
    keys = list(dict.fromkeys([*left, *right]))
    return [{"key": k, "a": left.get(k), "b": right.get(k), "only_in": None if k in left and k in right
             else ("a" if k in left else "b")}
            for k in keys if left.get(k) != right.get(k) or (k in left) != (k in right)]


# ---------------------------------------------------------------- LLaMA-Factory's own checks

_VALIDATION_CACHE: dict[str, dict[str, Any]] = {}


def llamafactory_check(session: Session, data: TrainConfigInput) -> dict[str, Any]:
    """`get_train_args` on the config, in the training env, plus the panel's checks. Results of
    LLaMA-Factory are cached by the config's hash for the life of the process."""
    params, result = check(session, data, for_run=True)
    findings = result.as_dict()
    findings["llamafactory"] = None
    if result.errors:
        return findings
    config = TrainConfig(name=data.name, model_id=data.model_id, dataset_ids=data.dataset_ids, gpus=data.gpus,
                         params=params)
    datasets = [session.get(Dataset, i) for i in data.dataset_ids]
    info = dataset_info_for(d for d in datasets if d is not None)
    args = train_args(session, config, output_dir=None, dataset_dir=None,
                      dataset_names_=[d.name for d in datasets if d is not None])
    settings = get_settings()
    key = hashlib.sha256(json.dumps([args, info, settings.train_python], sort_keys=True, default=str).encode()
                         ).hexdigest()
    answer = _VALIDATION_CACHE.get(key)
    if answer is None:
        answer = _run_validation(args, info, settings.train_python)
        if answer.get("ran"):
            _VALIDATION_CACHE[key] = answer
    findings["llamafactory"] = answer
    for error in answer.get("errors", []):
        findings["errors"].append(error)
    findings["ok"] = not findings["errors"]
    return findings


def _run_validation(args: dict[str, Any], info: dict[str, Any], train_python: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tuneboard-validate-") as workdir:
        dataset_dir = Path(workdir) / "data"
        dataset_dir.mkdir()
        (dataset_dir / "dataset_info.json").write_text(json.dumps(info))
        full = {**args, "output_dir": str(Path(workdir) / "output"), "dataset_dir": str(dataset_dir)}
        try:
            completed = subprocess.run(
                [train_python, str(VALIDATE_SCRIPT)], input=json.dumps({"args": full}), capture_output=True,
                text=True, timeout=VALIDATE_TIMEOUT_S, check=False, cwd=workdir,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
            )
        except FileNotFoundError:
            return {"ran": False, "errors": [], "warnings": [f"the training environment is missing ({train_python}):"
                                                            " LLaMA-Factory's checks were skipped"]}
        except subprocess.TimeoutExpired:
            return {"ran": False, "errors": [{"field": None, "message": "LLaMA-Factory's checks took too long"}]}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ran": False, "errors": [{"field": None, "message": f"the validation script failed: {tail}"}]}
    answer = json.loads(lines[-1])
    answer["ran"] = True
    return answer
