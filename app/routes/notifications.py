"""Notifications: each user's webhooks (pages and /api/v1), their delivery log and "send test"."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from app.auth import CurrentUser
from app.db import SessionDep
from app.errors import Invalid
from app.models.webhook import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryPublic,
    WebhookEvent,
    WebhookPublic,
    WebhookScope,
)
from app.services import webhooks as service
from app.templating import is_htmx, render

router = APIRouter(tags=["notifications-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["notifications"])

PAGE = "notifications/index.html"


def _context(session: SessionDep, user: CurrentUser, **extra: Any) -> dict[str, Any]:
    hooks = service.list_webhooks(session, user)
    deliveries = {hook.id: service.delivery_log(session, hook.id) for hook in hooks}
    return {
        "section": "notifications",
        "webhooks": hooks,
        "deliveries": deliveries,
        # The log refreshes itself while a delivery waits for its next attempt.
        "pending": any(d.status == "pending" for log in deliveries.values() for d in log),
        "events": list(WebhookEvent),
        "scopes": list(WebhookScope),
        "form": {},
        "errors": {},
        "created": None,
        **extra,
    }


@router.get("/notifications", response_class=HTMLResponse)
def notifications_page(request: Request, session: SessionDep, user: CurrentUser):
    return render(request, PAGE, _context(session, user), block="webhooks" if is_htmx(request) else None)


@router.post("/notifications/webhooks", response_class=HTMLResponse)
def create_from_page(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    url: Annotated[str, Form()] = "",
    events: Annotated[list[str] | None, Form()] = None,
    scope: Annotated[str, Form()] = WebhookScope.mine.value,
    slack: Annotated[bool, Form()] = False,
):
    form = {"url": url, "events": events or [], "scope": scope, "slack": slack}
    try:
        data = WebhookCreate(url=url, events=events or [], scope=scope, slack=slack)
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0])
        message = "Pick at least one event." if field == "events" else error.errors()[0]["msg"]
        return render(request, PAGE, _context(session, user, form=form, errors={field: message}), block="webhooks")
    try:
        created = service.create_webhook(session, user, data)
    except Invalid as error:  # shown next to its field in the form
        return render(request, PAGE, _context(session, user, form=form, errors={error.field or "url": error.detail}),
                      block="webhooks")
    return render(request, PAGE, _context(session, user, created=created), block="webhooks")


@router.post("/notifications/webhooks/{webhook_id}/test", response_class=HTMLResponse)
def test_from_page(request: Request, session: SessionDep, user: CurrentUser, webhook_id: int):
    service.send_test(session, user, webhook_id)
    return render(request, PAGE, _context(session, user), block="webhooks")


@router.post("/notifications/webhooks/{webhook_id}/delete", response_class=HTMLResponse)
def delete_from_page(request: Request, session: SessionDep, user: CurrentUser, webhook_id: int):
    service.delete_webhook(session, user, webhook_id)
    return render(request, PAGE, _context(session, user), block="webhooks")


# -------------------------------------------------------------------------------- API


@api_router.get("/webhooks", response_model=list[WebhookPublic])
def list_webhooks_api(session: SessionDep, user: CurrentUser):
    return service.list_webhooks(session, user)


@api_router.post("/webhooks", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED)
def create_webhook_api(session: SessionDep, user: CurrentUser, data: WebhookCreate):
    """The signing secret is in this answer only."""
    return service.create_webhook(session, user, data)


@api_router.delete("/webhooks/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_webhook_api(session: SessionDep, user: CurrentUser, webhook_id: int) -> None:
    service.delete_webhook(session, user, webhook_id)


@api_router.post("/webhooks/{webhook_id}/test", response_model=WebhookDeliveryPublic,
                 status_code=status.HTTP_202_ACCEPTED)
def test_webhook_api(session: SessionDep, user: CurrentUser, webhook_id: int):
    return service.send_test(session, user, webhook_id)


@api_router.get("/webhooks/{webhook_id}/deliveries", response_model=list[WebhookDeliveryPublic])
def deliveries_api(session: SessionDep, user: CurrentUser, webhook_id: int):
    """The webhook's latest deliveries, newest first."""
    return service.delivery_log(session, service.get_webhook(session, user, webhook_id).id)
