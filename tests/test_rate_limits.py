"""Gateway keys per deployment: model scope, requests and tokens per minute (429 with Retry-After
in OpenAI's shape) and usage per key per day, through the real app to a real OpenAI-shaped HTTP
server on 127.0.0.1 (test_gateway's, which reports 31 prompt and 1 completion tokens)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from app.models.base import utcnow
from app.models.deployment import InferenceServer
from app.models.gateway_key import GatewayKeyUsage
from app.models.user import ApiToken
from app.services import rate_limits
from app.services.rate_limits import RateLimited, SlidingWindows
from tests.test_gateway import CHINESE_REQUEST, _SecretServer, bearer, ready_model, secret_server  # noqa: F401

CHAT = {"model": "tiny-chat", **CHINESE_REQUEST}


@pytest.fixture
def served(session: Session, ready_model, secret_server) -> str:  # noqa: F811
    server = session.get(InferenceServer, ready_model.server_id)
    server.url = secret_server
    session.add(server)
    session.commit()
    return secret_server


def new_key(client, **fields) -> str:
    response = client.post("/api/v1/gateway-keys", json={"name": "limited", **fields})
    assert response.status_code == 201, response.text
    return response.json()["token"]


def test_a_limit_of_2_requests_per_minute_answers_429_on_the_3rd(client, anon_client, served) -> None:
    key = new_key(client, requests_per_minute=2)
    answers = [anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[2]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert len(_SecretServer.seen) == 2  # the refused one never reached the server
    # Another key is not held back by this one's limit.
    assert anon_client.post("/v1/chat/completions", headers=bearer(new_key(client)), json=CHAT).status_code == 200


def test_tokens_per_minute_count_the_servers_usage(client, anon_client, served) -> None:
    key = new_key(client, tokens_per_minute=40)
    codes = [anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT).status_code for _ in range(3)]
    # 32 tokens, then 64 (over 40 only once the second answer's usage is in), then refused.
    assert codes == [200, 200, 429]
    assert len(_SecretServer.seen) == 2


def test_a_key_for_one_deployment_may_not_call_another(client, anon_client, served) -> None:
    key = new_key(client, deployment_name="another-model")
    refused = anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert anon_client.get("/v1/models", headers=bearer(key)).json()["data"] == []
    assert _SecretServer.seen == []
    scoped = new_key(client, deployment_name="tiny-chat")
    assert anon_client.post("/v1/chat/completions", headers=bearer(scoped), json=CHAT).status_code == 200
    assert [m["id"] for m in anon_client.get("/v1/models", headers=bearer(scoped)).json()["data"]] == ["tiny-chat"]


def test_usage_per_key_per_day_is_counted_in_memory_and_flushed(client, anon_client, session, served) -> None:
    key = new_key(client)
    key_id = session.exec(select(ApiToken.id).where(ApiToken.kind == "gateway")).one()
    yesterday = utcnow().date() - timedelta(days=1)
    session.add(GatewayKeyUsage(token_id=key_id, day=yesterday, requests=5, prompt_tokens=50, completion_tokens=7))
    session.commit()
    for _ in range(2):
        assert anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT).status_code == 200

    def usage() -> list[tuple]:
        [listed] = client.get("/api/v1/gateway-keys").json()
        return [(u["day"], u["requests"], u["prompt_tokens"], u["completion_tokens"]) for u in listed["usage"]]

    today = utcnow().date()
    assert usage() == [(today.isoformat(), 2, 62, 2), (yesterday.isoformat(), 5, 50, 7)]  # not flushed yet
    assert session.get(GatewayKeyUsage, (key_id, today)) is None
    assert rate_limits.flush_usage() == 1  # one row for two requests
    session.expire_all()
    assert (session.get(GatewayKeyUsage, (key_id, today)).requests,
            session.get(GatewayKeyUsage, (key_id, today)).prompt_tokens) == (2, 62)
    assert anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT).status_code == 200
    assert usage()[0] == (today.isoformat(), 3, 93, 3)  # the row plus what is in memory
    rate_limits.flush_usage()
    session.expire_all()
    assert session.get(GatewayKeyUsage, (key_id, today)).requests == 3
    assert rate_limits.flush_usage() == 0  # nothing new: no write
    page = client.get("/deployments").text
    assert f"{today.isoformat()}: 3 · 93/3" in page and f"{yesterday.isoformat()}: 5 · 50/7" in page


def test_usage_left_in_memory_is_flushed_when_the_panel_stops(data_dir, session, client, anon_client, served) -> None:
    key = new_key(client)
    assert anon_client.post("/v1/chat/completions", headers=bearer(key), json=CHAT).status_code == 200
    anon_client.__exit__(None, None, None)  # this app's lifespan ends: it flushes
    session.expire_all()
    assert [row.requests for row in session.exec(select(GatewayKeyUsage))] == [1]


def test_the_page_creates_a_key_with_limits(client) -> None:
    page = client.post("/deployments/keys", headers={"HX-Request": "true"},
                       data={"name": "nightly", "deployment_name": "", "requests_per_minute": "30",
                             "tokens_per_minute": ""})
    assert "it is not shown again" in page.text and "30 req/min" in page.text
    refused = client.post("/deployments/keys", headers={"HX-Request": "true"},
                          data={"name": "bad", "requests_per_minute": "-3"})
    assert "whole numbers above 0" in refused.text
    [listed] = client.get("/api/v1/gateway-keys").json()
    assert (listed["name"], listed["requests_per_minute"], listed["tokens_per_minute"]) == ("nightly", 30, None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_windows_slide_and_retry_after_says_when_room_returns() -> None:
    clock = FakeClock()
    windows = SlidingWindows(clock)
    windows.admit(1, 2, None)
    clock.now += 20
    windows.admit(1, 2, None)
    with pytest.raises(RateLimited) as refused:
        windows.admit(1, 2, None)
    assert refused.value.retry_after == 40  # the first request leaves the window then
    clock.now += 40
    windows.admit(1, 2, None)  # room again
    windows.add_tokens(2, 30)
    clock.now += 30
    windows.add_tokens(2, 30)
    with pytest.raises(RateLimited) as refused:  # 60 tokens in the last minute, the limit is 50
        windows.admit(2, None, 50)
    assert refused.value.retry_after == 30  # once the first 30 have aged out, 30 < 50
    clock.now += 30
    windows.admit(2, None, 50)
