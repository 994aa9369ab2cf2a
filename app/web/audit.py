"""The audit middleware: each state-changing request of a user becomes one entry
(app/services/audit.py says why a middleware and not the services)."""

from __future__ import annotations

import json
from typing import Any

import anyio
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import get_engine
from app.models.audit import AuditOutcome
from app.models.base import row_id
from app.services.audit import READS_BY_POST, REQUEST_AUDIT, STATE_CHANGING_METHODS, RequestAudit, record

UNAUDITED_PREFIXES = ("/internal/", "/v1/", "/static/")
# What a route's path parameter names, as the audit log calls it (the table's name).
PARAMETER_ENTITIES = {
    "run_id": "run", "config_id": "train_config", "dataset_id": "dataset", "deployment_id": "deployment",
    "key_id": "apitoken", "token_id": "apitoken", "user_id": "user", "model_id": "modelentry",
    "server_id": "inference_server", "evaluation_id": "evaluation", "export_id": "model_export",
    "worker_id": "worker",
}
# What a route's collection holds, as the audit log calls it.
COLLECTION_ENTITIES = {
    "runs": "run", "configs": "train_config", "datasets": "dataset", "deployments": "deployment",
    "gateway-keys": "apitoken", "keys": "apitoken", "tokens": "apitoken", "users": "user", "models": "modelentry",
    "evaluations": "evaluation", "exports": "model_export", "webhooks": "webhook",
}
METHOD_VERBS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
VERB_ALIASES = {"new": "create"}  # POST /configs/new
HELD_ANSWER_LIMIT = 1 << 20


def _outcome(status_code: int) -> AuditOutcome:
    if status_code < 400:
        return AuditOutcome.done
    if status_code in (401, 403):
        return AuditOutcome.denied
    return AuditOutcome.refused if status_code < 500 else AuditOutcome.failed


def _describe(method: str, template: str, params: dict[str, Any], audit: RequestAudit) -> tuple[str, str, int | None]:
    """(action, entity type, entity id) of a request. The entity: the row a create made (of the
    route's collection, if it made several), else the last row its path names. The verb: the
    route's last word when that is not a collection ("cancel", "undeploy", "edit"), else the
    method's ("create", "update", "delete")."""
    segments = [s for s in template.split("/") if s and s not in ("api", "v1")]
    collections = [s for s in segments if not s.startswith("{") and s.endswith("s")]
    resource = COLLECTION_ENTITIES.get(collections[-1]) if collections else None
    verb_tail = len(segments) >= 2 and not segments[-1].startswith("{") and not segments[-1].endswith("s")
    if verb_tail:
        verb = VERB_ALIASES.get(segments[-1], segments[-1])
    elif method == "POST" and segments and segments[-1].startswith("{"):
        verb = "update"  # a form posted to the row itself (POST /admin/users/{user_id})
    else:
        verb = METHOD_VERBS.get(method, method.lower())
    entity_id: int | None = None
    if audit.entity is not None:
        entity_type, entity_id = audit.entity
    elif audit.created:
        entity_type, entity_id = next((row for row in audit.created if row[0] == resource), audit.created[0])
        verb = verb if verb_tail else "create"
    elif params:
        name, value = list(params.items())[-1]
        entity_type = PARAMETER_ENTITIES.get(name, name.removesuffix("_id"))
        entity_id = row_id(value)
    else:
        entity_type = resource or (segments[0] if segments else "panel")
    return audit.action or f"{entity_type}.{verb}", entity_type, entity_id


def _client_address(scope: Scope) -> str:
    # uvicorn has already replaced it with X-Forwarded-For's address from a trusted proxy.
    client = scope.get("client")
    return client[0] if client else ""


def _write(scope: Scope, audit: RequestAudit, status_code: int, error: str | None) -> None:
    method = scope["method"]
    route = scope.get("route")
    template = getattr(route, "path", None) or scope["path"]
    params = dict(scope.get("path_params") or {})
    action, entity_type, entity_id = _describe(method, template, params, audit)
    detail: dict[str, Any] = {"request": f"{method} {template}", "status": status_code, **audit.detail}
    if params:
        detail["params"] = {k: str(v) for k, v in params.items()}
    if error and "error" not in detail:
        detail["error"] = error
    with Session(get_engine()) as session:
        record(session, action, entity_type, entity_id, user_id=audit.user_id, username=audit.username,
               address=_client_address(scope), outcome=_outcome(status_code), detail=detail)


def _error_text(body: bytes) -> str | None:
    """A JSON refusal's `detail`, to say why in the log (a page's or fragment's HTML says it to
    people; permissions.py notes its own reasons)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return None
    return str(detail)[:500] if detail else None


class AuditMiddleware:
    """Records each state-changing request before its answer leaves, so that whoever reads the
    log next sees it. The answer is held until the route is done, its session closed included
    (a session still holding SQLite's write lock would block the entry): answers are small JSON,
    fragments or redirects. One that streams or grows large is sent on as it comes, recorded
    at its start."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING_METHODS \
                or scope["path"].startswith(UNAUDITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        audit = RequestAudit()
        token = REQUEST_AUDIT.set(audit)
        held: list[Message] = []
        state: dict[str, Any] = {"written": False, "streaming": False, "status": 500, "size": 0}

        async def record(error: str | None = None) -> None:
            template = getattr(scope.get("route"), "path", None)
            if not state["written"] and template not in READS_BY_POST:
                await anyio.to_thread.run_sync(_write, scope, audit, state["status"], error)
            state["written"] = True

        async def release() -> None:
            body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
            await record(_error_text(body) if state["status"] >= 400 else None)
            for message in held:
                await send(message)
            held.clear()

        async def hold(message: Message) -> None:
            if state["streaming"]:
                await send(message)
                return
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                state["streaming"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            state["size"] += len(message.get("body", b""))
            held.append(message)
            if state["streaming"] or state["size"] > HELD_ANSWER_LIMIT:
                state["streaming"] = True
                await release()

        try:
            await self.app(scope, receive, hold)
        except Exception:
            state["status"] = 500
            await record("the server failed (500)")
            raise
        finally:
            REQUEST_AUDIT.reset(token)
        await release()
