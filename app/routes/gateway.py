"""The OpenAI-compatible gateway: `/v1/models`, `/v1/chat/completions` and `/v1/completions`
(streaming and not), routed by `model` to the deployment's inference server.

Callers authenticate with a gateway key (`Authorization: Bearer <key>`, created on the
Deployments page), or — for the playground in the browser — with the session cookie plus the
X-CSRF-Token header. Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, so the
official clients raise their usual exceptions. Streams are forwarded chunk by chunk as they come.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.auth import session_user
from app.db import SessionDep
from app.security import CSRF_HEADER, csrf_matches, read_session
from app.services import metrics, rate_limits
from app.services.deployments import DeploymentError, gateway_models, resolve_model
from app.services.users import find_token

router = APIRouter(prefix="/v1", tags=["gateway"])

# The end of a stream kept to find its usage chunk in (the last few events).
USAGE_TAIL_BYTES = 8192
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 502: "upstream_error"}


def openai_error(status_code: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status_code, "api_error"), "param": param,
                      "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    return JSONResponse(body, status_code=status_code, headers=headers)


def _refused(request: Request, session: SessionDep) -> JSONResponse | None:
    """None when the caller may use the gateway, else the 401 to answer."""
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        key = find_token(session, authorization.removeprefix("Bearer ").strip(), kind="gateway")
        if key is None:
            return openai_error(401, "invalid or revoked API key", "invalid_api_key")
        request.state.gateway_key_id = key.id  # for its model scope, rate limits and usage
        return None
    if session_user(request, session) is not None:
        if request.method == "GET" or csrf_matches(read_session(request).get("csrf"), request.headers.get(CSRF_HEADER)):
            return None
        return openai_error(401, f"a browser session must send the {CSRF_HEADER} header", "csrf")
    return openai_error(
        401, "missing API key: send Authorization: Bearer <key> (create keys on the Deployments page)",
        "missing_api_key",
    )


def _client(request: Request) -> httpx.AsyncClient:
    """One pooled client per app: keep-alive connections to the inference servers."""
    client = getattr(request.app.state, "gateway_client", None)
    if client is None:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        )
        request.app.state.gateway_client = client
    return client


@router.get("/models")
def list_models(request: Request, session: SessionDep):
    if (refused := _refused(request, session)) is not None:
        return refused
    only = rate_limits.allowed_models(session, getattr(request.state, "gateway_key_id", None))
    data = [
        {"id": name, "object": "model", "created": int(created.timestamp()), "owned_by": "tuneboard"}
        for name, created in gateway_models(session) if only is None or name == only
    ]
    return {"object": "list", "data": data}


def _validate(body: Any, max_model_len: int, prompt_field: str) -> JSONResponse | None:
    prompt = body.get(prompt_field)
    if prompt_field == "messages" and (not isinstance(prompt, list) or not prompt):
        return openai_error(400, "`messages` must be a non-empty list", param="messages")
    if prompt_field == "prompt" and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
        return openai_error(400, "`prompt` must be a string or a non-empty list", param="prompt")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return openai_error(400, f"`{field}` must be a positive integer", param=field)
        if value >= max_model_len:
            return openai_error(
                400, f"`{field}` is {value}, but this model's context length is {max_model_len} tokens "
                "(prompt and completion together)", "context_length_exceeded", field,
            )
    return None


def _route(request: Request, session: SessionDep, raw: bytes, prompt_field: str) -> tuple[Any, dict[str, Any]] | JSONResponse:
    """Authenticate, parse and resolve (sync: it reads the database in FastAPI's thread pool)."""
    if (refused := _refused(request, session)) is not None:
        return refused
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        return openai_error(400, f"the request body is not valid JSON: {error}", "invalid_json")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "`model` is required: GET /v1/models lists the deployed ones", param="model")
    try:
        route = resolve_model(session, model)
    # /v1 answers in OpenAI's error shape (what its clients parse), not the panel's {"detail"}: the
    # one place a domain error is mapped outside app.main's handler.
    except DeploymentError as error:
        return openai_error(error.status_code, str(error), "model_not_found" if error.status_code == 404 else None, "model")
    if (limited := _admit(request, session, model)) is not None:  # a model that exists: a bounded label
        return limited
    if (invalid := _validate(body, route.max_model_len, prompt_field)) is not None:
        return invalid
    # The server knows the adapter by its own name; the answer keeps the one the caller used.
    body["model"] = route.upstream_model
    return route, body


def _admit(request: Request, session: SessionDep, model: str) -> JSONResponse | None:
    """A gateway key's model scope and rate limits (app/services/rate_limits.py); None: go on."""
    key_id = getattr(request.state, "gateway_key_id", None)
    if key_id is None:  # the playground's browser session
        return None
    try:
        request.state.admitted = rate_limits.admit(session, key_id, model)
    except rate_limits.KeyNotForModel as error:
        return openai_error(403, error.detail, "model_not_allowed", "model")
    except rate_limits.RateLimited as error:
        metrics.GATEWAY_RATE_LIMITED.labels(model).inc()
        refused = openai_error(429, error.detail, "rate_limit_exceeded")
        refused.headers["Retry-After"] = str(error.retry_after)
        return refused
    return None


@router.post("/chat/completions")
async def chat_completions(request: Request, session: SessionDep):
    return await _proxy(request, session, "chat/completions", prompt_field="messages")


@router.post("/completions")
async def completions(request: Request, session: SessionDep):
    """Plain text completion (`prompt` instead of `messages`), as the official clients'
    `completions.create` sends it."""
    return await _proxy(request, session, "completions", prompt_field="prompt")


async def _proxy(request: Request, session: SessionDep, path: str, *, prompt_field: str) -> Response:
    """Forward one request to the model's server: streamed chunk by chunk when it streams. Each
    answer is counted per served model (app/services/metrics.py)."""
    routed = await run_in_threadpool(_route, request, session, await request.body(), prompt_field)
    if isinstance(routed, JSONResponse):
        return routed
    route, body = routed
    started = time.perf_counter()

    def counted(status_code: int, usage: dict[str, Any] | None = None) -> None:
        metrics.record_gateway_request(route.upstream_model, status_code, time.perf_counter() - started, usage)
        if (admitted := getattr(request.state, "admitted", None)) is not None:
            rate_limits.record_tokens(admitted, usage)

    client = _client(request)
    upstream = client.build_request("POST", f"{route.url}/v1/{path}", json=body, headers=route.headers)
    try:
        response = await client.send(upstream, stream=True)
    except httpx.HTTPError as error:
        counted(502)
        return openai_error(502, f"the model's server did not answer: {error!r}")
    if response.status_code == 401:
        # The server refused the panel's secret, not the caller's key: passed through, the
        # caller would read it as "your API key is wrong".
        await response.aclose()
        counted(502)
        return openai_error(502, "the model's server refused the gateway's credentials (its secret does not "
                                 "match the panel's: restart the deployment)", "upstream_unauthorized")
    if body.get("stream") and response.status_code == 200:
        return StreamingResponse(
            _relay_counting(response, counted), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(response.aclose),
        )
    content = await response.aread()
    await response.aclose()
    counted(response.status_code, _usage(content))
    return Response(content, status_code=response.status_code,
                    media_type=response.headers.get("content-type", "application/json"))


async def _relay_counting(response: httpx.Response, counted) -> AsyncIterator[bytes]:
    """The server's event stream as it comes; the usage of its last chunks (vLLM sends it when
    asked with stream_options) is counted once the stream ends."""
    tail = b""
    try:
        async for chunk in response.aiter_raw():
            tail = (tail + chunk)[-USAGE_TAIL_BYTES:]
            yield chunk
    finally:
        usage = None
        for line in reversed(tail.split(b"\n")):
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = _usage(line.removeprefix(b"data: "))
                if usage:
                    break
        counted(response.status_code, usage)


def _usage(content: bytes) -> dict[str, Any] | None:
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
