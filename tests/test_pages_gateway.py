"""/v1/completions through the gateway with the official `openai` client: routed by `model` to
the deployment's server (a stand-in OpenAI server on loopback that records what it is sent),
streamed and not, with the server's own secret; refusals in OpenAI's shape. The same call against
a real vLLM is in test_deploy_serving.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.models.base import utcnow
from app.models.deployment import Deployment, InferenceServer
from app.models.user import User
from app.services.users import create_token

SERVER_SECRET = "the-servers-own-secret"


class StandInServer(BaseHTTPRequestHandler):
    """Answers /v1/completions as vLLM does, and remembers each request."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        choice = {"index": 0, "text": " four", "logprobs": None, "finish_reason": "length"}
        answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"],
                  "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text in (" fo", "ur"):
                chunk = {**answer, "choices": [{**choice, "text": text, "finish_reason": None}], "usage": None}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[str]:
    StandInServer.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def gateway(client: TestClient, session: Session, stand_in: str) -> openai.OpenAI:
    """The official client, talking to the real app (the test client is its HTTP client), with a
    gateway key, and a ready deployment `tiny-chat` on the stand-in server."""
    server = InferenceServer(base_model_path="/models/tiny", base_name="tiny", status="ready", url=stand_in,
                             max_model_len=2048, ready_at=utcnow(), api_key=SERVER_SECRET)
    session.add(server)
    session.flush()
    session.add(Deployment(name="tiny-chat", server_id=server.id, lora_name="lora-7", status="ready", ready_at=utcnow()))
    session.commit()
    _token, key = create_token(session, session.exec(select(User)).first(), "tests", kind="gateway")
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def test_completions_create_reaches_the_deployment(gateway) -> None:
    completion = gateway.completions.create(model="tiny-chat", prompt="two plus two is", max_tokens=1, temperature=0)
    assert completion.choices[0].text == " four" and completion.usage.completion_tokens == 1
    [sent] = StandInServer.received
    assert sent["path"] == "/v1/completions"
    assert sent["body"] == {"model": "lora-7", "prompt": "two plus two is", "max_tokens": 1, "temperature": 0}
    assert sent["auth"] == f"Bearer {SERVER_SECRET}"  # the server's secret, never the caller's key


def test_completions_stream_chunk_by_chunk(gateway) -> None:
    stream = gateway.completions.create(model="tiny-chat", prompt="two plus two is", max_tokens=2, stream=True)
    assert [chunk.choices[0].text for chunk in stream] == [" fo", "ur"]


def test_completions_refusals_are_in_openai_shape(gateway) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        gateway.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context length is 2048"):
        gateway.completions.create(model="tiny-chat", prompt="hi", max_tokens=4096)
    with pytest.raises(openai.BadRequestError, match="`prompt` must be"):
        gateway.completions.create(model="tiny-chat", prompt=[])
    assert StandInServer.received == []  # nothing refused reached the server
