"""`/metrics`: Prometheus' text format behind its own token, read back with prometheus-client's own
parser: runs by status, the queue, the workers' GPUs, and what the gateway served."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from app.models import Run
from app.models.deployment import InferenceServer
from app.settings import get_settings
from tests.factories import run_config_factory
from tests.test_gateway import CHINESE_REQUEST, bearer, gateway_key, ready_model, secret_server  # noqa: F401

TOKEN = "prometheus-scrapes-with-this"


@pytest.fixture(autouse=True)
def metrics_token(monkeypatch: pytest.MonkeyPatch, data_dir) -> None:
    monkeypatch.setenv("TUNEBOARD_METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=bearer(TOKEN))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_need_their_own_token(anon_client, client, monkeypatch) -> None:
    assert anon_client.get("/metrics").status_code == 401
    assert client.get("/metrics").status_code == 401  # a logged-in user is not Prometheus
    assert anon_client.get("/metrics", headers=bearer(get_settings().worker_token)).status_code == 401
    monkeypatch.delenv("TUNEBOARD_METRICS_TOKEN")
    get_settings.cache_clear()
    assert anon_client.get("/metrics", headers=bearer(TOKEN)).status_code == 404  # off without a token


def test_runs_the_queue_and_the_workers(anon_client, client, session: Session) -> None:
    config = run_config_factory(session)
    for status in ("queued", "queued", "running", "succeeded"):
        session.add(Run(name=status, config_id=config.id, status=status))
    session.commit()
    gpu = {"index": 0, "name": "H200", "memory_total_mib": 143771.0, "memory_used_mib": 2048.0, "utilization": 87.0}
    client.post("/internal/v1/workers/heartbeat", headers=bearer(get_settings().worker_token),
                json={"worker_id": "gpu@box", "hostname": "box", "gpus": [gpu]})
    samples = scrape(anon_client)
    assert samples[("tuneboard_runs", (("status", "queued"),))] == 2
    assert samples[("tuneboard_runs", (("status", "running"),))] == 1
    assert samples[("tuneboard_runs", (("status", "lost"),))] == 0
    assert samples[("tuneboard_queue_depth", ())] == 2
    assert samples[("tuneboard_queue_oldest_wait_seconds", ())] >= 0
    assert samples[("tuneboard_worker_online", (("worker", "gpu@box"),))] == 1
    assert samples[("tuneboard_worker_gpu_utilization_percent", (("gpu", "0"), ("worker", "gpu@box")))] == 87.0
    assert samples[("tuneboard_worker_gpu_memory_used_bytes", (("gpu", "0"), ("worker", "gpu@box")))] == 2048 * 2**20


def test_gateway_requests_tokens_and_latency_per_model(anon_client, session, gateway_key, ready_model,
                                                        secret_server) -> None:
    server = session.get(InferenceServer, ready_model.server_id)
    before = scrape(anon_client)
    served = ("model", "tiny-chat"), ("status", "200")
    for _ in range(2):
        assert anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                                json={"model": "tiny-chat", **CHINESE_REQUEST}).status_code == 502  # nothing at :9
    server.url = secret_server
    session.add(server)
    session.commit()
    assert anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                            json={"model": "tiny-chat", **CHINESE_REQUEST}).status_code == 200
    after = scrape(anon_client)

    def grew(name: str, labels: tuple) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("tuneboard_gateway_requests_total", served) == 1
    assert grew("tuneboard_gateway_requests_total", (("model", "tiny-chat"), ("status", "502"))) == 2
    assert grew("tuneboard_gateway_tokens_total", (("kind", "prompt"), ("model", "tiny-chat"))) == 31
    assert grew("tuneboard_gateway_tokens_total", (("kind", "completion"), ("model", "tiny-chat"))) == 1
    assert grew("tuneboard_gateway_request_seconds_count", (("model", "tiny-chat"),)) == 3


def test_users_shares_webhook_deliveries_and_rate_limited_requests(anon_client, client, session, gateway_key,
                                                                    ready_model, secret_server) -> None:
    from sqlmodel import select

    from app.models import User
    from app.models.gateway_key import GatewayKeyLimit
    from app.models.user import ApiToken
    from app.models.webhook import Webhook, WebhookDelivery
    from app.services import quotas, scheduler

    admin = session.exec(select(User)).first()
    config = run_config_factory(session)
    session.add(Run(name="queued", config_id=config.id, status="queued", owner_id=admin.id))
    session.commit()
    quotas.set_user_gpu_cap(session, 2)
    scheduler.schedule(session)
    hook = Webhook(user_id=admin.id, url="http://127.0.0.1:9/hook", events=["run.failed"], secret="s")
    session.add(hook)
    session.flush()
    session.add(WebhookDelivery(webhook_id=hook.id, event="run.failed", body="{}", status="failed"))
    key_id = session.exec(select(ApiToken.id).where(ApiToken.kind == "gateway")).one()
    session.add(GatewayKeyLimit(token_id=key_id, requests_per_minute=1))
    session.commit()
    server = session.get(InferenceServer, ready_model.server_id)
    server.url = secret_server
    session.add(server)
    session.commit()
    codes = [anon_client.post("/v1/chat/completions", headers=bearer(gateway_key),
                              json={"model": "tiny-chat", **CHINESE_REQUEST}).status_code for _ in range(2)]
    assert codes == [200, 429]
    samples = scrape(anon_client)
    assert samples[("tuneboard_user_queued_runs", (("user", "admin"),))] == 1
    assert samples[("tuneboard_user_gpus_in_use", (("user", "admin"),))] == 0
    assert samples[("tuneboard_user_gpu_cap", ())] == 2
    assert samples[("tuneboard_webhook_deliveries", (("status", "failed"),))] == 1
    assert samples[("tuneboard_webhook_deliveries", (("status", "pending"),))] == 0
    assert samples[("tuneboard_gateway_rate_limited_total", (("model", "tiny-chat"),))] >= 1
