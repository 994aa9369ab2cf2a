"""Deployments: serve a run's LoRA adapter on an inference server, one server per base model.

A deployment goes pending → starting → ready | failed → stopped, and so does its server. The app
is the only writer: every change is a conditional UPDATE (status guarded), so a re-sent worker
report or a double click changes nothing twice. The scheduler dispatches a pending server to a
worker with a free serving slot that holds the base model; that worker fetches the adapters from
the artifact store, starts and supervises the server (workers/serving.py) on an address the
panel can reach, behind a per-server secret only the gateway sends, and reports over
/internal/v1. Adapter loads and unloads go to the worker that runs the server.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import struct
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import true, update
from sqlmodel import Session, col, select

from app.errors import Conflict, DomainError, NotFound
from app.models.base import utcnow
from app.models.deployment import (
    ACTIVE_STATUSES,
    SERVED_AS_LORA,
    SERVED_AS_MERGED,
    SERVED_AS_MODEL,
    Deployment,
    DeploymentCreate,
    DeploymentStatus,
    InferenceServer,
    ServeBackend,
)
from app.models.artifact import RunArtifact
from app.models.export import ModelExport
from app.models.job import JobStatus
from app.models.model_entry import ModelEntry
from app.models.run import Run, RunStatus
from app.services import artifacts as artifact_service
from app.services import exports as export_service
from app.services import webhooks
from app.services.broker import kick_scheduler, send_to_worker
from app.services.evaluations import promotion_problem, run_training_args
from app.services.jobs import HOLDING as JOB_HOLDING
from app.settings import get_settings
from app.wire import (
    ADAPTER_ARTIFACT,
    LOAD_ADAPTER_TASK,
    SERVE_START_TASK,
    SERVE_STOP_TASK,
    UNLOAD_ADAPTER_TASK,
    AdapterLoadTask,
    AdapterReport,
    AdapterSpec,
    AdapterUnloadTask,
    ArtifactManifest,
    ServerClaim,
    ServerReply,
    ServerReport,
    ServerSpec,
    ServerStopTask,
    ServeStartTask,
)

log = logging.getLogger(__name__)
S = DeploymentStatus

# LoRA target modules vLLM serves for the decoder architectures LLaMA-Factory trains (attention
# and MLP projections, including the packed names of some models).
VLLM_LORA_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj",
    "c_fc", "w1", "w2", "w3", "wqkv", "wo",
})
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$")
SERVER_LOG_TAIL_CHARS = 8000


class DeploymentError(DomainError):
    """A refused deploy, undeploy or serve (a 400 unless a kind below)."""


class DeploymentNotFound(DeploymentError, NotFound):
    pass


class DeploymentConflict(DeploymentError, Conflict):
    pass


# ------------------------------------------------------------------ adapter preflight


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: list[str]
    base_model: str | None
    # Why vLLM cannot serve it as a LoRA, so that it is merged into its base and served alone.
    merge_reason: str | None = None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor index of a .safetensors file (8-byte little-endian length, then JSON)."""
    with path.open("rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise DeploymentError(f"{path.name} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > 100 * 1024 * 1024:
            raise DeploymentError(f"{path.name} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            raise DeploymentError(f"{path.name} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header


def _lora_module(tensor_name: str) -> str | None:
    """`…layers.0.self_attn.q_proj.lora_A.weight` → "q_proj"; None for a tensor that is not LoRA."""
    parts = tensor_name.split(".")
    for index, part in enumerate(parts):
        if part.startswith("lora_") and index > 0:
            return parts[index - 1]
    return None


def _same_model(adapter_base: str, served_base: str) -> bool:
    if adapter_base == served_base:
        return True
    adapter_path, served_path = Path(adapter_base).expanduser(), Path(served_base).expanduser()
    if adapter_path.exists() and served_path.exists():
        return adapter_path.resolve() == served_path.resolve()
    return False


def _base_vocab_size(base_model_path: str) -> int | None:
    try:
        config = json.loads((Path(base_model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _merge_reason(config: dict[str, Any], tensors: dict[str, Any], base_model_path: str) -> str | None:
    """Why vLLM cannot serve this adapter as a LoRA (it can once merged into its base), or None."""
    if config.get("use_dora"):
        return "the adapter is a DoRA (use_dora), which vLLM does not serve as a LoRA"
    full = sorted(name for name in tensors if _lora_module(name) is None)
    vocab = _base_vocab_size(base_model_path)
    for name in full:
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")) and vocab is not None:
            rows = int((tensors[name].get("shape") or [0])[0])
            if rows != vocab:
                return (f"the adapter resizes the vocabulary ({name.split('.')[-2]} has {rows} rows, the base "
                        f"model {vocab})")
    if config.get("modules_to_save"):
        return (f"the adapter saves whole modules ({', '.join(config['modules_to_save'])}): vLLM serves no "
                "modules_to_save")
    if full:
        return f"the adapter carries full weights ({full[0]}…), which vLLM does not serve with a LoRA"
    return None


def preflight_adapter(
    adapter_dir: Path, base_model_path: str, *, backend: ServeBackend, max_lora_rank: int
) -> AdapterInfo:
    """Refuse, with a clear message, an adapter the server would reject or serve wrongly; say in
    `merge_reason` when vLLM can serve it only merged into its base model."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise DeploymentError(f"{adapter_dir} holds no adapter_config.json: it is not a LoRA adapter")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DeploymentError(f"adapter_config.json is not valid JSON: {error}") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise DeploymentError(f"only LoRA adapters can be served, not {config.get('peft_type')}")
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    base_model = config.get("base_model_name_or_path")
    if base_model and not _same_model(str(base_model), base_model_path):
        raise DeploymentError(
            f"the adapter was trained on {base_model}, but the server would serve {base_model_path}"
        )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise DeploymentError(f"{adapter_dir} holds no adapter_model.safetensors")
    tensors = read_safetensors_header(weights)
    modules = sorted({m for m in map(_lora_module, tensors) if m})
    info = AdapterInfo(rank=rank, target_modules=modules, base_model=base_model)
    if backend != ServeBackend.vllm:
        return info  # LLaMA-Factory's API loads anything peft loads
    merge_reason = _merge_reason(config, tensors, base_model_path)
    if merge_reason:  # merged, its rank and modules no longer matter to vLLM
        return replace(info, merge_reason=merge_reason)
    if rank > max_lora_rank:
        raise DeploymentError(
            f"the adapter's LoRA rank is {rank}, above the server's limit of {max_lora_rank} "
            "(raise TUNEBOARD_SERVE_MAX_LORA_RANK, or serve it with the llamafactory backend)",
            field="run_id",
        )
    unsupported = [m for m in modules if m not in VLLM_LORA_MODULES]
    if unsupported:
        raise DeploymentError(
            f"vLLM serves no LoRA on {', '.join(unsupported)}; use the llamafactory backend"
        )
    return info


# -------------------------------------------------------------------- reading a run


def adapter_manifest_for(session: Session, run: Run, checkpoint: str | None) -> ArtifactManifest:
    """The stored adapter of a finished run: its final adapter (succeeded runs only) or one of its
    checkpoints in the artifact store."""
    status = RunStatus(run.status)
    if status.is_active():
        raise DeploymentConflict(
            f"run {run.id} is {status.value}: deploy it once it has succeeded", field="run_id"
        )
    stored = {a.name for a in artifact_service.list_artifacts(session, run.id)}
    if checkpoint is None:
        if status != RunStatus.succeeded or ADAPTER_ARTIFACT not in stored:
            raise DeploymentConflict(
                f"run {run.id} {status.value} without a stored final adapter; pick one of its checkpoints "
                "instead", field="run_id",
            )
        return artifact_service.get_manifest(session, run.id, ADAPTER_ARTIFACT)
    if checkpoint not in stored:
        known = ", ".join(sorted(name for name in stored if name != ADAPTER_ARTIFACT)) or "none"
        raise DeploymentError(
            f"run {run.id} has no stored checkpoint {checkpoint!r} (stored: {known})", field="checkpoint"
        )
    return artifact_service.get_manifest(session, run.id, checkpoint)


def _panel_copy(manifest: ArtifactManifest) -> Path:
    """The adapter on the panel's own disk (a cache keyed by content), for the preflight."""
    folder = get_settings().path("cache", "adapters") / manifest.digest
    if not folder.is_dir():
        try:
            artifact_service.materialize(manifest, folder)
        except artifact_service.ArtifactError as error:
            raise DeploymentConflict(f"the adapter's files are not in the artifact store: {error}") from None
    return folder


def _default_name(run: Run, checkpoint: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run.name).strip("-.") or "run"
    return f"{slug}-{run.id}" + (f"-{checkpoint}" if checkpoint else "")


def _base_name(session: Session, base_model_path: str) -> str:
    entry = session.exec(select(ModelEntry).where(ModelEntry.path == base_model_path)).first()
    return entry.name if entry else Path(base_model_path).name


# ------------------------------------------------------------------------- queries


def get_deployment(session: Session, deployment_id: int) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise DeploymentNotFound(f"deployment {deployment_id} does not exist")
    return deployment


def list_deployments(session: Session, *, include_stopped: bool = True) -> list[Deployment]:
    expire_silent_servers(session)
    statement = select(Deployment).order_by(col(Deployment.id).desc())
    if not include_stopped:
        statement = statement.where(col(Deployment.status).in_(ACTIVE_STATUSES))
    return list(session.exec(statement))


def servers_by_id(session: Session, deployments: list[Deployment]) -> dict[int, InferenceServer]:
    ids = {d.server_id for d in deployments if d.server_id is not None}
    if not ids:
        return {}
    return {s.id: s for s in session.exec(select(InferenceServer).where(col(InferenceServer.id).in_(ids)))}


def deployable_runs(session: Session) -> list[Run]:
    """Finished runs with something stored to deploy: a final adapter or a checkpoint."""
    stored: dict[int, set[str]] = {}
    for run_id, name in session.exec(select(RunArtifact.run_id, RunArtifact.name)).all():
        stored.setdefault(run_id, set()).add(name)
    runs = session.exec(
        select(Run).where(col(Run.status).in_([RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled]),
                          col(Run.id).in_(stored))
        .order_by(col(Run.id).desc())
    )
    return [run for run in runs if run.status == RunStatus.succeeded or stored[run.id] - {ADAPTER_ARTIFACT}]


def _active_deployment_named(session: Session, name: str) -> Deployment | None:
    return session.exec(
        select(Deployment).where(Deployment.name == name, col(Deployment.status).in_(ACTIVE_STATUSES))
    ).first()


def _active_server_for(session: Session, base_model_path: str) -> InferenceServer | None:
    return session.exec(
        select(InferenceServer).where(
            InferenceServer.base_model_path == base_model_path,
            InferenceServer.backend == ServeBackend.vllm,
            col(InferenceServer.status).in_(ACTIVE_STATUSES),
            col(InferenceServer.stop_requested).is_(False),
            col(InferenceServer.serves_model_alone).is_(False),
        )
    ).first()


def _active_server_named(session: Session, base_name: str) -> InferenceServer | None:
    return session.exec(
        select(InferenceServer).where(
            InferenceServer.base_name == base_name, col(InferenceServer.status).in_(ACTIVE_STATUSES)
        )
    ).first()


# ------------------------------------------------------------------------ dispatch


def _transition(session: Session, model: type, row_id: int, allowed: tuple[DeploymentStatus, ...], **values: Any) -> bool:
    """One conditional UPDATE: change the row only while its status is one of `allowed`."""
    result = session.execute(
        update(model).where(model.id == row_id, col(model.status).in_(allowed)).values(**values)
    )
    changed = result.rowcount == 1
    if changed and model is Deployment:  # its webhooks, committed with the change
        webhooks.enqueue_deployment_events(session, [row_id], values.get("status"))
    return changed


# ------------------------------------------------------------------ deploy/undeploy


def create_deployment(session: Session, data: DeploymentCreate) -> Deployment:
    settings = get_settings()
    run = session.get(Run, data.run_id)
    if run is None:
        raise DeploymentNotFound(f"run {data.run_id} does not exist", field="run_id")
    checkpoint = data.checkpoint or None
    args = run_training_args(run)
    if args.get("stage") == "rm":
        raise DeploymentConflict(
            f"run {run.id} trained a reward model (stage: rm): it scores answers instead of writing them, so it "
            "cannot be deployed for chat", field="run_id",
        )
    manifest = adapter_manifest_for(session, run, checkpoint)
    problem = promotion_problem(session, run.id, checkpoint)
    if problem and not data.force:
        raise DeploymentConflict(f"{problem}: not deployed (send \"force\": true to deploy it anyway)",
                              field="force")
    base_model_path = str(args.get("model_name_or_path") or "")
    if not base_model_path:
        raise DeploymentConflict(f"run {run.id} names no base model (model_name_or_path)")
    name = (data.name or "").strip() or _default_name(run, checkpoint)
    if not NAME_PATTERN.match(name):
        raise DeploymentError(
            "a deployment name is 1–200 letters, digits or . _ - : @ / and starts with a letter or digit",
            field="name",
        )
    if args.get("finetuning_type") in ("full", "freeze") and data.backend == ServeBackend.vllm:
        return _deploy_whole_model(session, run, checkpoint, manifest, name)
    info = preflight_adapter(
        _panel_copy(manifest), base_model_path, backend=data.backend, max_lora_rank=settings.serve_max_lora_rank
    )
    if info.merge_reason:
        return _deploy_merged(session, run, checkpoint, manifest, name, info.merge_reason)

    server = _active_server_for(session, base_model_path) if data.backend == ServeBackend.vllm else None
    if server is not None and info.rank > server.max_lora_rank:
        raise DeploymentError(
            f"the adapter's LoRA rank is {info.rank}, above the running server's limit of {server.max_lora_rank}"
        )
    replaced = _active_deployment_named(session, name)
    if replaced is not None and (server is None or replaced.server_id != server.id):
        raise DeploymentConflict(
            f"the name {name} is in use by deployment {replaced.id}; undeploy it first or pick another name", field="name",
        )
    named_base = _active_server_named(session, name)
    if named_base is not None:
        raise DeploymentConflict(f"{name} is the name of a served base model; pick another", field="name")

    new_server = server is None
    if server is None:
        base_name = _base_name(session, base_model_path) if data.backend == ServeBackend.vllm else ""
        if base_name and (_active_server_named(session, base_name) or _active_deployment_named(session, base_name)):
            base_name = f"{base_name}-{utcnow():%Y%m%d%H%M%S}"
        server = InferenceServer(
            backend=data.backend, base_model_path=base_model_path, base_name=base_name,
            template=args.get("template"), max_lora_rank=settings.serve_max_lora_rank,
            max_model_len=settings.serve_max_model_len, api_key=secrets.token_urlsafe(32),
        )
        session.add(server)
        session.flush()
    deployment = Deployment(
        name=name, run_id=run.id, checkpoint=checkpoint, server_id=server.id,
        artifact_digest=manifest.digest, lora_name=name, lora_rank=info.rank,
    )
    if replaced is not None:
        # A redeploy under the same name: the server swaps the weights in place (load_inplace).
        replaced.status, replaced.status_reason, replaced.stopped_at = S.stopped, "replaced by a redeploy", utcnow()
        session.add(replaced)
    session.add(deployment)
    session.commit()
    session.refresh(deployment)
    session.refresh(server)
    if new_server:
        kick_scheduler()
    elif server.status == S.ready:
        _dispatch_load(session, deployment, server, replace=replaced is not None)
    # A server still starting picks this adapter up when it reports ready.
    return deployment


def _require_free_name(session: Session, name: str) -> None:
    """A deployment served alone takes a name no live deployment or served model has."""
    if _active_deployment_named(session, name) or _active_server_named(session, name):
        raise DeploymentConflict(f"the name {name} is in use by a deployment or a served model: undeploy it first or "
                              "pick another name", field="name")


def _alone_server(session: Session, model: ModelEntry, name: str) -> InferenceServer:
    """A pending server of a registered model with no adapter; the gateway calls it `name`."""
    settings = get_settings()
    server = InferenceServer(
        base_model_path=model.path, base_name=name, template=model.suggested_template,
        max_lora_rank=settings.serve_max_lora_rank, max_model_len=settings.serve_max_model_len,
        api_key=secrets.token_urlsafe(32), serves_model_alone=True, status=S.pending,
    )
    session.add(server)
    session.flush()
    return server


def _deploy_whole_model(session: Session, run: Run, checkpoint: str | None, manifest: ArtifactManifest,
                        name: str) -> Deployment:
    """A full or freeze fine-tune's output is a whole model: registered as a model and served alone."""
    _require_free_name(session, name)
    files = {entry.path for entry in manifest.files}
    if "config.json" not in files or not any(path.endswith(".safetensors") for path in files):
        raise DeploymentConflict(f"run {run.id}'s {checkpoint or 'output'} holds no whole model (config.json and "
                              "safetensors weights) to serve", field="checkpoint")
    try:
        model = export_service.register_stored_model(session, manifest, f"{run.name}-{run.id}-{checkpoint or 'final'}")
    except DomainError as error:  # the artifact store, the model roots
        raise DeploymentConflict(f"run {run.id}'s model could not be registered: {error.detail}") from None
    server = _alone_server(session, model, name)
    deployment = Deployment(name=name, run_id=run.id, checkpoint=checkpoint, server_id=server.id,
                            artifact_digest=manifest.digest, lora_name=name, served_as=SERVED_AS_MODEL,
                            status_reason="a whole model (full or freeze fine-tuning), served alone")
    session.add(deployment)
    session.commit()
    session.refresh(deployment)
    kick_scheduler()
    return deployment


def _deploy_merged(session: Session, run: Run, checkpoint: str | None, manifest: ArtifactManifest, name: str,
                   reason: str) -> Deployment:
    """An adapter vLLM cannot serve as a LoRA: an export job merges it into its base model (one of
    the same adapter already going or done is reused), then `serve_merged` serves the result alone."""
    _require_free_name(session, name)
    export = session.exec(select(ModelExport).where(
        ModelExport.run_id == run.id, ModelExport.adapter_digest == manifest.digest,
        col(ModelExport.status).in_((*JOB_HOLDING, JobStatus.succeeded)),
    ).order_by(col(ModelExport.id).desc())).first()
    if export is not None and export.status == JobStatus.succeeded and (
            export.model_id is None or session.get(ModelEntry, export.model_id) is None):
        export = None  # its merged model was deleted since
    if export is None:
        export = export_service.create(session, run.id, checkpoint=checkpoint)
    deployment = Deployment(name=name, run_id=run.id, checkpoint=checkpoint, artifact_digest=manifest.digest,
                            lora_name=name, served_as=SERVED_AS_MERGED, export_id=export.id,
                            status_reason=f"merging (export {export.id}): {reason}")
    session.add(deployment)
    session.commit()
    session.refresh(deployment)
    serve_merged(session, export)
    session.refresh(deployment)
    return deployment


def serve_merged(session: Session, export: ModelExport) -> None:
    """The deployments waiting for `export` once it has ended: served from the merged model it
    registered, or failed with the merge's reason."""
    status = JobStatus(export.status)
    if not status.is_finished():
        return
    waiting = session.exec(select(Deployment).where(
        Deployment.export_id == export.id, Deployment.status == S.pending, col(Deployment.server_id).is_(None),
    )).all()
    model = session.get(ModelEntry, export.model_id) if export.model_id else None
    for deployment in waiting:
        if status == JobStatus.succeeded and model is not None:
            server = _alone_server(session, model, deployment.name)
            deployment.server_id = server.id
            deployment.status_reason = deployment.status_reason.replace("merging", "merged", 1)
            session.add(deployment)
            session.commit()
            kick_scheduler()
        else:
            _fail_deployment(session, deployment, f"the merge (export {export.id}) {status.value}: "
                                                  f"{export.status_reason}")


def _adapter_spec(session: Session, deployment: Deployment) -> AdapterSpec:
    """What a worker fetches for `deployment`: the very folder that was deployed (its digest),
    never another one stored under the same name since (a resumed run's checkpoints)."""
    run = session.get(Run, deployment.run_id) if deployment.run_id else None
    if run is None:
        raise DeploymentConflict(f"the run of deployment {deployment.name} was deleted")
    manifest = adapter_manifest_for(session, run, deployment.checkpoint)
    if deployment.artifact_digest and manifest.digest != deployment.artifact_digest:
        raise DeploymentConflict(
            f"run {run.id}'s stored {deployment.checkpoint or ADAPTER_ARTIFACT} is no longer the folder deployed "
            f"as {deployment.name} (it was replaced since): deploy it again",
        )
    return AdapterSpec(deployment_id=deployment.id, lora_name=deployment.lora_name, run_id=run.id, manifest=manifest)


def _fail_deployment(session: Session, deployment: Deployment, reason: str) -> None:
    _transition(session, Deployment, deployment.id, (S.pending, S.starting), status=S.failed,
                status_reason=reason, stopped_at=utcnow())
    session.commit()


def _send(server: InferenceServer, task_name: str, payload: Any) -> None:
    """A task for the worker that runs `server`; a broker that is down is logged (the server's
    heartbeat replies still carry a stop)."""
    try:
        send_to_worker(server.worker_id or "", task_name, payload)
    except Exception:
        log.exception("server %s: could not send %s to %s", server.id, task_name, server.worker_id)


def _dispatch_load(session: Session, deployment: Deployment, server: InferenceServer, *, replace: bool) -> None:
    if _transition(session, Deployment, deployment.id, (S.pending,), status=S.starting):
        session.commit()
        try:
            adapter = _adapter_spec(session, deployment)
        except DeploymentError as error:  # its folder is gone from the store: fail it, not the request
            _fail_deployment(session, deployment, str(error))
            return
        _send(server, LOAD_ADAPTER_TASK, AdapterLoadTask(server_id=server.id, adapter=adapter, replace=replace))


def undeploy(session: Session, deployment_id: int) -> Deployment:
    deployment = get_deployment(session, deployment_id)
    was = DeploymentStatus(deployment.status)
    if was == S.stopped:
        raise DeploymentConflict(f"deployment {deployment.name} is already stopped")
    allowed = (S.pending, S.starting, S.ready, S.failed)
    if not _transition(session, Deployment, deployment.id, allowed, status=S.stopped, stopped_at=utcnow(),
                       status_reason="undeployed"):
        raise DeploymentConflict(f"deployment {deployment.name} is already stopped")
    session.commit()
    session.refresh(deployment)
    server = session.get(InferenceServer, deployment.server_id) if deployment.server_id else None
    if server is None or DeploymentStatus(server.status).is_finished():
        return deployment
    others = session.exec(
        select(Deployment).where(
            Deployment.server_id == server.id, col(Deployment.status).in_(ACTIVE_STATUSES)
        )
    ).all()
    if others:
        if was in (S.starting, S.ready) and server.url and not any(o.lora_name == deployment.lora_name for o in others):
            _send(server, UNLOAD_ADAPTER_TASK, AdapterUnloadTask(
                server_id=server.id, deployment_id=deployment.id, lora_name=deployment.lora_name))
        return deployment
    stop_server(session, server)
    return deployment


def stop_server(session: Session, server: InferenceServer) -> None:
    """Stop a server with no adapter left: at once if no worker has it yet, else by its worker."""
    if _transition(session, InferenceServer, server.id, (S.pending,), status=S.stopped, stopped_at=utcnow(),
                   status_reason="no adapter left"):
        session.commit()
        return
    session.execute(update(InferenceServer).where(InferenceServer.id == server.id).values(stop_requested=True))
    session.commit()
    session.refresh(server)
    if server.worker_id:
        _send(server, SERVE_STOP_TASK, ServerStopTask(server_id=server.id))


# ---------------------------------------------------------------- worker reports


def dispatch_server(session: Session, server: InferenceServer, worker_id: str, gpu_ids: list[int]) -> bool:
    """The scheduler's choice: hand a pending server to `worker_id` and send it the task."""
    dispatch_id = uuid.uuid4().hex
    result = session.execute(
        update(InferenceServer)
        .where(InferenceServer.id == server.id, InferenceServer.status == S.pending,
               col(InferenceServer.dispatch_id).is_(None), col(InferenceServer.stop_requested).is_(False))
        .values(dispatch_id=dispatch_id, dispatched_worker_id=worker_id, dispatched_at=utcnow(), gpu_ids=gpu_ids)
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    session.commit()
    try:
        send_to_worker(worker_id, SERVE_START_TASK,
                       ServeStartTask(server_id=server.id, dispatch_id=dispatch_id, gpu_ids=gpu_ids))
    except Exception as error:
        log.exception("server %s: could not send its task to %s", server.id, worker_id)
        release_dispatch(session, server.id, dispatch_id, f"the broker refused the task: {error}")
        return False
    return True


def release_dispatch(session: Session, server_id: int, dispatch_id: str, reason: str) -> bool:
    """Take back a server dispatch that was never claimed, for the next pass to dispatch again."""
    result = session.execute(
        update(InferenceServer)
        .where(InferenceServer.id == server_id, InferenceServer.status == S.pending,
               InferenceServer.dispatch_id == dispatch_id)
        .values(dispatch_id=None, dispatched_worker_id=None, dispatched_at=None, gpu_ids=[])
    )
    session.commit()
    if result.rowcount == 1:
        log.warning("server %s: dispatch released: %s", server_id, reason)
    return result.rowcount == 1


def claim_server(session: Session, server_id: int, claim: ServerClaim) -> ServerSpec:
    """The worker's claim before it starts a server: pending → starting, once, by the worker it
    was dispatched to."""
    settings = get_settings()
    now = utcnow()
    # An undeploy before any claim stops a pending server outright, so this also refuses those.
    result = session.execute(
        update(InferenceServer)
        .where(InferenceServer.id == server_id, InferenceServer.status == S.pending,
               InferenceServer.dispatch_id == claim.dispatch_id,
               InferenceServer.dispatched_worker_id == claim.worker_id)
        .values(status=S.starting, worker_id=claim.worker_id, worker_instance=claim.instance_id or None,
                claimed_at=now, heartbeat_at=now)
    )
    if result.rowcount != 1:
        session.rollback()
        raise DeploymentConflict(f"server {server_id} is not waiting to start on {claim.worker_id}")
    session.execute(
        update(Deployment)
        .where(Deployment.server_id == server_id, Deployment.status == S.pending)
        .values(status=S.starting)
    )
    session.commit()
    server = session.get(InferenceServer, server_id)
    session.refresh(server)
    specs: list[AdapterSpec] = []
    refused: list[str] = []
    for deployment in session.exec(
        select(Deployment).where(Deployment.server_id == server_id, Deployment.status == S.starting,
                                 Deployment.served_as == SERVED_AS_LORA)
    ).all():
        try:
            specs.append(_adapter_spec(session, deployment))
        except DeploymentError as error:  # the others are served all the same
            _fail_deployment(session, deployment, str(error))
            refused.append(str(error))
    if not specs and not server.serves_model_alone:
        # Nothing left to serve: no process to start (and none would be stopped later).
        _finish_server(session, server, S.failed, "; ".join(refused) or "no adapter to serve")
        raise DeploymentConflict(f"server {server_id} has no adapter left to serve")
    return ServerSpec(
        server_id=server.id,
        backend=server.backend,
        base_model_path=server.base_model_path,
        base_name=server.base_name,
        template=server.template,
        api_key=server.api_key,
        max_lora_rank=server.max_lora_rank,
        max_model_len=server.max_model_len,
        kv_cache_bytes=settings.serve_kv_cache_bytes,
        cpu_threads=settings.serve_cpu_threads,
        gpu_memory_utilization=settings.serve_gpu_memory_utilization,
        gpu_ids=server.gpu_ids,
        ready_timeout_s=settings.serve_ready_timeout_s,
        heartbeat_interval_s=min(settings.heartbeat_interval_s, 2.0),
        adapters=specs,
    )


def report_server(session: Session, server_id: int, report: ServerReport) -> ServerReply:
    """A serving worker's report (also its heartbeat). Replies whether to stop the server."""
    server = session.get(InferenceServer, server_id)
    if server is None:
        raise DeploymentNotFound(f"server {server_id} does not exist")
    now = utcnow()
    common: dict[str, Any] = {"heartbeat_at": now}
    if report.log_tail is not None:
        common["log_tail"] = report.log_tail[-SERVER_LOG_TAIL_CHARS:]
    if report.status == "ready":
        if _transition(session, InferenceServer, server_id, (S.starting,), status=S.ready, ready_at=now,
                       url=report.url, pid=report.pid, **common):
            ready = session.execute(
                update(Deployment)
                .where(Deployment.server_id == server_id, Deployment.status == S.starting,
                       # a model served alone is its deployment (merged or whole); else its adapters
                       col(Deployment.lora_name).in_(report.adapters) if not server.serves_model_alone else true())
                .values(status=S.ready, ready_at=now).returning(Deployment.id)
            ).scalars().all()
            webhooks.enqueue_deployment_events(session, list(ready), S.ready)
            session.commit()
            session.refresh(server)
            # Adapters deployed while the server was starting are loaded into it now.
            for deployment in session.exec(
                select(Deployment).where(Deployment.server_id == server_id,
                                         col(Deployment.status).in_((S.pending, S.starting)))
            ).all():
                deployment.status = S.pending
                session.add(deployment)
                session.commit()
                _dispatch_load(session, deployment, server, replace=True)  # also loads a new name
    elif report.status in ("failed", "stopped"):
        final = S.stopped if report.status == "stopped" and server.stop_requested else S.failed
        _finish_server(session, server, final, report.reason, **common)
    else:
        if DeploymentStatus(server.status).is_finished():
            session.commit()
            raise DeploymentConflict(f"server {server_id} is {server.status}")
        session.execute(update(InferenceServer).where(InferenceServer.id == server_id).values(**common))
    session.commit()
    session.refresh(server)
    return ServerReply(stop=server.stop_requested or DeploymentStatus(server.status).is_finished())


def _finish_server(session: Session, server: InferenceServer, final: DeploymentStatus, reason: str,
                   **values: Any) -> None:
    """The server is gone (stopped or failed), and so is every deployment on it."""
    now = utcnow()
    if _transition(session, InferenceServer, server.id, (S.pending, S.starting, S.ready), status=final,
                   status_reason=reason, stopped_at=now, **values):
        dep_reason = "server stopped" if final == S.stopped else f"server failed: {reason}"
        ended = session.execute(
            update(Deployment)
            .where(Deployment.server_id == server.id, col(Deployment.status).in_(ACTIVE_STATUSES))
            .values(status=final, status_reason=dep_reason, stopped_at=now).returning(Deployment.id)
        ).scalars().all()
        webhooks.enqueue_deployment_events(session, list(ended), final)
        session.commit()
        kick_scheduler()  # its serving slot is free


def fail_restarted_worker_servers(session: Session, worker_id: str, instance_id: str) -> None:
    """A worker came back as a new process: the servers of its previous process died with it."""
    for server in session.exec(
        select(InferenceServer).where(
            InferenceServer.worker_id == worker_id, col(InferenceServer.status).in_((S.starting, S.ready)),
            col(InferenceServer.worker_instance).is_not(None), InferenceServer.worker_instance != instance_id,
        )
    ).all():
        _finish_server(session, server, S.failed, f"worker {worker_id} restarted (the server died with it)")
    for server in session.exec(
        select(InferenceServer).where(InferenceServer.status == S.pending,
                                      InferenceServer.dispatched_worker_id == worker_id)
    ).all():
        release_dispatch(session, server.id, server.dispatch_id or "", f"worker {worker_id} restarted")


def report_adapter(session: Session, deployment_id: int, report: AdapterReport) -> None:
    """A load's outcome. 409 when the deployment was undeployed meanwhile: the worker unloads it."""
    deployment = get_deployment(session, deployment_id)
    if report.status == "ready":
        if _transition(session, Deployment, deployment_id, (S.starting,), status=S.ready, ready_at=utcnow()):
            session.commit()
        elif deployment.status != S.ready:
            raise DeploymentConflict(f"deployment {deployment_id} is {deployment.status}")
    else:
        _transition(session, Deployment, deployment_id, (S.starting,), status=S.failed,
                    status_reason=report.reason or "the server refused the adapter", stopped_at=utcnow())
        session.commit()


def expire_silent_servers(session: Session) -> None:
    """Servers whose worker stopped reporting are failed (the worker died with them)."""
    timeout = get_settings().heartbeat_timeout_s
    cutoff: datetime = utcnow() - timedelta(seconds=timeout)
    silent = session.exec(
        select(InferenceServer).where(
            col(InferenceServer.status).in_((S.starting, S.ready)), col(InferenceServer.heartbeat_at) < cutoff
        )
    ).all()
    for server in silent:
        _finish_server(session, server, S.failed, f"worker {server.worker_id} silent for more than {timeout:.0f} s")


# -------------------------------------------------------------------------- gateway


@dataclass(frozen=True)
class Route:
    """Where the gateway sends a `model`: the server's URL, the model name it knows and the
    secret it requires."""

    url: str
    upstream_model: str
    max_model_len: int
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def gateway_models(session: Session) -> list[tuple[str, datetime]]:
    """(name, created) of everything the gateway answers for: ready adapters and base models."""
    names = [
        (d.name, d.ready_at or d.created_at)
        for d in session.exec(select(Deployment).where(Deployment.status == S.ready).order_by(col(Deployment.id)))
    ]
    listed = {name for name, _created in names}
    names += [  # a model served alone for a deployment (merged, whole) is listed once, as the deployment
        (s.base_name, s.ready_at or s.created_at)
        for s in session.exec(select(InferenceServer).where(InferenceServer.status == S.ready,
                                                            InferenceServer.base_name != ""))
        if s.base_name not in listed
    ]
    return names


def resolve_model(session: Session, name: str) -> Route:
    deployment = _active_deployment_named(session, name)
    if deployment is not None:
        server = session.get(InferenceServer, deployment.server_id)
        if deployment.status != S.ready or server is None or server.status != S.ready or not server.url:
            raise DeploymentConflict(f"the model {name} is {deployment.status}, not ready yet")
        return Route(server.url, deployment.lora_name, server.max_model_len, server.api_key)
    server = _active_server_named(session, name) if name else None
    if server is not None and server.status == S.ready and server.url:
        return Route(server.url, server.base_name, server.max_model_len, server.api_key)
    raise DeploymentNotFound(f"the model {name!r} does not exist: GET /v1/models lists the deployed ones")


def remove_deployment(session: Session, deployment_id: int) -> None:
    """Delete the row of a stopped or failed deployment (from the Deployments page; nothing is
    running any more, so nothing else changes)."""
    deployment = get_deployment(session, deployment_id)
    if not DeploymentStatus(deployment.status).is_finished():
        raise DeploymentConflict(f"deployment {deployment.name} is {deployment.status}: undeploy it first")
    session.delete(deployment)
    session.commit()


# ------------------------------------------------------------------ a model served alone


def serve_model_alone(session: Session, model_id: int, name: str | None = None) -> InferenceServer:
    """Serve a registered model with no adapter (a base model to chat with, or a merged export):
    an inference server of its own whose gateway name is `name`, scheduled like any server (a
    serving slot on a worker that holds the model). Stopped with `stop_model_server`."""
    model = session.get(ModelEntry, model_id)
    if model is None:
        raise DeploymentNotFound(f"model {model_id} not found")
    name = (name or "").strip() or model.name
    if not NAME_PATTERN.match(name):
        raise DeploymentError("a served model's name is 1–200 letters, digits or . _ - : @ / and starts with a "
                              "letter or digit", field="name")
    if _active_server_named(session, name) or _active_deployment_named(session, name):
        raise DeploymentConflict(f"the name {name} is in use by a served model or deployment: pick another",
                              field="name")
    server = _alone_server(session, model, name)
    session.commit()
    session.refresh(server)
    kick_scheduler()
    return server


def model_server(session: Session, server_id: int) -> InferenceServer:
    server = session.get(InferenceServer, server_id)
    if server is None or not server.serves_model_alone:
        raise DeploymentNotFound(f"no served model {server_id}")
    session.refresh(server)
    return server


def model_servers(session: Session) -> dict[str, InferenceServer]:
    """The live server of each model served alone, by model path."""
    servers = session.exec(
        select(InferenceServer).where(col(InferenceServer.serves_model_alone).is_(True),
                                      col(InferenceServer.status).in_(ACTIVE_STATUSES))
        .order_by(col(InferenceServer.id))
    ).all()
    return {server.base_model_path: server for server in servers}


def stop_model_server(session: Session, server_id: int) -> InferenceServer:
    stop_server(session, model_server(session, server_id))
    return model_server(session, server_id)


def model_server_public(server: InferenceServer) -> dict[str, Any]:
    return {"id": server.id, "name": server.base_name, "model_path": server.base_model_path,
            "status": DeploymentStatus(server.status).value, "status_reason": server.status_reason,
            "worker_id": server.worker_id}
