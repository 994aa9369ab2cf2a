"""The FastAPI application: pages, the JSON API under /api/v1 and the worker channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from app.auth import require_user, require_worker
from app.db import migrate
from app.routes import configs, datasets, deployments, health, models, runs, workers
from app.settings import STATIC_DIR, get_settings

# Each area module has `router` (pages) and `api_router` (/api/v1), both behind login, and
# may have `internal_router` (/internal/v1, the worker channel, behind the worker token).
AREAS = (datasets, configs, models, runs, deployments, workers)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    migrate()
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="Tuneboard",
        version="0.1.0",
        description="Fine-tune LLMs with LLaMA-Factory: datasets, configs, runs and deployments.",
        lifespan=lifespan,
        docs_url="/api/docs",
        openapi_url="/api/v1/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(health.router)
    logged_in = [Depends(require_user)]
    for area in AREAS:
        app.include_router(area.router, dependencies=logged_in)
        app.include_router(area.api_router, dependencies=logged_in)
        internal = getattr(area, "internal_router", None)
        if internal is not None:
            app.include_router(
                internal, prefix="/internal/v1", dependencies=[Depends(require_worker)],
                include_in_schema=False,
            )
    return app
