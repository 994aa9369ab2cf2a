"""Quotas: the admin's per-user GPU cap and everyone's usage (the queue view's table on the Runs
page and /api/v1/quotas)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from app.auth import Admin
from app.db import SessionDep
from app.errors import Invalid
from app.services import quotas, scheduler
from app.services.broker import kick_scheduler
from app.templating import render, templates

router = APIRouter(tags=["quotas-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["quotas"])

templates.env.globals["queue_usage"] = scheduler.queue_usage


class UserUsagePublic(BaseModel):
    username: str
    gpus_in_use: int = Field(description="GPUs (a CPU run's training slot counts as 1) held by the user's runs now")
    gpu_hours_24h: float
    queued: int


class Quotas(BaseModel):
    user_gpu_cap: int | None = Field(default=None, ge=1, description="None: no cap")


class QuotasPublic(Quotas):
    users: list[UserUsagePublic] = []


def _public(session: SessionDep) -> QuotasPublic:
    usage = scheduler.queue_usage()
    return QuotasPublic(user_gpu_cap=quotas.user_gpu_cap(session), users=[
        UserUsagePublic(username=u.username, gpus_in_use=u.units_in_use, gpu_hours_24h=u.gpu_hours_24h,
                        queued=u.queued) for u in usage.users])


@api_router.get("/quotas", response_model=QuotasPublic)
def quotas_api(session: SessionDep):
    """The cap and each user's usage as of the scheduler's last pass."""
    return _public(session)


@api_router.put("/quotas", response_model=QuotasPublic)
def set_quotas_api(session: SessionDep, _admin: Admin, data: Quotas):
    quotas.set_user_gpu_cap(session, data.user_gpu_cap)
    kick_scheduler()  # a raised cap may let runs start now
    return _public(session)


@router.post("/runs/quota", response_class=HTMLResponse)
def set_quota_from_page(request: Request, session: SessionDep, _admin: Admin,
                        user_gpu_cap: Annotated[str, Form()] = ""):
    """The Runs page's cap field (blank: no cap)."""
    value = user_gpu_cap.strip()
    if value and not value.isdigit():
        raise Invalid("The cap is a whole number of GPUs, at least 1 (blank: no cap).", field="user_gpu_cap")
    quotas.set_user_gpu_cap(session, int(value) if value else None)
    kick_scheduler()
    return render(request, "runs/list.html", {"user_gpu_cap": quotas.user_gpu_cap(session)}, block="queue_usage")
