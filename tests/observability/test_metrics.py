"""MetricsMiddleware through the example gateway: after a scripted mix of traffic the
metrics hold exactly the expected counts; label sets stay bounded; timing tells a stream's
first byte from its end; a client gone mid-stream is recorded as such."""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from example_app.standin import ReceivedRequest, create_standin
from gemini_scale import MetricsMiddleware
from tests.cache.support import call
from tests.gateway import build, dev_token, running

GENERATE = "/v1beta/models/{model}:generateContent"
COUNT = "/v1beta/models/{model}:countTokens"
STREAM = "/v1beta/models/{model}:streamGenerateContent"
BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello to the metrics"}]}]}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def requests(registry: CollectorRegistry, route: str, status: int, method: str = "POST",
             version: str = "v1beta") -> float:
    return value(
        registry, "http_server_request_duration_seconds_count", http_request_method=method,
        http_route=route, http_response_status_code=str(status), gemini_api_version=version,
    )


async def test_a_scripted_mix_gives_exact_counts() -> None:
    registry = CollectorRegistry()
    received: list[ReceivedRequest] = []
    app = build(
        {"GEMINI_SCALE_RATE_LIMIT": "5/minute", "GEMINI_SCALE_CACHE_TTL": "60"},
        standin=create_standin(received=received), registry=registry,
    )
    async with running(app) as client:
        usage_in = usage_out = 0
        for _ in range(2):  # two successes (not cached: no temperature 0)
            answer = await client.post("/v1/models/gemini-2.5-flash:generateContent", json=BODY)
            assert answer.status_code == 200
            usage = answer.json()["usageMetadata"]
            usage_in += usage["promptTokenCount"]
            usage_out += usage["totalTokenCount"] - usage["promptTokenCount"]
        for _ in range(2):  # a miss that is stored, then a hit
            counted = await client.post(
                "/v1beta/models/gemini-2.5-flash:countTokens", json=BODY
            )
            assert counted.status_code == 200
        streamed = await client.post(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent", params={"alt": "sse"},
            json=BODY,
        )
        assert streamed.status_code == 200
        missing = await client.post("/v1beta/models/no-such-model:generateContent", json=BODY)
        assert missing.status_code == 404  # the upstream's error, passed on
        limited = await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=BODY)
        assert limited.status_code == 429  # the 6th request of this principal and model
        anonymous = await client.post(
            "/v1beta/models/gemini-2.5-flash:generateContent", json=BODY,
            headers={"authorization": ""},
        )
        assert anonymous.status_code == 401
        reader = await dev_token(client, "gemini.read")
        forbidden = await client.post(
            "/v1beta/models/gemini-2.5-flash:generateContent", json=BODY,
            headers={"authorization": f"Bearer {reader}"},
        )
        assert forbidden.status_code == 403
        scraped = await client.get("/metrics")
    assert requests(registry, GENERATE, 200, version="v1") == 2
    assert requests(registry, COUNT, 200) == 2
    assert requests(registry, STREAM, 200) == 1
    assert requests(registry, GENERATE, 404) == 1
    assert requests(registry, GENERATE, 429) == 1
    assert requests(registry, GENERATE, 401) == 1
    assert requests(registry, GENERATE, 403) == 1
    assert value(registry, "gemini_scale_auth_refusals_total", reason="missing_credentials") == 1
    assert value(registry, "gemini_scale_auth_refusals_total", reason="insufficient_scope") == 1
    assert value(registry, "gemini_scale_ratelimit_decisions_total",
                 limit="requests 5/60s", outcome="refused") == 1
    assert value(registry, "gemini_scale_cache_results_total",
                 http_route=COUNT, result="stored") == 1
    assert value(registry, "gemini_scale_cache_results_total", http_route=COUNT, result="hit") == 1
    assert value(registry, "gemini_scale_tokens_total", gen_ai_request_model="gemini-2.5-flash",
                 tenant="(none)", gen_ai_token_type="input") >= usage_in
    labels = {"gen_ai_operation_name": "generate_content",
              "gen_ai_request_model": "gemini-2.5-flash", "gen_ai_provider_name": "gcp.gemini"}
    # every request to the route: 2 answered, 1 limited, 1 anonymous, 1 forbidden
    assert value(registry, "gen_ai_server_request_duration_seconds_count", **labels) == 5
    assert value(registry, "gen_ai_client_token_usage_sum", **labels,
                 gen_ai_token_type="output") == usage_out
    stream_labels = {**labels, "gen_ai_operation_name": "stream_generate_content"}
    assert value(registry, "gen_ai_server_time_to_first_token_seconds_count", **stream_labels) == 1
    assert value(registry, "gemini_scale_client_disconnects_total", http_route=STREAM) == 0
    assert scraped.status_code == 200
    assert "http_server_request_duration_seconds_bucket" in scraped.text
    # The upstream got the same request ids the clients got back.
    assert all(r.header("x-request-id") for r in received)


def _endpoint_app() -> Starlette:
    async def generate(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/v1beta/models/{model}:generateContent", generate,
                                   methods=["POST"])])


async def test_label_sets_stay_bounded_under_random_paths_and_models() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_endpoint_app(), registry=registry, access_log=False, max_models=5)
    rng = random.Random(7)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(10_000):
            junk = "".join(rng.choices(string.ascii_lowercase, k=12))
            await client.get(f"/{junk}/{rng.randint(0, 10**9)}")
        for i in range(50):
            await client.post(f"/v1beta/models/model-{i}:generateContent", json={})
    families = {m.name: m for m in registry.collect()}
    routes = {s.labels["http_route"] for s in families["http_server_request_duration_seconds"]
              .samples if "http_route" in s.labels}
    assert routes == {"(unmatched)", GENERATE}
    models = {s.labels["gen_ai_request_model"] for s in
              families["gen_ai_server_request_duration_seconds"].samples}
    assert len(models) == 6  # five model ids, then everything else is "(other)"
    assert "(other)" in models
    assert value(registry, "http_server_request_duration_seconds_count", http_request_method="GET",
                 http_route="(unmatched)", http_response_status_code="404",
                 gemini_api_version="none") == 10_000


def _streaming_app(delay: float) -> Starlette:
    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f'data: {{"i": {i}}}\r\n\r\n'.encode()
                await asyncio.sleep(delay)

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1beta/models/{model}:streamGenerateContent", stream,
                                   methods=["POST"])])


async def test_a_stream_has_a_first_byte_before_its_end_and_a_gone_client_is_counted() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(_streaming_app(0.05), registry=registry, access_log=False)
    recorded = await call(app, "POST", "/v1beta/models/m:streamGenerateContent",
                          json_body={})
    assert recorded.status == 200
    labels = {"http_request_method": "POST", "http_route": STREAM}
    first = value(registry, "gemini_scale_time_to_first_byte_seconds_sum", **labels)
    total = value(registry, "http_server_request_duration_seconds_sum", **labels,
                  http_response_status_code="200", gemini_api_version="none")
    assert first > 0
    assert total - first >= 0.2  # four 50 ms pauses come after the first event
    gone = await call(app, "POST", "/v1beta/models/m:streamGenerateContent",
                      json_body={}, disconnect_after=2)
    assert len(gone.chunks) == 2
    assert value(registry, "gemini_scale_client_disconnects_total", http_route=STREAM) == 1


async def test_request_ids_are_generated_replaced_or_kept_from_trusted_proxies() -> None:
    seen: list[str | None] = []

    async def echo(request: Request) -> Response:
        seen.append(request.headers.get("x-request-id"))
        return JSONResponse({}, headers={"x-request-id": "from-the-app"})

    app = Starlette(routes=[Route("/x", echo)])
    trusted = MetricsMiddleware(app, registry=CollectorRegistry(), access_log=False,
                                trusted_proxies=["127.0.0.0/8"])
    direct = await call(trusted, "GET", "/x", headers={"x-request-id": "proxy-id-123"})
    assert [v for k, v in direct.messages[0]["headers"] if k == b"x-request-id"] == [
        b"proxy-id-123"
    ]
    assert seen[-1] == "proxy-id-123"
    forged = await call(trusted, "GET", "/x", headers={"x-request-id": "bad id\r\nx: y"})
    generated = forged.headers["x-request-id"]
    assert len(generated) == 32
    assert seen[-1] == generated
    untrusted = MetricsMiddleware(app, registry=CollectorRegistry(), access_log=False)
    replaced = await call(untrusted, "GET", "/x", headers={"x-request-id": "client-chosen"})
    ids = [v for k, v in replaced.messages[0]["headers"] if k == b"x-request-id"]
    assert len(ids) == 1
    assert ids[0] != b"client-chosen"
    assert seen[-1] == ids[0].decode()
    again = await call(untrusted, "GET", "/x")
    assert again.headers["x-request-id"] != replaced.headers["x-request-id"]


def _records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__["access"] for r in caplog.records if r.name == "gemini_scale.access"]


async def test_one_access_record_per_request_with_the_decisions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="gemini_scale.access")
    app = build({"GEMINI_SCALE_CACHE_TTL": "60"}, registry=CollectorRegistry())
    async with running(app) as client:
        caplog.clear()
        for _ in range(2):
            await client.post("/v1/models/gemini-2.5-flash:countTokens", json=BODY)
    records = _records(caplog)
    assert len(records) == 2
    first, second = records
    assert first["route"] == COUNT
    assert first["api_version"] == "v1"
    assert first["model"] == "gemini-2.5-flash"
    assert first["status"] == 200
    assert first["principal"]
    assert first["cache"] == "stored"
    assert second["cache"] == "hit"
    assert "allowed" in first["rate_limit"]
    assert first["duration_ms"] >= first["ttfb_ms"] > 0
    assert first["request_id"] != second["request_id"]
    json.dumps(first)  # JSON-safe


async def test_a_refusal_is_counted_against_the_limit_that_refused_it() -> None:
    """Both limits spent, the daily one refuses for longest: it is the label, as it is the
    limit the 429's RateLimit header names (not the first limit of the policy)."""
    from gemini_scale import MemoryStore, RateLimitMiddleware, RateLimitPolicy
    from tests.clock import FakeClock

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    clock = FakeClock(1_800_000_040.0)
    limited = RateLimitMiddleware(
        Starlette(routes=[Route("/x", ok)]), store=MemoryStore(clock=clock), clock=clock,
        default=RateLimitPolicy.parse("1/second;2/day", key="client_ip"),
    )
    registry = CollectorRegistry()
    app = MetricsMiddleware(limited, registry=registry, access_log=False)
    statuses = [(await call(app, "GET", "/x")).status]
    clock.advance(2.5)
    statuses += [(await call(app, "GET", "/x")).status for _ in range(2)]
    assert statuses == [200, 200, 429]
    decisions = "gemini_scale_ratelimit_decisions_total"
    assert value(registry, decisions, limit="requests 2/86400s", outcome="refused") == 1


async def test_a_refusal_by_the_local_limits_of_a_failing_store_is_counted_as_refused() -> None:
    # The store is down (nothing listens on its port): under on_store_error="local" each
    # replica enforces the limits itself; its 429s are refusals of a limit, not "degraded".
    from gemini_scale import RateLimitMiddleware, RateLimitPolicy, store_from_url
    from tests.gateway import free_port

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    store = store_from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="test-degraded")
    limited = RateLimitMiddleware(Starlette(routes=[Route("/x", ok)]), store=store,
                                  default=RateLimitPolicy.parse("2/minute", key="client_ip"))
    registry = CollectorRegistry()
    app = MetricsMiddleware(limited, registry=registry, access_log=False)
    try:
        statuses = [(await call(app, "GET", "/x")).status for _ in range(3)]
    finally:
        await store.aclose()
    assert statuses == [200, 200, 429]
    decisions = "gemini_scale_ratelimit_decisions_total"
    assert value(registry, decisions, limit="requests 2/60s", outcome="refused") == 1
    assert value(registry, decisions, limit="any", outcome="degraded") == 2
