"""Models: the registry of local base models (pages and the JSON API under /api/v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import RedirectResponse
from sqlmodel import Session

from app.db import SessionDep
from app.models import ModelEntry, ModelEntryCreate, ModelEntryPublic
from app.services import deployments as deployment_service
from app.services import model_registry as service
from app.services.deployments import DeploymentError
from app.services.model_registry import ModelError
from app.templating import render

router = APIRouter(tags=["models-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["models"])


# ---------------------------------------------------------------------------------------- API


@api_router.get("/models", response_model=list[ModelEntryPublic])
def list_models(session: SessionDep) -> list[ModelEntry]:
    return service.list_models(session)


@api_router.post("/models", response_model=ModelEntryPublic, status_code=status.HTTP_201_CREATED)
def add_model(body: ModelEntryCreate, session: SessionDep) -> ModelEntry:
    """Register a model folder under an allowed root (nothing is downloaded)."""
    return service.add_model(session, body.path, body.name)


@api_router.post("/models/scan")
def scan_models(session: SessionDep) -> dict[str, list[str]]:
    """Register every model folder under the allowed roots; refresh what is known of the others."""
    return service.scan(session)


@api_router.get("/models/{model_id}", response_model=ModelEntryPublic)
def get_model(model_id: int, session: SessionDep) -> ModelEntry:
    return service.get_model(session, model_id)


@api_router.delete("/models/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model_id: int, session: SessionDep) -> None:
    """Forget a model (its folder is left alone)."""
    service.delete_model(session, service.get_model(session, model_id))


# -------------------------------------------------------------------------------------- pages


def _page(request: Request, session: Session, *, status_code: int = 200, **extra: Any):
    context = {"section": "models", "models": service.list_models(session),
               "roots": [str(root) for root in service.model_roots()], "form": {}, "errors": {},
               "servers": deployment_service.model_servers(session), **extra}
    return render(request, "models/list.html", context, status_code=status_code)


@router.get("/models")
def models_page(request: Request, session: SessionDep):
    return _page(request, session)


@router.post("/models")
def add_model_form(
    request: Request, session: SessionDep,
    path: Annotated[str, Form()] = "", name: Annotated[str, Form()] = "",
):
    try:
        entry = service.add_model(session, path, name or None)
    except ModelError as error:
        return _page(request, session, status_code=error.status_code, form={"path": path, "name": name},
                     errors={error.field: error.detail})
    return _page(request, session, notice=f"Registered {entry.name}.")


@router.post("/models/scan")
def scan_models_form(request: Request, session: SessionDep):
    result = service.scan(session)
    return _page(request, session, scan=result)


@router.post("/models/{model_id}/serve")
def serve_model_form(model_id: int, request: Request, session: SessionDep):
    """Chat with a base model alone: serve it with no adapter, then open the playground on it."""
    try:
        server = deployment_service.serve_model_alone(session, model_id)
    except DeploymentError as error:
        return _page(request, session, status_code=error.status_code, errors={"serve": str(error)})
    return _page(request, session, notice=f"Starting {server.base_name}: Chat appears here once it is ready.")


@router.post("/models/servers/{server_id}/stop")
def stop_model_server_form(server_id: int, request: Request, session: SessionDep):
    try:
        deployment_service.stop_model_server(session, server_id)
    except DeploymentError as error:
        return _page(request, session, status_code=error.status_code, errors={"serve": str(error)})
    return RedirectResponse("/models", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/models/{model_id}/delete")
def delete_model_form(model_id: int, request: Request, session: SessionDep):
    entry = service.get_model(session, model_id)
    try:
        service.delete_model(session, entry)
    except ModelError as error:
        return _page(request, session, status_code=error.status_code, errors={"delete": error.detail})
    return RedirectResponse("/models", status_code=status.HTTP_303_SEE_OTHER)
