"""Local base models under the allowed model roots: found by a scan or added by path, described from
their files alone (config.json, safetensors headers, tokenizer_config.json). Weights are never loaded."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from app.errors import DomainError, NotFound
from app.models import ModelEntry, TrainConfig
from app.security import PathNotAllowed, confine
from app.services.llamafactory_params import BASE_TEMPLATES
from app.settings import get_settings
from app.wire import model_fingerprint

# A safetensors file starts with an 8-byte little-endian header length, then that much JSON.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_SCAN_DEPTH = 3  # root/model, root/org/model, root/org/family/model

_INSTRUCT_NAME = re.compile(r"(instruct|chat|[-_]it\b|[-_]it[-_]|distill|\bsft\b|\brlhf\b)", re.IGNORECASE)


class ModelError(DomainError):
    """A model that cannot be registered or removed; `field` names the form field at fault."""


@dataclass
class ModelInfo:
    architecture: str
    model_type: str
    param_count: int
    dtype: str
    has_chat_template: bool
    suggested_template: str | None
    fingerprint: str


def model_roots() -> list[Path]:
    return [Path(root) for root in get_settings().model_roots]


def confine_model_path(path: str) -> Path:
    """The resolved model folder, if it is under an allowed root and holds a config.json."""
    try:
        confine(path, model_roots())  # "outside the allowed folders" first, even for a missing path
        folder = confine(path, model_roots(), must_exist=True)
    except PathNotAllowed as error:
        raise ModelError(str(error), field="path") from None
    if not folder.is_dir():
        raise ModelError(f"{path} is not a folder", field="path")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder", field="path")
    return folder


# ----------------------------------------------------------------------------- reading a folder


def safetensors_param_count(file: Path) -> tuple[int, str]:
    """Parameters and the most common dtype of one .safetensors file, from its header alone."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{file.name}: header of {length} bytes is not a safetensors header")
        header = json.loads(handle.read(length))
    total = 0
    by_dtype: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in tensor["shape"]:
            count *= dim
        total += count
        by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + count
    dtype = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else ""
    return total, dtype


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                       "I8": "int8", "U8": "uint8", "F8_E4M3": "float8_e4m3fn"}


def _params_from_config(config: dict[str, Any]) -> int:
    """A decoder-only transformer's size from its shapes, when no safetensors file says it."""
    text = config.get("text_config") or config
    hidden = text.get("hidden_size") or text.get("n_embd") or 0
    layers = text.get("num_hidden_layers") or text.get("n_layer") or 0
    vocab = text.get("vocab_size") or 0
    if not (hidden and layers and vocab):
        return 0
    heads = text.get("num_attention_heads") or 1
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    intermediate = text.get("intermediate_size") or 4 * hidden
    attention = hidden * head_dim * heads * 2 + hidden * head_dim * kv_heads * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


def is_instruct_name(name: str) -> bool:
    """Instruct/Chat models by the naming every publisher uses (…-Instruct, …-Chat, …-it, R1 distills)."""
    return bool(_INSTRUCT_NAME.search(name))


def suggest_template(name: str, config: dict[str, Any]) -> str | None:
    """The LLaMA-Factory template for a model family (the README's Supported Models table)."""
    model_type = str(config.get("model_type", "")).lower()
    lowered = name.lower()
    if "deepseek" in lowered and "r1" in lowered:
        return "deepseekr1"
    if model_type.startswith("qwen3") or "qwen3" in lowered:
        return "qwen3"
    if model_type.startswith("qwen") or "qwen" in lowered or "qwq" in lowered:
        return "qwen"
    if model_type == "llama" or "llama" in lowered:
        if re.search(r"llama-?2", lowered):
            return "llama2"
        if re.search(r"llama-?3", lowered) or config.get("vocab_size") == 128256:
            return "llama3"
        if config.get("vocab_size") == 32000:
            return "llama2"
        return None
    if model_type.startswith("chatglm") or "chatglm3" in lowered:
        return "chatglm3"
    if model_type.startswith("glm4") or "glm-4" in lowered:
        return "glm4"
    if model_type.startswith("gemma3") or "gemma-3" in lowered:
        return "gemma3"
    if model_type.startswith("gemma") or "gemma" in lowered:
        return "gemma"
    if model_type in ("mistral", "mixtral") or "mistral" in lowered or "mixtral" in lowered:
        return "mistral"
    if "phi-4" in lowered or "phi4" in lowered:
        return "phi4"
    if model_type.startswith("phi3") or re.search(r"phi-?3", lowered):
        return "phi"
    if model_type.startswith("deepseek") or "deepseek" in lowered:
        return "deepseek3" if re.search(r"v[23]", lowered) else "deepseek"
    if model_type == "yi" or re.search(r"\byi-", lowered):
        return "yi"
    if model_type.startswith("internlm"):
        return "intern2"
    if model_type == "cohere":
        return "cohere"
    if model_type == "falcon":
        return "falcon"
    return None


def describe(folder: Path) -> ModelInfo:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder.name}/config.json is not readable JSON: {error}", field="path") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder.name}/config.json is not a JSON object", field="path")
    param_count, dtype = 0, ""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            count, file_dtype = safetensors_param_count(file)
        except (OSError, ValueError, KeyError, struct.error) as error:
            raise ModelError(f"{file.name} is not a valid safetensors file: {error}", field="path") from None
        param_count += count
        dtype = dtype or _SAFETENSORS_DTYPES.get(file_dtype, file_dtype.lower())
    if not param_count:
        param_count = _params_from_config(config)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or dtype or "")
    architectures = config.get("architectures") or []
    return ModelInfo(
        architecture=str(architectures[0]) if architectures else "",
        model_type=str(config.get("model_type", "")),
        param_count=param_count,
        dtype=dtype,
        has_chat_template=_has_chat_template(folder),
        suggested_template=suggest_template(folder.name, config),
        fingerprint=model_fingerprint(folder) or "",
    )


def template_warning(model_name: str, template: str | None) -> str | None:
    """LLaMA-Factory's README: base templates (default, alpaca, vicuna) are for base models only."""
    if template in BASE_TEMPLATES and is_instruct_name(model_name):
        return (
            f"{model_name} is an Instruct/Chat model: the base template {template!r} does not match how it was"
            " trained. Use the model's own template (LLaMA-Factory: 'make sure to use the corresponding"
            " template for the instruct/chat models')."
        )
    return None


# ------------------------------------------------------------------------------- the registry


def list_models(session: Session) -> list[ModelEntry]:
    return list(session.exec(select(ModelEntry).order_by(ModelEntry.name)))


def get_model(session: Session, model_id: int) -> ModelEntry:
    entry = session.get(ModelEntry, model_id)
    if entry is None:
        raise NotFound(f"model {model_id} not found")
    return entry


def _apply(entry: ModelEntry, info: ModelInfo) -> None:
    entry.architecture = info.architecture
    entry.model_type = info.model_type
    entry.param_count = info.param_count
    entry.dtype = info.dtype
    entry.has_chat_template = info.has_chat_template
    entry.suggested_template = info.suggested_template
    entry.fingerprint = info.fingerprint


def add_model(session: Session, path: str, name: str | None = None) -> ModelEntry:
    folder = confine_model_path(path)
    existing = session.exec(select(ModelEntry).where(ModelEntry.path == str(folder))).first()
    if existing is not None:
        raise ModelError(f"{folder} is already registered as {existing.name!r}", field="path", status_code=409)
    name = (name or "").strip() or folder.name
    if session.exec(select(ModelEntry).where(ModelEntry.name == name)).first() is not None:
        raise ModelError(f"a model named {name!r} exists already: choose another name", field="name",
                         status_code=409)
    entry = ModelEntry(name=name, path=str(folder))
    _apply(entry, describe(folder))
    session.add(entry)
    session.commit()
    session.refresh(entry)
    return entry


def _candidate_folders(root: Path) -> list[Path]:
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) or (
            (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
        ):
            found.append(folder)
            return
        if depth >= _SCAN_DEPTH:
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def scan(session: Session) -> dict[str, list[str]]:
    """Register every model folder under the roots and refresh what is known of the registered ones."""
    added: list[str] = []
    refreshed: list[str] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root in model_roots():
        resolved_root = root.expanduser().resolve()
        for folder in _candidate_folders(resolved_root):
            try:
                folder = confine_model_path(str(folder))  # a symlink out of the root is refused
            except ModelError as error:
                skipped.append(str(error))
                continue
            seen.add(str(folder))
            entry = session.exec(select(ModelEntry).where(ModelEntry.path == str(folder))).first()
            try:
                info = describe(folder)
            except ModelError as error:
                skipped.append(str(error))
                continue
            if entry is None:
                name = folder.name
                if session.exec(select(ModelEntry).where(ModelEntry.name == name)).first() is not None:
                    name = f"{folder.parent.name}/{folder.name}"
                entry = ModelEntry(name=name, path=str(folder))
                added.append(name)
            else:
                refreshed.append(entry.name)
            _apply(entry, info)
            session.add(entry)
    session.commit()
    return {"added": added, "refreshed": refreshed, "skipped": skipped}


def delete_model(session: Session, entry: ModelEntry) -> None:
    used = session.exec(select(TrainConfig.id).where(TrainConfig.model_id == entry.id)).first()
    if used is not None:
        raise ModelError(f"config {used} uses {entry.name!r}: delete or change it first", status_code=409)
    session.delete(entry)
    session.commit()
