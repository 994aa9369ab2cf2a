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
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlmodel import Field, Session, SQLModel, select

from app.db import get_engine
from app.errors import Invalid, NotFound
from app.models import Dataset, ModelEntry, Run, TrainConfig
from app.security import PANEL_OWNED_KEYS, PathNotAllowed, confine
from app.services import batching
from app.services import llamafactory_params as catalogue
from app.services.datasets import dataset_info_for, templates_or_empty
from app.services.model_registry import ModelError, add_model, model_roots, template_warning
from app.settings import get_settings
from workers import train_env

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
# Bounds of a config. A LLaMA-Factory config is ~50 flat keys (LLaMA-Factory 0.9.5 has 346 arguments):
# these leave room for any real one and stop what only an attack needs. The parameters are one JSON
# column that every page listing configs reads.
MAX_PARAMS = 512
MAX_PARAMS_BYTES = 64 * 1024
MAX_PARAM_NESTING = 8
# An imported YAML: PyYAML is pure Python (~1 MB/s), and its anchors and aliases share nodes that
# expand when the config is stored (a 300-byte "billion laughs" becomes 28 MB).
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_VALUES = 10_000  # nodes that aliases and merge keys repeat
CPU_BF16_NOTICE = "bf16 needs a GPU; the run will use fp32 on CPU (gpus: 0)."


class ConfigError(Invalid):
    """Input that is refused. `errors`: its messages by field (None: about the config as a whole),
    which the JSON answer lists too, as `errors: [{field, message}]`."""

    def __init__(self, detail: str, *, field: str | None = None, status_code: int | None = None) -> None:
        super().__init__(detail, field=field, status_code=status_code)
        self._list({field: detail})

    @classmethod
    def by_field(cls, errors: dict[str | None, str]) -> ConfigError:
        """A refusal of several fields at once (the panel's checks of a whole config)."""
        error = cls("; ".join(f"{k}: {v}" if k else v for k, v in errors.items()))
        error._list(errors)
        return error

    def _list(self, errors: dict[str | None, str]) -> None:
        self.errors = errors
        self.with_extra(errors=[{"field": k, "message": v} for k, v in errors.items()])


class TrainConfigInput(SQLModel):
    """What a user submits (API JSON or the form): the panel checks it before anything is saved."""

    name: str = ""
    description: str = ""
    model_id: int | None = None
    dataset_ids: list[int] = []
    gpus: int = 0
    # Omitted: the well-known LoRA SFT starting config (what the form starts from).
    params: dict[str, Any] = Field(default_factory=catalogue.default_params)
    # The automatic micro-batch (app/services/batching.py): on a GPU the worker picks batch ×
    # accumulation, keeping their product. `step_size` (sequences per optimizer step, all GPUs),
    # when given, sets that product; `previous_step_size` (the form's) prompts a learning-rate hint.
    auto_batch: bool = True
    step_size: int | None = None
    previous_step_size: int | None = None


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
    """Typed params with the panel's keys and any key LLaMA-Factory does not know refused; errors go
    to `result`."""
    if len(params) > MAX_PARAMS:
        result.error(None, f"{len(params)} parameters: LLaMA-Factory has fewer than {MAX_PARAMS} arguments")
        return {}
    known = _argument_names(result)
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
        if known is not None and key not in known:
            closest = catalogue.closest_argument(key, known)
            result.error(key, f"{key} is not a LLaMA-Factory training argument"
                              + (f": did you mean {closest}?" if closest else ""))
            continue
        if _nests_deeper_than(value, MAX_PARAM_NESTING):
            result.error(key, f"{key} nests lists or mappings more than {MAX_PARAM_NESTING} levels deep")
            continue
        if not _is_text(value):
            result.error(key, f"{key} holds an invalid Unicode escape (a lone surrogate such as \\udc00)")
            continue
        try:
            clean[key] = catalogue.coerce(key, value)
        except ValueError as error:
            result.error(key, f"{key} {error}")
    return clean


def _argument_names(result: CheckResult) -> frozenset[str] | None:
    """LLaMA-Factory's argument names, or None (with a warning) when the training env cannot say."""
    try:
        return catalogue.argument_names(get_settings().train_python)
    except train_env.TrainEnvError as error:
        result.warn(None, f"{error}: parameter names were not checked")
        return None


def _nests_deeper_than(value: Any, levels: int) -> bool:
    if not isinstance(value, (list, dict)):
        return False
    items = value.values() if isinstance(value, dict) else value
    return levels == 0 or any(_nests_deeper_than(item, levels - 1) for item in items)


def _is_text(value: Any) -> bool:
    """False for a value holding a lone surrogate (JSON's "\\udc00"): it cannot be stored as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def form_to_input(form: dict[str, Any], advanced: dict[str, Any]) -> TrainConfigInput:
    """The config form's fields (strings; unchecked boxes absent) plus its "advanced" YAML lines."""
    params: dict[str, Any] = {}
    stage, finetuning_type = form.get("stage"), form.get("finetuning_type")
    for param in catalogue.PARAMS:
        # A field of another stage or type is hidden in the form: what it still holds is not sent on.
        if not param.in_form or not param.applies(stage, finetuning_type):
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
    step_raw, previous_raw = str(form.get("step_size") or "").strip(), str(form.get("previous_step_size") or "").strip()
    return TrainConfigInput(
        name=str(form.get("name") or "").strip(),
        description=str(form.get("description") or ""),
        model_id=int(model_raw) if model_raw.isdigit() else None,
        dataset_ids=dataset_ids,
        gpus=int(gpus_raw) if gpus_raw.lstrip("-").isdigit() else -1,
        params=params,
        # The form's automatic micro-batch box (templates/configs/_step_size.html); a form without it keeps it off.
        auto_batch=form.get("auto_batch") is not None,
        # The step field counts only once changed: batch and accumulation edits otherwise stand as typed.
        step_size=(int(step_raw) if step_raw.lstrip("-").isdigit() else -1)
        if step_raw and step_raw != previous_raw else None,
        previous_step_size=int(previous_raw) if previous_raw.isdigit() else None,
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


def _model_for(session: Session, data: TrainConfigInput, result: CheckResult,
               imported_model: str | None) -> ModelEntry | None:
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
        # A path typed here must name an allowed folder; the one an imported YAML named is kept as
        # written (the panel never reads it: a run needs a registered model).
        if _looks_like_path(path) and path != imported_model:
            try:
                # Outside the roots is said first, even for a path that does not exist.
                confine(path, model_roots())
                confine(path, model_roots(), must_exist=True)
            except PathNotAllowed as error:
                result.error("model_id", str(error))
                return None
        suggestion = model_suggestion(session, path)
        offer = f" ({suggestion.name} has the same folder name)" if suggestion else ""
        result.warn("model_id", f"{path} is not a registered model{offer}: choose one before starting a run")
    else:
        result.warn("model_id", "no model chosen yet: choose one before starting a run")
    return None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or ".." in value.split("/") or "\\" in value


def check(session: Session, data: TrainConfigInput, *, for_run: bool = False,
          imported_model: str | None = None) -> tuple[dict[str, Any], CheckResult]:
    """The panel's own checks. Returns the normalized params and the findings. `imported_model`: the
    unresolved model_name_or_path an imported YAML named, accepted as it was written."""
    result = CheckResult()
    if not data.name.strip():
        result.error("name", "give the config a name")
    elif len(data.name) > 100:
        result.error("name", "at most 100 characters")
    model_path = data.params.get("model_name_or_path")
    params = normalize_params({k: v for k, v in data.params.items() if k != "model_name_or_path"}, result)
    batching.apply_step_size(data, params, result)  # the optimizer-step size sets batch × accumulation
    if model_path is not None and data.model_id is None:
        params = {"model_name_or_path": str(model_path), **params}
    model = _model_for(session, data, result, imported_model)
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
    if isinstance(unresolved, str):  # a name registered and chosen since is resolved
        chosen = {dataset.name for dataset in datasets}
        names = [name.strip() for name in unresolved.split(",")]
        unresolved = ",".join(name for name in names if name and name not in chosen)
        if unresolved:
            params["dataset"] = unresolved
        else:
            params.pop("dataset")
    if unresolved:
        (result.error if for_run else result.warn)(
            "dataset_ids", f"{unresolved} {'is' if ',' not in str(unresolved) else 'are'} not registered:"
                           " upload on the Datasets page, then choose registered datasets")
    elif not data.dataset_ids:
        (result.error if for_run else result.warn)("dataset_ids", "choose at least one dataset")
    if data.gpus < 0:
        result.error("gpus", "gpus must be 0 (CPU) or more")
    _check_stage(params, datasets, result, for_run=for_run)

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
    size = len(json.dumps(params, default=str))
    if size > MAX_PARAMS_BYTES:
        largest = max(params, key=lambda key: len(json.dumps(params[key], default=str)))
        result.error(largest, f"the parameters take {size} bytes as JSON, over the limit of {MAX_PARAMS_BYTES}"
                              f" ({largest} is the largest)")
    max_samples = params.get("max_samples")
    if isinstance(max_samples, int) and max_samples > 0:
        for dataset in datasets:
            if dataset.row_count > max_samples:
                result.warn("max_samples", f"{dataset.name} has {dataset.row_count} rows: max_samples {max_samples}"
                                           f" leaves {dataset.row_count - max_samples} of them out")
    return params, result


def _check_stage(params: dict[str, Any], datasets: list[Dataset], result: CheckResult, *, for_run: bool) -> None:
    """The stage decides which datasets fit; parameters of another stage or fine-tuning type are said
    to be ignored; what a panel run cannot do is refused."""
    stage = params.get("stage") or "sft"
    finetuning_type = params.get("finetuning_type") or "lora"
    if stage in catalogue.STAGE_NOT_OFFERED:
        result.error("stage", f"stage {stage} is not offered: {catalogue.STAGE_NOT_OFFERED[stage]}")
        return
    if stage not in catalogue.STAGE_DATASET_KINDS:
        result.error("stage", f"unknown stage {stage!r}: one of {', '.join(catalogue.STAGES)}")
        return
    unfit = [d for d in datasets if d.kind not in catalogue.STAGE_DATASET_KINDS[stage]]
    if unfit:
        result.error("dataset_ids", catalogue.dataset_misfit(stage, unfit[0].name, unfit[0].kind))
    pref_loss = params.get("pref_loss")
    if pref_loss is not None and pref_loss not in catalogue.PREF_LOSSES:
        result.error("pref_loss", f"pref_loss must be one of {', '.join(catalogue.PREF_LOSSES)}")
    for key, value in params.items():
        param = catalogue.BY_NAME.get(key)
        if param is None or value is None or param.applies(stage, finetuning_type):
            continue
        where = (f"stage {'/'.join(param.stages)}" if param.stages and stage not in param.stages
                 else f"finetuning_type {'/'.join(param.types)}")
        result.warn(key, f"{key} applies to {where} only: this {stage} {finetuning_type} config ignores it")
    if params.get("deepspeed") and for_run:
        result.error("deepspeed", "a panel run cannot use DeepSpeed: pip's llamafactory ships no examples/deepspeed"
                                  " configs and the training environment has no deepspeed package. Remove it"
                                  " (the exported YAML keeps it for your own LLaMA-Factory checkout)")


def run_refusal(config: TrainConfig, datasets: list[Dataset], gpus: int) -> str | None:
    """What keeps a run of this config on `gpus` GPUs from starting, checked again at the start (a
    config saved before these checks, or a run asking for fewer GPUs than its config): its stage
    against its datasets' kinds, QLoRA on the CPU. None: nothing."""
    result = CheckResult()
    _check_stage(config.params, datasets, result, for_run=True)
    if gpus == 0 and config.params.get("quantization_bit") is not None:
        result.error("quantization_bit", "QLoRA (bitsandbytes) needs a GPU: this run would train on the CPU")
    return "; ".join(result.errors.values()) or None


# --------------------------------------------------------------------------- create / update


def list_configs(session: Session) -> list[TrainConfig]:
    return list(session.exec(select(TrainConfig).order_by(TrainConfig.id.desc())))


def get_config(session: Session, config_id: int) -> TrainConfig:
    config = session.get(TrainConfig, config_id)
    if config is None:
        raise NotFound(f"config {config_id} not found")
    return config


def to_input(config: TrainConfig) -> TrainConfigInput:
    return TrainConfigInput(name=config.name, description=config.description, model_id=config.model_id,
                            dataset_ids=list(config.dataset_ids), gpus=config.gpus, params=dict(config.params),
                            auto_batch=config.auto_batch)


def create_config(session: Session, data: TrainConfigInput, *, parent: TrainConfig | None = None) -> TrainConfig:
    params, result = check(session, data)
    if result.errors:
        raise ConfigError.by_field(result.errors)
    config = TrainConfig(
        name=data.name.strip(), description=data.description, model_id=data.model_id,
        dataset_ids=list(data.dataset_ids), gpus=data.gpus, params=params, auto_batch=data.auto_batch,
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
    imported_model = config.params.get("model_name_or_path") if config.model_id is None else None
    params, result = check(session, data, imported_model=imported_model)
    if result.errors:
        raise ConfigError.by_field(result.errors)
    config.name, config.description = data.name.strip(), data.description
    config.model_id, config.dataset_ids, config.gpus = data.model_id, list(data.dataset_ids), data.gpus
    config.params, config.auto_batch = params, data.auto_batch
    session.add(config)
    session.commit()
    session.refresh(config)
    return config


def delete_config(session: Session, config: TrainConfig) -> None:
    used = session.exec(select(Run.id).where(Run.config_id == config.id)).first()
    if used is not None:
        raise ConfigError(f"run {used} uses this config: it is kept for the run's record", status_code=409)
    for child in session.exec(select(TrainConfig).where(TrainConfig.parent_id == config.id)):
        child.parent_id = config.parent_id
        session.add(child)
    session.delete(config)
    session.commit()


def use_model(session: Session, config: TrainConfig, model_id: int) -> TrainConfig:
    """Resolve the config's model to a registered one (the offer on its page); see update_config."""
    data = to_input(config)
    data.model_id = model_id
    data.params.pop("model_name_or_path", None)
    return update_config(session, config, data)


def run_blockers(session: Session, config: TrainConfig) -> list[str]:
    """What keeps this config from starting a run, in words for its page (empty: nothing does)."""
    blockers: list[str] = []
    reference = config.params.get("model_name_or_path")
    if config.model_id is None:
        blockers.append(f"Its model {reference} is not a registered model: a run trains a registered model."
                        if reference else "No base model is chosen.")
    elif session.get(ModelEntry, config.model_id) is None:
        blockers.append(f"Its base model (id {config.model_id}) no longer exists.")
    unresolved = config.params.get("dataset")
    if unresolved:
        blockers.append(f"Datasets still to register: {unresolved} (upload them on the Datasets page under these"
                        " names, then choose them).")
    gone = [str(i) for i in config.dataset_ids if session.get(Dataset, i) is None]
    if gone:
        blockers.append(f"Its datasets {', '.join(gone)} no longer exist.")
    if not config.dataset_ids and not unresolved:
        blockers.append("No dataset is chosen.")
    datasets = [dataset for i in config.dataset_ids if (dataset := session.get(Dataset, i)) is not None]
    refusal = run_refusal(config, datasets, config.gpus)
    if refusal:
        blockers.append(refusal[0].upper() + refusal[1:] + ".")
    return blockers


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
               dataset_names_: list[str], gpus: int | None) -> dict[str, Any]:
    """The arguments `llamafactory-cli train` gets. `gpus`: what the run will have (0: CPU), or None
    for a YAML to take away, which keeps the precision the user chose."""
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
    if gpus == 0:
        # bf16/fp16 need a GPU (transformers refuses them on CPU): a CPU run trains in fp32.
        for key in ("bf16", "fp16"):
            if args.get(key):
                args[key] = False
    return {k: v for k, v in args.items() if not (v is None and k in ("model_name_or_path", "dataset"))}


def render_train_yaml(config: TrainConfig, *, output_dir: str, dataset_dir: str, dataset_names: list[str],
                      gpus: int) -> str:
    """The exact YAML a run on `gpus` GPUs trains with (`llamafactory-cli train run.yaml`); `dataset:` = the names."""
    session = Session.object_session(config)
    if session is not None:
        return dump_yaml(train_args(session, config, output_dir=output_dir, dataset_dir=dataset_dir,
                                    dataset_names_=dataset_names, gpus=gpus))
    with Session(get_engine()) as own_session:
        return dump_yaml(train_args(own_session, config, output_dir=output_dir, dataset_dir=dataset_dir,
                                    dataset_names_=dataset_names, gpus=gpus))


def export_output_dir(session: Session, config: TrainConfig) -> str:
    """LLaMA-Factory's convention saves/<model>/<method>/<stage>; a run replaces it with its own folder."""
    model_path = _model_path(session, config) or "model"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_path.rstrip("/").rsplit("/", 1)[-1]).lower() or "model"
    return f"saves/{model}/{config.params.get('finetuning_type', 'lora')}/{config.params.get('stage', 'sft')}"


def export_yaml(session: Session, config: TrainConfig) -> str:
    """A standalone YAML for `llamafactory-cli train` (dataset_dir: LLaMA-Factory's default `data`)."""
    # What the user chose: only a panel run on the CPU drops bf16.
    return dump_yaml(train_args(session, config, output_dir=export_output_dir(session, config), dataset_dir=None,
                                dataset_names_=dataset_names(session, config), gpus=None))


@dataclass
class ImportResult:
    data: TrainConfigInput
    notices: list[str]


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, bounded: its composer recurses once per level, so nesting is refused past
    MAX_PARAM_NESTING while composing; dates stay strings (a JSON column has no date type)."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_PARAM_NESTING + 1:  # + the top-level mapping
                raise _yaml_refusal(self.peek_event().start_mark,
                                    f"values nest more than {MAX_PARAM_NESTING} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# What a "\udc00" escape leaves in a str: not text, cannot be stored as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The JSON-like core schema (and `<<` merge keys); anything else would build other Python objects.
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map",
                                                                  "seq", "merge"))


def _yaml_refusal(mark: yaml.Mark | None, problem: str) -> ConfigError:
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return ConfigError(where + problem, field="yaml")


def _refuse_unplain_nodes(root: yaml.Node) -> None:
    """Walk the composed document as construction would expand it: refuse tags outside the plain
    schema and escaped surrogates, and stop once aliases (and merge keys) have repeated more than
    MAX_YAML_VALUES nodes (the distinct nodes are bounded by MAX_YAML_BYTES). An expansion is
    reported at the line of the top-level key it belongs to."""
    stack: list[tuple[yaml.Node, yaml.Mark | None]] = [(root, None)]
    seen: set[int] = set()
    repeated = 0
    while stack:
        node, top_key = stack.pop()
        if id(node) in seen:
            repeated += 1
            if repeated > MAX_YAML_VALUES:
                raise _yaml_refusal(top_key, f"its anchors and aliases expand to more than {MAX_YAML_VALUES} values"
                                             " (a \"billion laughs\"): write the values out instead")
        else:
            seen.add(id(node))
            if node.tag not in _PLAIN_TAGS:
                shown = node.tag.replace("tag:yaml.org,2002:", "!!")
                raise _yaml_refusal(node.start_mark, f"the tag {shown} is not allowed: a LLaMA-Factory config"
                                                     " holds plain values (YAML tags such as !!python/object build"
                                                     " objects)")
            if isinstance(node, yaml.ScalarNode) and _SURROGATE.search(node.value):  # from a "\\udc00" escape
                raise _yaml_refusal(node.start_mark, "an escape names a UTF-16 surrogate (\\ud800-\\udfff), which is"
                                                     " not text: write the character itself (or \\UXXXXXXXX)")
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                mark = top_key or key.start_mark
                stack += [(key, mark), (value, mark)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, top_key or item.start_mark) for item in node.value]


def _yaml_problem(error: yaml.YAMLError, text: str) -> str:
    """PyYAML's error as one line that starts with where it is."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, a lone surrogate)
        line = text.count("\n", 0, error.position) + 1
        return f"line {line}: the character #x{error.character:04x} is not allowed in YAML (is it a text file?)"
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = " ".join(part for part in (error.context, error.problem) if part)
        if problem == "expected a single document in the stream but found another document":
            problem = "it holds several YAML documents (---): import one config at a time"
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
    return str(error)


def decode_yaml(raw: bytes) -> str:
    """An uploaded YAML file's text: UTF-8 (a byte order mark is dropped); anything else is refused."""
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"the file is {len(raw)} bytes, over the limit of {MAX_YAML_BYTES}", field="yaml",
                          status_code=413)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise ConfigError("the file is UTF-16 or UTF-32 encoded: save it as UTF-8", field="yaml")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"line {line}: invalid UTF-8 at byte {error.start} (byte 0x{raw[error.start]:02X}):"
                          " save the file as UTF-8", field="yaml") from None


def parse_yaml_mapping(text: str) -> dict[str, Any]:
    """A YAML mapping of plain values (bounded in size, nesting and alias expansion); ConfigError with
    the line otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"the YAML is {len(text)} characters, over the limit of {MAX_YAML_BYTES}", field="yaml",
                          status_code=413)
    loader = None
    try:
        loader = _ConfigLoader(text)  # its reader refuses NULs and lone surrogates at once
        root = loader.get_single_node()
        if root is not None:
            _refuse_unplain_nodes(root)
        loaded = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {_yaml_problem(error, text)}", field="yaml") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(loaded, dict):
        kind = "empty" if loaded is None else type(loaded).__name__
        raise ConfigError(f"a LLaMA-Factory config is a mapping of key: value lines, not {kind}", field="yaml")
    return {str(k): v for k, v in loaded.items()}


def import_yaml(session: Session, text: str | bytes, *, name: str = "") -> ImportResult:
    """Any LLaMA-Factory training YAML (text, or an uploaded file's bytes) as a config input: known
    keys fill the form, other LLaMA-Factory arguments are kept; the panel's per-run keys are dropped
    with a notice."""
    loaded = parse_yaml_mapping(decode_yaml(text) if isinstance(text, bytes) else text)
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
            model_id = _registered_model_id(session, str(value))
            if model_id is None:
                params["model_name_or_path"] = str(value)  # resolved once the import is accepted
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
                notices.append(f"datasets {', '.join(unresolved)} are not registered: upload them on the Datasets"
                               " page under these names and choose them before starting a run")
        else:
            params[key] = value
    data = TrainConfigInput(name=name.strip() or "imported config", model_id=model_id, dataset_ids=dataset_ids,
                            gpus=1 if params.get("bf16") or params.get("fp16") else 0, params=params)
    return ImportResult(data=data, notices=notices)


def _registered_model_id(session: Session, value: str) -> int | None:
    for entry in session.exec(select(ModelEntry)):
        if value in (entry.path, entry.name) or entry.path.endswith("/" + value.strip("/")):
            return entry.id
    return None


def _resolve_model_reference(session: Session, reference: str, notices: list[str]) -> int | None:
    """Once an import is accepted: a model folder inside the model roots that the YAML named is
    registered. Anything else (a hub id, a relative or foreign path) stays unresolved, as written,
    with the registered model of the same folder name offered."""
    why = "not a registered local model"
    if _looks_like_path(reference):
        try:
            confine(reference, model_roots())
            folder = confine(reference, model_roots(), must_exist=True)
        except PathNotAllowed as error:
            why = str(error)
        else:
            try:
                return add_model(session, str(folder)).id
            except ModelError as error:
                why = str(error)
    suggestion = model_suggestion(session, reference)
    offer = f"the registered model {suggestion.name} has the same folder name: use it" if suggestion else \
        "choose a registered model, or register its folder on the Models page"
    notices.append(f"model {reference} is kept unresolved ({why}): {offer} before starting a run")
    return None


def model_suggestion(session: Session, reference: str) -> ModelEntry | None:
    """The registered model whose folder (or name) is the last part of a model reference:
    ../model_hub/Qwen2.5-7B-Instruct or Qwen/Qwen2.5-7B-Instruct → …/Qwen2.5-7B-Instruct."""
    wanted = re.split(r"[\\/]", reference.strip().rstrip("/\\"))[-1].casefold()
    if not wanted:
        return None
    for entry in session.exec(select(ModelEntry).order_by(ModelEntry.id)):
        if wanted in (Path(entry.path).name.casefold(), entry.name.casefold()):
            return entry
    return None


def import_config(session: Session, text: str | bytes, *, name: str = "") -> tuple[TrainConfig, list[str]]:
    """Import a YAML as a new config; a refused one stores nothing (not even its model folder)."""
    imported = import_yaml(session, text, name=name)
    data = imported.data
    reference = data.params.get("model_name_or_path")
    params, result = check(session, data, imported_model=reference)
    if result.errors:
        raise ConfigError.by_field(result.errors)
    if reference is not None:
        data.model_id = _resolve_model_reference(session, reference, imported.notices)
        if data.model_id is not None:
            del data.params["model_name_or_path"]
            params, result = check(session, data)
            if result.errors:
                raise ConfigError.by_field(result.errors)
    config = TrainConfig(name=data.name, model_id=data.model_id, dataset_ids=data.dataset_ids, gpus=data.gpus,
                         params=params)
    session.add(config)
    session.commit()
    session.refresh(config)
    return config, imported.notices


# ------------------------------------------------------------------------------- estimates


def _mean_tokens(dataset: Dataset, model_id: int | None, template: str | None) -> tuple[float | None, bool]:
    """Mean tokens per row and whether it is measured (token stats) rather than chars/4. Any
    measurement beats chars/4 (5.8× off on CJK-heavy text): this model and template's first,
    then this model's with another template, then another model's."""
    stats = (dataset.report or {}).get("token_stats") or {}
    same_model = [key for key in stats if key.startswith(f"{model_id}:")]
    for key in dict.fromkeys([f"{model_id}:{template}", *same_model, *stats]):
        pairs = [pair for pair in (stats.get(key) or {}).get("lengths") or [] if pair]
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
    found = {
        "rows": rows, "samples_used": used, "dropped_by_max_samples": rows - used,
        "eval_samples": held_out, "train_samples": train_rows,
        "effective_batch": batch * accumulation * world,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": math.ceil(steps_per_epoch * epochs) if epochs and epochs > 0 else 0,
        "tokens_per_epoch": int(tokens),
        "tokens_measured": measured,
        "packing": bool(params.get("packing") or params.get("neat_packing")),
    }
    # Peak GPU memory, the micro-batch and the time per epoch on the GPU type a run would land on.
    found["speed"] = batching.speed_estimate(
        session, model_id=data.model_id, dataset_ids=list(data.dataset_ids), params=params, gpus=world if data.gpus else 0,
        auto_batch=data.auto_batch, base=found, previous_step=data.previous_step_size)
    return found


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
                      dataset_names_=[d.name for d in datasets if d is not None], gpus=config.gpus)
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
            answer = train_env.run_script("validate_args.py", {"args": full}, python=train_python, cwd=Path(workdir),
                                          timeout_s=VALIDATE_TIMEOUT_S, what="LLaMA-Factory's checks")
        except train_env.TrainEnvMissing:
            return {"ran": False, "errors": [], "warnings": [f"the training environment is missing ({train_python}):"
                                                            " LLaMA-Factory's checks were skipped"]}
        except train_env.TrainEnvError as error:
            return {"ran": False, "errors": [{"field": None, "message": str(error)}]}
    answer["ran"] = True
    return answer
