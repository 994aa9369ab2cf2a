"""Liveness and readiness (open to anyone, no login) and Prometheus metrics (behind their own token)."""

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.auth import require_metrics_token
from app.db import SessionDep
from app.services import metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    session.exec(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", dependencies=[Depends(require_metrics_token)], include_in_schema=False)
async def prometheus_metrics() -> Response:
    return Response(await run_in_threadpool(metrics.exposition), media_type=CONTENT_TYPE_LATEST)
