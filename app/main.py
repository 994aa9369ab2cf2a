"""The FastAPI application: pages, the JSON API under /api/v1 and the worker channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sqlmodel import Session

from app.auth import require_user, require_worker
from app.db import get_engine, migrate
from app.demo import install_demo
from app.errors import DomainError
from app.routes import (admin, artifacts, auth, configs, datasets, deployments, evaluations, gateway, health, home, models,
                        notifications, quotas, runs, workers)
from app.security import warn_if_login_needs_https
from app.services import rate_limits, webhooks
from app.web.audit import AuditMiddleware
from app.services.scheduler import run_scheduler
from app.settings import STATIC_DIR, get_settings
from app.templating import is_htmx, render

# Each area module has `router` (pages) and `api_router` (/api/v1), both behind login, and
# may have `internal_router` (/internal/v1, the worker channel, behind the worker token).
AREAS = (datasets, configs, models, quotas, runs, evaluations, artifacts, deployments, workers, notifications, auth,
         admin)


class ApiError(BaseModel):
    """Every refusal of /api/v1: `detail` says why (a list of field errors for a 422)."""

    detail: str | list[Any]
    field: str | None = None  # the form field at fault, when one is
    errors: list[dict[str, Any]] | None = None  # field → message, for a refused config


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The gateway's refusals, in OpenAI's shape."""

    error: OpenAIErrorBody


# Declared in the schema so that clients (and the fuzzer's conformance checks) know them.
# Refusals are JSON even where the route answers text (FastAPI files them under the route's type).
def _json_error(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"model": model, "description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


API_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": _json_error(ApiError, "Refused: see `detail`")}
GATEWAY_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": _json_error(OpenAIError, "Refused"),
    502: _json_error(OpenAIError, "The model's server did not answer"),
}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    migrate()
    warn_if_login_needs_https(get_settings())
    if get_settings().demo:
        with Session(get_engine()) as session:
            install_demo(session)
    async with run_scheduler(), webhooks.delivering(), rate_limits.flushing():
        yield


async def _not_text(_request: Request, error: Exception) -> JSONResponse:
    """A JSON string with a lone surrogate escape ("\\udc00") parses into a str that cannot be
    stored as UTF-8: the request's text is at fault, not the server."""
    if "surrogates not allowed" not in str(error):
        raise error
    return JSONResponse({"detail": "the request holds an invalid Unicode escape (a lone surrogate such as \\udc00):"
                                   " it is not text and was not stored"}, status_code=422)


async def _number_out_of_range(_request: Request, _error: Exception) -> JSONResponse:
    """SQLite integers are 64-bit: a larger id or number (found by the fuzzer) names nothing."""
    return JSONResponse({"detail": "a number in the request is out of range (at most 2^63 - 1)"}, status_code=422)


_TITLES = {403: "Not allowed", 404: "Not found", 409: "Not now", 413: "Too large", 503: "Unavailable"}


async def _domain_error(request: Request, error: Exception) -> Response:
    """The one place a service's refusal becomes an HTTP answer: JSON for the API and the worker
    channel, a message in the page's flash region for htmx, an error page for a browser."""
    assert isinstance(error, DomainError)
    path = request.url.path
    if path.startswith(("/api/", "/internal/")) or not request.headers.get("accept", "").startswith("text/html") \
            and not is_htmx(request):
        body = ApiError(detail=error.detail, field=error.field).model_dump(exclude_none=True)
        return JSONResponse({**body, **error.extra}, status_code=error.status_code)
    context = {"title": _TITLES.get(error.status_code, "Refused"), "detail": error.detail}
    if is_htmx(request):  # app.js swaps a refusal only where HX-Retarget points
        return render(request, "error.html", context, block="message", status_code=error.status_code,
                      headers={"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"})
    return render(request, "error.html", context, status_code=error.status_code)


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Tuneboard",
        version="0.1.0",
        description="Fine-tune LLMs with LLaMA-Factory: datasets, configs, runs and deployments.",
        lifespan=lifespan,
        # Served below, behind login like every other page and API route.
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_exception_handler(DomainError, _domain_error)
    app.add_middleware(AuditMiddleware)  # an audit entry for every state-changing request
    app.add_exception_handler(OverflowError, _number_out_of_range)
    app.add_exception_handler(UnicodeEncodeError, _not_text)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(health.router)
    app.include_router(gateway.router, responses=GATEWAY_ERRORS)  # OpenAI-compatible: its own key auth, not the login
    app.include_router(auth.public_router)  # login, setup, logout
    logged_in = [Depends(require_user)]
    app.include_router(home.router, dependencies=logged_in)

    @app.get("/api/v1/openapi.json", include_in_schema=False, dependencies=logged_in)
    def openapi_schema() -> dict:
        return app.openapi()

    @app.get("/api/docs", include_in_schema=False, dependencies=logged_in, response_class=HTMLResponse)
    def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/api/v1/openapi.json", title=f"{app.title} API")

    for area in AREAS:
        app.include_router(area.router, dependencies=logged_in)
        app.include_router(area.api_router, dependencies=logged_in, responses=API_ERRORS)
        internal = getattr(area, "internal_router", None)
        if internal is not None:
            app.include_router(
                internal, prefix="/internal/v1", dependencies=[Depends(require_worker)],
                include_in_schema=False,
            )
    return app
