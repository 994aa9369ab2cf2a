"""Deployments: pages (htmx fragments from the same routes), the JSON API under /api/v1, the
gateway keys, and the serving worker's reports (internal_router)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.auth import CurrentUser, OwnerQuery, require_owner
from app.db import SessionDep
from app.errors import NotFound
from app.models.deployment import (
    Deployment,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentPublic,
    InferenceServer,
    InferenceServerPublic,
    ServeBackend,
)
from app.models.gateway_key import GatewayKeyCreate, GatewayKeyCreated, GatewayKeyPublic
from app.services import deployments as service
from app.services import rate_limits, scheduler
from app.services import listings
from app.services.deployments import DeploymentError
from app.services.users import owned_by, owner_id_filter, revoke_token
from app.templating import is_htmx, render, templates
from app.wire import AdapterReport, ServerClaim, ServerReply, ServerReport, ServerSpec

router = APIRouter(tags=["deployments-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["deployments"])
# Changing one needs its owner or an admin (app/services/permissions.py).
OWNED_DEPLOYMENT = require_owner(service.get_deployment, "deployment_id", "deployment")
internal_router = APIRouter(tags=["deployments-internal"])

GATEWAY_KEY = rate_limits.GATEWAY_KEY
templates.env.globals["server_wait_reason"] = scheduler.server_wait_reason


def _detail(session: SessionDep, deployment: Deployment) -> DeploymentDetail:
    server = session.get(InferenceServer, deployment.server_id) if deployment.server_id else None
    return DeploymentDetail(
        **DeploymentPublic.model_validate(deployment).model_dump(),
        server=InferenceServerPublic.model_validate(
            server, update={"wait_reason": scheduler.server_wait_reason(server.id)}) if server else None,
    )


# ------------------------------------------------------------------------------ pages


def _page_context(session: SessionDep, user: CurrentUser, owner: str | None = None, **extra: Any) -> dict[str, Any]:
    deployments = owned_by(service.list_deployments(session), owner_id_filter(session, user, owner))
    runs = listings.deployable_run_choices(session)
    form = extra.pop("form", {})
    # The adapter picker lists what the chosen run (else the newest) can serve.
    chosen = next((run for run in runs if run.id == form.get("run_id")), runs[0] if runs else None)
    return {
        "section": "deployments",
        "deployments": deployments,
        "owner": owner,
        "servers": service.servers_by_id(session, deployments),
        "runs": runs,
        "adapters": listings.adapter_choices(session, chosen) if chosen else [],
        "keys": rate_limits.list_keys(session, user),
        "backends": list(ServeBackend),
        "busy": any(d.status in ("pending", "starting") for d in deployments),
        "form": form,
        "errors": {},
        "new_key": None,
        **extra,
    }


@router.get("/deployments", response_class=HTMLResponse)
def deployments_page(request: Request, session: SessionDep, user: CurrentUser, run_id: int | None = None,
                     owner: OwnerQuery = None):
    """`?run_id=N` preselects a run (the run page's Deploy button links here); htmx polls the table;
    `?owner=me`: only the caller's deployments (the "Mine" toggle)."""
    context = _page_context(session, user, owner, form={"run_id": run_id})
    return render(request, "deployments/index.html", context, block="table" if is_htmx(request) else None)


@router.get("/deployments/adapters", response_class=HTMLResponse)
def adapter_picker(request: Request, session: SessionDep, user: CurrentUser, run_id: int | None = None):
    """The deploy form's adapter picker for the run chosen in it."""
    context = _page_context(session, user, form={"run_id": run_id})
    return render(request, "deployments/index.html", context, block="adapter_picker")


@router.post("/deployments", response_class=HTMLResponse)
def deploy_from_page(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    run_id: Annotated[int, Form()],
    name: Annotated[str, Form()] = "",
    checkpoint: Annotated[str, Form()] = "",
    backend: Annotated[ServeBackend, Form()] = ServeBackend.vllm,
    force: Annotated[bool, Form()] = False,  # "deploy anyway" past the promotion gate's warning
):
    form = {"run_id": run_id, "name": name, "checkpoint": checkpoint, "backend": backend}
    try:
        service.create_deployment(
            session, DeploymentCreate(run_id=run_id, name=name or None, checkpoint=checkpoint or None, backend=backend,
                                      force=force)
        )
    except DeploymentError as error:
        # 200 so that htmx swaps the form in with the message next to its field.
        context = _page_context(session, user, form=form, errors={error.field or "form": str(error)})
        return render(request, "deployments/index.html", context, block="main")
    return render(request, "deployments/index.html", _page_context(session, user), block="main")


@router.post("/deployments/{deployment_id}/undeploy", dependencies=[OWNED_DEPLOYMENT], response_class=HTMLResponse)
def undeploy_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    service.undeploy(session, deployment_id)
    return render(request, "deployments/index.html", _page_context(session, user), block="table")


@router.post("/deployments/{deployment_id}/redeploy", dependencies=[OWNED_DEPLOYMENT], response_class=HTMLResponse)
def redeploy_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    """A stopped or failed deployment again: the same run, adapter, name and kind of server."""
    old = service.get_deployment(session, deployment_id)
    server = session.get(InferenceServer, old.server_id) if old.server_id else None
    service.create_deployment(session, DeploymentCreate(
        run_id=old.run_id, name=old.name, checkpoint=old.checkpoint,
        backend=server.backend if server else ServeBackend.vllm,
    ))
    return render(request, "deployments/index.html", _page_context(session, user), block="table")


@router.post("/deployments/{deployment_id}/remove", dependencies=[OWNED_DEPLOYMENT], response_class=HTMLResponse)
def remove_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    service.remove_deployment(session, deployment_id)
    return render(request, "deployments/index.html", _page_context(session, user), block="table")


@router.post("/deployments/keys", response_class=HTMLResponse)
def create_key_from_page(
    request: Request, session: SessionDep, user: CurrentUser, name: Annotated[str, Form()] = "",
    deployment_name: Annotated[str, Form()] = "", requests_per_minute: Annotated[str, Form()] = "",
    tokens_per_minute: Annotated[str, Form()] = "",
):
    """A key for every model or one deployment, with optional limits per minute (blank: none)."""
    if not name.strip():
        context = _page_context(session, user, key_error="Give the key a name (who or what uses it).")
        return render(request, "deployments/index.html", context, block="keys")
    limits = {"requests_per_minute": requests_per_minute.strip(), "tokens_per_minute": tokens_per_minute.strip()}
    if any(value and not (value.isdigit() and int(value) > 0) for value in limits.values()):
        context = _page_context(session, user, key_error="Limits are whole numbers above 0 (blank: no limit).")
        return render(request, "deployments/index.html", context, block="keys")
    _key, raw = rate_limits.create_key(session, user, GatewayKeyCreate(
        name=name[:100], deployment_name=deployment_name or None,
        **{field: int(value) if value else None for field, value in limits.items()},
    ))
    return render(request, "deployments/index.html", _page_context(session, user, new_key=raw), block="keys")


@router.post("/deployments/keys/{key_id}/revoke", response_class=HTMLResponse)
def revoke_key_from_page(request: Request, session: SessionDep, user: CurrentUser, key_id: int):
    revoke_token(session, user, key_id, kind=GATEWAY_KEY)
    return render(request, "deployments/index.html", _page_context(session, user), block="keys")


@router.get("/playground", response_class=HTMLResponse)
def playground_page(request: Request, session: SessionDep, model: str | None = None):
    models = [name for name, _created in service.gateway_models(session)]
    deployments = {d.name: d for d in service.list_deployments(session, include_stopped=False)}
    servers = service.servers_by_id(session, list(deployments.values()))
    # The base model next to each adapter, for the side-by-side comparison.
    base_of = {
        name: servers[d.server_id].base_name
        for name, d in deployments.items()
        if d.server_id in servers and servers[d.server_id].base_name
    }
    selected = model if model in models else (next((m for m in models if m in deployments), None) or (models[0] if models else None))
    return render(request, "playground/index.html", {
        "section": "deployments",
        "models": models,
        "selected": selected,
        "base_of": base_of,
        "gateway_url": str(request.base_url).rstrip("/") + "/v1",
    })


# -------------------------------------------------------------------------------- API


@api_router.get("/deployments", response_model=list[DeploymentPublic])
def list_deployments_api(session: SessionDep, user: CurrentUser, include_stopped: bool = True,
                         owner: OwnerQuery = None):
    return owned_by(service.list_deployments(session, include_stopped=include_stopped),
                    owner_id_filter(session, user, owner))


@api_router.post("/deployments", response_model=DeploymentDetail, status_code=status.HTTP_201_CREATED)
def create_deployment_api(session: SessionDep, data: DeploymentCreate):
    deployment = service.create_deployment(session, data)
    return _detail(session, deployment)


@api_router.get("/deployments/{deployment_id}", response_model=DeploymentDetail)
def get_deployment_api(session: SessionDep, deployment_id: int):
    service.expire_silent_servers(session)
    return _detail(session, service.get_deployment(session, deployment_id))


@api_router.delete("/deployments/{deployment_id}", dependencies=[OWNED_DEPLOYMENT], response_model=DeploymentDetail)
def undeploy_api(session: SessionDep, deployment_id: int):
    return _detail(session, service.undeploy(session, deployment_id))


class ModelServe(BaseModel):
    name: str | None = Field(default=None, max_length=200)


@api_router.post("/models/{model_id}/serve", status_code=status.HTTP_201_CREATED)
def serve_model_api(model_id: int, payload: ModelServe, session: SessionDep) -> dict[str, Any]:
    """Serve a registered model with no adapter on vLLM (a base model to chat with, a merged
    export); the gateway answers for it under `name` once `status` is ready."""
    return service.model_server_public(service.serve_model_alone(session, model_id, payload.name))


@api_router.get("/model-servers/{server_id}")
def get_model_server_api(server_id: int, session: SessionDep) -> dict[str, Any]:
    return service.model_server_public(service.model_server(session, server_id))


@api_router.post("/model-servers/{server_id}/stop")
def stop_model_server_api(server_id: int, session: SessionDep) -> dict[str, Any]:
    return service.model_server_public(service.stop_model_server(session, server_id))


@api_router.get("/gateway-keys", response_model=list[GatewayKeyPublic])
def list_keys_api(session: SessionDep, user: CurrentUser):
    """Your live keys with their model scope, limits and requests and tokens per day."""
    return rate_limits.list_keys(session, user)


@api_router.post("/gateway-keys", response_model=GatewayKeyCreated, status_code=status.HTTP_201_CREATED)
def create_key_api(session: SessionDep, user: CurrentUser, data: GatewayKeyCreate):
    """`deployment_name` confines the key to that model (403 for others); over `requests_per_minute`
    or `tokens_per_minute` the gateway answers 429 with Retry-After."""
    key, raw = rate_limits.create_key(session, user, data)
    return GatewayKeyCreated(**key.model_dump(), token=raw)


@api_router.delete("/gateway-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key_api(session: SessionDep, user: CurrentUser, key_id: int) -> None:
    if not revoke_token(session, user, key_id, kind=GATEWAY_KEY):
        raise NotFound(f"no live gateway key {key_id}")


# -------------------------------------------------------------- worker channel


@internal_router.post("/servers/{server_id}/claim")
def claim_server(session: SessionDep, server_id: int, claim: ServerClaim) -> ServerSpec:
    return service.claim_server(session, server_id, claim)


@internal_router.post("/servers/{server_id}/events")
def server_events(session: SessionDep, server_id: int, report: ServerReport) -> ServerReply:
    return service.report_server(session, server_id, report)


@internal_router.post("/deployments/{deployment_id}/events")
def deployment_events(session: SessionDep, deployment_id: int, report: AdapterReport) -> dict[str, Any]:
    service.report_adapter(session, deployment_id, report)
    return {}
