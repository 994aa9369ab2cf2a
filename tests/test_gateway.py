"""The gateway's refusals, through the real app and a real ready deployment row (no server
process is needed to refuse). Chatting through a real vLLM is in test_deploy_serving.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.models.base import utcnow
from app.models.deployment import Deployment, InferenceServer
from app.models.user import ApiToken, User
from app.services.users import create_token, revoke_token

CHINESE_REQUEST = {
    "messages": [{"role": "system", "content": "你是Qwen，由阿里云创建。你是一个乐于助人的助手。"},
                 {"role": "user", "content": "你是谁？"}],
    "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 512,
}
SERVER_SECRET = "the-servers-own-secret"


@pytest.fixture
def ready_model(session: Session) -> Deployment:
    """A ready deployment on a ready server (at a port nothing listens on)."""
    server = InferenceServer(base_model_path="/models/tiny", base_name="tiny", status="ready",
                             url="http://127.0.0.1:9", max_model_len=2048, ready_at=utcnow(),
                             api_key=SERVER_SECRET)
    session.add(server)
    session.flush()
    deployment = Deployment(name="tiny-chat", server_id=server.id, lora_name="tiny-chat", status="ready",
                            ready_at=utcnow())
    session.add(deployment)
    session.commit()
    return deployment


@pytest.fixture
def gateway_key(session: Session, client: TestClient) -> str:
    user = session.exec(select(User)).first()
    _token, raw = create_token(session, user, "tests", kind="gateway")
    return raw


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_is_401_in_openai_shape(anon_client, ready_model):
    response = anon_client.post("/v1/chat/completions", json={"model": "tiny-chat", **CHINESE_REQUEST})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert anon_client.get("/v1/models").status_code == 401


def test_a_revoked_key_is_401(anon_client, session, gateway_key, ready_model):
    assert anon_client.get("/v1/models", headers=bearer(gateway_key)).status_code == 200
    user = session.exec(select(User)).first()
    key = session.exec(select(ApiToken).where(ApiToken.kind == "gateway")).one()
    assert revoke_token(session, user, key.id, kind="gateway")
    response = anon_client.get("/v1/models", headers=bearer(gateway_key))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_personal_api_token_is_not_a_gateway_key(anon_client, session, client, ready_model):
    user = session.exec(select(User)).first()
    _token, raw = create_token(session, user, "cli", kind="api")
    assert anon_client.get("/v1/models", headers=bearer(raw)).status_code == 401


def test_models_lists_ready_adapters_and_their_base(anon_client, gateway_key, ready_model):
    models = anon_client.get("/v1/models", headers=bearer(gateway_key)).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-chat", "tiny"]


def test_unknown_model_is_404(anon_client, gateway_key, ready_model):
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "nope", **CHINESE_REQUEST})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_malformed_json_is_400(anon_client, gateway_key, ready_model):
    response = anon_client.post("/v1/chat/completions", headers={**bearer(gateway_key), "Content-Type": "application/json"},
                                content=b'{"model": "tiny-chat", "messages": [')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key), json=["not", "an", "object"])
    assert response.status_code == 400
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key), json={"model": "tiny-chat"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_max_tokens_beyond_the_model_length_is_a_clear_400(anon_client, gateway_key, ready_model):
    body = {"model": "tiny-chat", **CHINESE_REQUEST, "max_tokens": 100_000}
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key), json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "context length is 2048" in error["message"]


def test_a_model_not_ready_yet_is_409(anon_client, session, gateway_key, ready_model):
    ready_model.status = "starting"
    session.add(ready_model)
    session.commit()
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "tiny-chat", **CHINESE_REQUEST})
    assert response.status_code == 409 and "starting" in response.json()["error"]["message"]


def test_an_unreachable_server_is_502(anon_client, gateway_key, ready_model):
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "tiny-chat", **CHINESE_REQUEST})
    assert response.status_code == 502


def test_the_browser_session_needs_the_csrf_header(client, ready_model):
    """The playground calls the gateway with the session cookie; a cross-site form cannot."""
    assert client.get("/v1/models").status_code == 200
    body = {"model": "nope", **CHINESE_REQUEST}
    assert client.post("/v1/chat/completions", json=body).status_code == 404  # authenticated
    response = client.post("/v1/chat/completions", json=body, headers={"X-CSRF-Token": "forged"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "csrf"


def test_keys_are_created_once_and_revoked_on_the_deployments_page(client, anon_client, session):
    created = client.post("/deployments/keys", data={"name": "notebook"}, headers={"HX-Request": "true"})
    assert "copy it now" in created.text
    raw = created.text.split('id="new-gateway-key">')[1].split("<")[0]
    assert anon_client.get("/v1/models", headers=bearer(raw)).status_code == 200
    page = client.get("/deployments").text
    assert "notebook" in page and raw not in page  # hashed at rest: never shown again
    key_id = session.exec(select(ApiToken).where(ApiToken.kind == "gateway")).one().id
    client.post(f"/deployments/keys/{key_id}/revoke", headers={"HX-Request": "true"})
    assert anon_client.get("/v1/models", headers=bearer(raw)).status_code == 401
    assert "No keys yet" in client.get("/deployments").text


class _SecretServer(BaseHTTPRequestHandler):
    """Stands in for an inference server behind its secret, as vLLM's --api-key guards /v1: a 401
    without it. Records what the gateway sent."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {SERVER_SECRET}":
            status, answer = 401, {"error": "Unauthorized"}
        else:
            status, answer = 200, {"id": "c1", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 31, "completion_tokens": 1, "total_tokens": 32}}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def secret_server() -> Iterator[str]:
    _SecretServer.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SecretServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_the_gateway_sends_the_servers_secret_not_the_callers_key(anon_client, session, gateway_key, ready_model,
                                                                  secret_server):
    server = session.get(InferenceServer, ready_model.server_id)
    server.url = secret_server
    session.add(server)
    session.commit()
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "tiny-chat", **CHINESE_REQUEST})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hi"
    [sent] = _SecretServer.seen
    assert sent["path"] == "/v1/chat/completions"
    assert sent["authorization"] == f"Bearer {SERVER_SECRET}"  # never the caller's gateway key
    assert sent["body"]["model"] == "tiny-chat" and sent["body"]["messages"] == CHINESE_REQUEST["messages"]

    # A server that refuses the panel's secret is the panel's problem, not a bad key of the caller.
    server.api_key = "a-stale-secret"
    session.add(server)
    session.commit()
    response = anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "tiny-chat", **CHINESE_REQUEST})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unauthorized"
    assert len(_SecretServer.seen) == 2 and _SecretServer.seen[1]["authorization"] == "Bearer a-stale-secret"
