"""Benchmark the OpenAI-compatible gateway against calling vLLM directly, and deploy → ready.

    .venv/bin/python bench/bench_gateway.py [--concurrency 8] [--requests 48] [--max-tokens 64] [--rounds 3]
                                            [--broker redis://127.0.0.1:6379/15 | embedded]

Builds the tiny demo model and trains a LoRA adapter on it (llamafactory-cli, ~1 min), starts
the web app and a serving worker on a temp data dir, registers the model and deploys the adapter
(timing the click → ready), then runs the same streaming load (`--requests` chat completions,
`--concurrency` at a time, exactly `--max-tokens` tokens each via ignore_eos) alternately against
vLLM's own URL (with the server's secret, read from the panel's database) and through the gateway, `--rounds` times each. Reports completion tokens/s of each path, their ratio
(target ≥ 0.95), and the p50 time to first token and p50 request time of each (the gateway's
added latency is the difference). Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_deploy_serving import CHINESE_MESSAGES, Panel  # noqa: E402  (the same live panel as the tests)


def build_adapter(work: Path) -> tuple[Path, Path]:
    """The tiny model and a LoRA adapter trained on it, with the environments' own tools."""
    from app.demo import build_demo_model
    from tests.factories import train_tiny_adapter

    model = work / "tiny-model"
    build_demo_model(model)
    return model, train_tiny_adapter(model, work)


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed completion."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    return (first if first is not None else float("nan")), time.perf_counter() - started, tokens


async def load(url: str, headers: dict, model: str, args: argparse.Namespace) -> dict:
    body = {"model": model, "messages": CHINESE_MESSAGES, "max_tokens": args.max_tokens, "temperature": 0.7,
            "top_p": 0.8, "repetition_penalty": 1.05, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    semaphore = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        async def limited():
            async with semaphore:
                return await one_request(client, url, headers, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(limited() for _ in range(args.requests)))
        elapsed = time.perf_counter() - started
    tokens = sum(r[2] for r in results)
    return {
        "tokens_per_s": tokens / elapsed,
        "p50_ttft_ms": statistics.median(r[0] for r in results) * 1000,
        "p50_request_ms": statistics.median(r[1] for r in results) * 1000,
        "tokens": tokens,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15",
                        help="Broker of the panel (this Redis database is flushed); 'embedded' for SQLite.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        model, adapter = build_adapter(work)
        print(f"model + adapter built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if args.broker != "embedded":
            import redis

            redis.Redis.from_url(args.broker).flushdb()
        panel = Panel(work, None if args.broker == "embedded" else args.broker)
        panel.start()
        try:
            panel.register_model(model)  # the worker holds it: the panel schedules the server there
            run_id = panel.run(adapter, model, "bench").id
            clicked = time.perf_counter()
            created = panel.client.post("/api/v1/deployments", json={"run_id": run_id, "name": "bench-chat"}).json()
            deployment = panel.wait_for(created["id"], ("ready", "failed"))
            ready_s = time.perf_counter() - clicked
            assert deployment["status"] == "ready", deployment["server"]["log_tail"]
            print(f"deploy click → ready: {ready_s:.1f} s", file=sys.stderr)
            server_url = deployment["server"]["url"]
            # vLLM itself wants the server's secret (the gateway sends it); a caller's key is no use there.
            secret = {"Authorization": f"Bearer {panel.server_secret(deployment['server']['id'])}"}
            direct = (f"{server_url}/v1/chat/completions", secret, deployment["lora_name"])
            gateway = (f"{panel.url}/v1/chat/completions", {"Authorization": f"Bearer {panel.key}"}, "bench-chat")
            asyncio.run(load(*direct, argparse.Namespace(**{**vars(args), "requests": args.concurrency})))  # warm-up
            rounds: dict[str, list[dict]] = {"direct": [], "gateway": []}
            for index in range(args.rounds):
                for name, target in (("direct", direct), ("gateway", gateway)) if index % 2 == 0 else (
                        ("gateway", gateway), ("direct", direct)):
                    result = asyncio.run(load(*target, args))
                    rounds[name].append(result)
                    print(f"round {index + 1} {name:8s} {result['tokens_per_s']:8.1f} tok/s  "
                          f"p50 ttft {result['p50_ttft_ms']:7.1f} ms  p50 request {result['p50_request_ms']:7.1f} ms",
                          file=sys.stderr)
            panel.client.delete(f"/api/v1/deployments/{deployment['id']}")
        finally:
            panel.stop()

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in rounds[name])

    report = {
        "deploy_click_to_ready_s": round(ready_s, 2),
        "concurrency": args.concurrency, "requests_per_round": args.requests, "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "direct_tokens_per_s": round(mean("direct", "tokens_per_s"), 1),
        "gateway_tokens_per_s": round(mean("gateway", "tokens_per_s"), 1),
        "throughput_ratio": round(mean("gateway", "tokens_per_s") / mean("direct", "tokens_per_s"), 3),
        "direct_p50_ttft_ms": round(mean("direct", "p50_ttft_ms"), 1),
        "gateway_p50_ttft_ms": round(mean("gateway", "p50_ttft_ms"), 1),
        "added_p50_ttft_ms": round(mean("gateway", "p50_ttft_ms") - mean("direct", "p50_ttft_ms"), 1),
        "added_p50_request_ms": round(mean("gateway", "p50_request_ms") - mean("direct", "p50_request_ms"), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
