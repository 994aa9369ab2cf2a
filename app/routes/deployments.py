"""Deployments: pages (htmx fragments from the same routes), the JSON API under /api/v1, the
gateway keys, and the serving worker's reports (internal_router)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.auth import CurrentUser
from app.db import SessionDep
from app.models.deployment import (
    Deployment,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentPublic,
    InferenceServer,
    InferenceServerPublic,
    ServeBackend,
)
from app.models.user import ApiTokenCreate, ApiTokenCreated, ApiTokenPublic
from app.services import deployments as service
from app.services import scheduler
from app.services import listings
from app.services.deployments import DeploymentError
from app.services.users import create_token, list_tokens, revoke_token
from app.templating import render, templates
from app.wire import AdapterReport, ServerClaim, ServerReply, ServerReport, ServerSpec

router = APIRouter(tags=["deployments-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["deployments"])
internal_router = APIRouter(tags=["deployments-internal"])

GATEWAY_KEY = "gateway"
templates.env.globals["server_wait_reason"] = scheduler.server_wait_reason


def _http_error(error: DeploymentError) -> HTTPException:
    return HTTPException(error.status_code, str(error))


def _detail(session: SessionDep, deployment: Deployment) -> DeploymentDetail:
    server = session.get(InferenceServer, deployment.server_id) if deployment.server_id else None
    return DeploymentDetail(
        **DeploymentPublic.model_validate(deployment).model_dump(),
        server=InferenceServerPublic.model_validate(
            server, update={"wait_reason": scheduler.server_wait_reason(server.id)}) if server else None,
    )


# ------------------------------------------------------------------------------ pages


def _page_context(session: SessionDep, user: CurrentUser, **extra: Any) -> dict[str, Any]:
    deployments = service.list_deployments(session)
    runs = listings.deployable_run_choices(session)
    form = extra.pop("form", {})
    # The adapter picker lists what the chosen run (else the newest) can serve.
    chosen = next((run for run in runs if run.id == form.get("run_id")), runs[0] if runs else None)
    return {
        "section": "deployments",
        "deployments": deployments,
        "servers": service.servers_by_id(session, deployments),
        "runs": runs,
        "adapters": listings.adapter_choices(session, chosen) if chosen else [],
        "keys": list_tokens(session, user, kind=GATEWAY_KEY),
        "backends": list(ServeBackend),
        "busy": any(d.status in ("pending", "starting") for d in deployments),
        "form": form,
        "errors": {},
        "new_key": None,
        **extra,
    }


@router.get("/deployments", response_class=HTMLResponse)
def deployments_page(
    request: Request, session: SessionDep, user: CurrentUser, block: str | None = None, run_id: int | None = None
):
    """`?run_id=N` preselects a run: the run page's Deploy button links here (and the run
    picker asks for `block=adapter_picker` of the run chosen)."""
    blocks = {"table", "keys", "deploy_form", "adapter_picker"}
    context = _page_context(session, user, form={"run_id": run_id})
    return render(request, "deployments/index.html", context, block=block if block in blocks else None)


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


@router.post("/deployments/{deployment_id}/undeploy", response_class=HTMLResponse)
def undeploy_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    error = None
    try:
        service.undeploy(session, deployment_id)
    except DeploymentError as refused:
        error = str(refused)
    return render(request, "deployments/index.html", _page_context(session, user, table_error=error), block="table")


@router.post("/deployments/{deployment_id}/redeploy", response_class=HTMLResponse)
def redeploy_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    """A stopped or failed deployment again: the same run, adapter, name and kind of server."""
    error = None
    try:
        old = service.get_deployment(session, deployment_id)
        server = session.get(InferenceServer, old.server_id) if old.server_id else None
        service.create_deployment(session, DeploymentCreate(
            run_id=old.run_id, name=old.name, checkpoint=old.checkpoint,
            backend=server.backend if server else ServeBackend.vllm,
        ))
    except DeploymentError as refused:
        error = str(refused)
    return render(request, "deployments/index.html", _page_context(session, user, table_error=error), block="table")


@router.post("/deployments/{deployment_id}/remove", response_class=HTMLResponse)
def remove_from_page(request: Request, session: SessionDep, user: CurrentUser, deployment_id: int):
    error = None
    try:
        service.remove_deployment(session, deployment_id)
    except DeploymentError as refused:
        error = str(refused)
    return render(request, "deployments/index.html", _page_context(session, user, table_error=error), block="table")


@router.post("/deployments/keys", response_class=HTMLResponse)
def create_key_from_page(request: Request, session: SessionDep, user: CurrentUser, name: Annotated[str, Form()] = ""):
    if not name.strip():
        context = _page_context(session, user, key_error="Give the key a name (who or what uses it).")
        return render(request, "deployments/index.html", context, block="keys")
    _token, raw = create_token(session, user, name[:100], kind=GATEWAY_KEY)
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
def list_deployments_api(session: SessionDep, include_stopped: bool = True):
    return service.list_deployments(session, include_stopped=include_stopped)


@api_router.post("/deployments", response_model=DeploymentDetail, status_code=status.HTTP_201_CREATED)
def create_deployment_api(session: SessionDep, data: DeploymentCreate):
    try:
        deployment = service.create_deployment(session, data)
    except DeploymentError as error:
        raise _http_error(error) from None
    return _detail(session, deployment)


@api_router.get("/deployments/{deployment_id}", response_model=DeploymentDetail)
def get_deployment_api(session: SessionDep, deployment_id: int):
    service.expire_silent_servers(session)
    try:
        return _detail(session, service.get_deployment(session, deployment_id))
    except DeploymentError as error:
        raise _http_error(error) from None


@api_router.delete("/deployments/{deployment_id}", response_model=DeploymentDetail)
def undeploy_api(session: SessionDep, deployment_id: int):
    try:
        return _detail(session, service.undeploy(session, deployment_id))
    except DeploymentError as error:
        raise _http_error(error) from None


class ModelServe(BaseModel):
    name: str | None = Field(default=None, max_length=200)


@api_router.post("/models/{model_id}/serve", status_code=status.HTTP_201_CREATED)
def serve_model_api(model_id: int, payload: ModelServe, session: SessionDep) -> dict[str, Any]:
    """Serve a registered model with no adapter on vLLM (a base model to chat with, a merged
    export); the gateway answers for it under `name` once `status` is ready."""
    try:
        return service.model_server_public(service.serve_model_alone(session, model_id, payload.name))
    except DeploymentError as error:
        raise _http_error(error) from None


@api_router.get("/model-servers/{server_id}")
def get_model_server_api(server_id: int, session: SessionDep) -> dict[str, Any]:
    try:
        return service.model_server_public(service.model_server(session, server_id))
    except DeploymentError as error:
        raise _http_error(error) from None


@api_router.post("/model-servers/{server_id}/stop")
def stop_model_server_api(server_id: int, session: SessionDep) -> dict[str, Any]:
    try:
        return service.model_server_public(service.stop_model_server(session, server_id))
    except DeploymentError as error:
        raise _http_error(error) from None


@api_router.get("/gateway-keys", response_model=list[ApiTokenPublic])
def list_keys_api(session: SessionDep, user: CurrentUser):
    return list_tokens(session, user, kind=GATEWAY_KEY)


@api_router.post("/gateway-keys", response_model=ApiTokenCreated, status_code=status.HTTP_201_CREATED)
def create_key_api(session: SessionDep, user: CurrentUser, data: ApiTokenCreate):
    token, raw = create_token(session, user, data.name, kind=GATEWAY_KEY, expires_in_days=data.expires_in_days)
    return ApiTokenCreated(**ApiTokenPublic.model_validate(token).model_dump(), token=raw)


@api_router.delete("/gateway-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key_api(session: SessionDep, user: CurrentUser, key_id: int) -> None:
    if not revoke_token(session, user, key_id, kind=GATEWAY_KEY):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live gateway key {key_id}")


# -------------------------------------------------------------- worker channel


@internal_router.post("/servers/{server_id}/claim")
def claim_server(session: SessionDep, server_id: int, claim: ServerClaim) -> ServerSpec:
    try:
        return service.claim_server(session, server_id, claim)
    except DeploymentError as error:
        raise _http_error(error) from None


@internal_router.post("/servers/{server_id}/events")
def server_events(session: SessionDep, server_id: int, report: ServerReport) -> ServerReply:
    try:
        return service.report_server(session, server_id, report)
    except DeploymentError as error:
        raise _http_error(error) from None


@internal_router.post("/deployments/{deployment_id}/events")
def deployment_events(session: SessionDep, deployment_id: int, report: AdapterReport) -> dict[str, Any]:
    try:
        service.report_adapter(session, deployment_id, report)
    except DeploymentError as error:
        raise _http_error(error) from None
    return {}
