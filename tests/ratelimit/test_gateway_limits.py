"""Rate limits in the example gateway (IPRateLimitMiddleware -> OAuth2Middleware ->
JSONBodyMiddleware -> RateLimitMiddleware -> app -> the offline stand-in): streaming
accounting (B23), buckets per tenant and shared across versions (B24), the SDK's view of
our 429, and each limiter counting a request once.

The gateway runs on real time with the memory store. Token budgets use a window of a
year (``1000000/year``), so a window boundary never falls inside a test and the bucket
probe reads settled counts exactly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from google import genai
from google.genai import errors, types
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from example_app.dev_issuer import DEV_ISSUER
from example_app.standin import StreamGate, create_standin
from gemini_scale import IPRateLimitMiddleware, RateLimitMiddleware, StreamingASGITransport
from tests.gateway import build, lifespan, running
from tests.ratelimit.helpers import bucket_usage, principal
from tests.sse import sse_events

MODEL = "gemini-2.5-flash"
PROMPT = "Tell me about rivers and mountains, at length." * 2
MAX_OUTPUT = 200
RESERVED = math.ceil(len(PROMPT) / 4) + MAX_OUTPUT
BODY = {
    "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
    "generationConfig": {"maxOutputTokens": MAX_OUTPUT},
}
SSE_PATH = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
TOKENS_ENV = {"GEMINI_SCALE_TOKEN_LIMIT": "1000000/year"}


def middleware(app: FastAPI, cls: type[Any]) -> Any:
    """The instance of ``cls`` (exactly) in the started app's middleware stack."""
    node: Any = app.middleware_stack
    while node is not None:
        if type(node) is cls:
            return node
        node = getattr(node, "app", None)
    raise AssertionError(f"no {cls.__name__} in the stack")


async def tokens_used(app: FastAPI, sub: str = "dev-user", tenant: str | None = None) -> float:
    limiter = middleware(app, RateLimitMiddleware)
    usage = await bucket_usage(limiter, principal(sub, tenant=tenant, iss=DEV_ISSUER), model=MODEL)
    return usage["tokens"]


async def settles_to(app: FastAPI, expected: float, within: float = 5.0) -> float:
    """The bucket's tokens once they equal ``expected`` (or whatever they are after
    ``within`` seconds): settlement finishes after the response is closed. Real time: a
    minute boundary crossed since the request weights the count just under its value."""
    deadline = time.monotonic() + within
    used = await tokens_used(app)
    while used != pytest.approx(expected, rel=0.05, abs=0.5) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        used = await tokens_used(app)
    return used


def usage_total(event: dict[str, Any]) -> int:
    total: int = event["usageMetadata"]["totalTokenCount"]
    return total


# -- B23: streaming accounting --------------------------------------------------------------


async def test_b23_a_complete_sse_stream_settles_to_its_last_usage() -> None:
    app = build(TOKENS_ENV)
    async with running(app) as client:
        response = await client.post(SSE_PATH, json=BODY)
        assert response.status_code == 200
        events = sse_events(response.content)
        total = usage_total(events[-1])
        assert 0 < total < RESERVED
        assert await settles_to(app, total) == pytest.approx(total, rel=0.05, abs=0.5)


async def test_b23_a_json_array_stream_settles_too() -> None:
    app = build(TOKENS_ENV)
    async with running(app) as client:
        path = f"/v1/models/{MODEL}:streamGenerateContent"
        response = await client.post(path, json=BODY)
        chunks = response.json()
        total = usage_total(chunks[-1])
        assert await settles_to(app, total) == pytest.approx(total, rel=0.05, abs=0.5)


async def test_b23_a_client_that_disconnects_mid_stream_is_charged_what_was_seen() -> None:
    gate = StreamGate(after=2)  # the stand-in holds the stream after two events
    app = build(TOKENS_ENV, standin=create_standin(gate=gate))
    async with running(app) as client:
        raw = b""
        async with client.stream("POST", SSE_PATH, json=BODY) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                raw += chunk
                if raw.count(b"\r\n\r\n") >= 2:
                    break
            assert await tokens_used(app) == RESERVED  # in flight: the reservation
        # Closed after two of at least four events: the upstream stream is cancelled.
        assert await gate.ended(5.0)
        assert gate.outcomes == ["cancelled"]
        seen = usage_total(sse_events(raw)[1])
        assert seen < RESERVED
        assert await settles_to(app, seen) == pytest.approx(seen, rel=0.05, abs=0.5)


async def test_b23_a_disconnect_after_the_headers_but_before_any_usage_charges_the_prompt(
) -> None:
    """No usage was reported before the client went away, but the upstream had started its
    answer, so it had the prompt: the prompt's estimate is charged and the output allowance
    given back (no reservation is held for output that never came)."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def silent() -> AsyncIterator[bytes]:
        started.set()
        try:
            await asyncio.sleep(30)  # cancelled when the client goes away
        finally:
            cancelled.set()
        yield b""

    def headers_only(request: Request) -> Response:
        return StreamingResponse(silent(), media_type="text/event-stream")

    app = build(TOKENS_ENV, standin=create_standin(fail_with=headers_only))
    async with running(app) as client:
        async with client.stream("POST", SSE_PATH, json=BODY) as response:
            assert response.status_code == 200
            await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(cancelled.wait(), 5)  # the disconnect reached the upstream
        prompt = RESERVED - MAX_OUTPUT
        assert await settles_to(app, prompt) == pytest.approx(prompt, rel=0.05, abs=0.5)


async def test_b23_a_disconnect_before_the_answer_started_refunds_the_reservation() -> None:
    """No answer started: nothing is known to be consumed upstream (its call was cancelled),
    so the reservation is given back; the request itself still counted."""
    app = build(TOKENS_ENV, standin=create_standin(latency=5))
    async with running(app) as client:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.post(SSE_PATH, json=BODY), 0.3)
        assert await settles_to(app, 0) == 0
        limiter = middleware(app, RateLimitMiddleware)
        usage = await bucket_usage(limiter, principal("dev-user", iss=DEV_ISSUER), model=MODEL)
        # The gateway's limits run on real time: if a minute boundary passed since the
        # request, its count sits in the previous window, weighted just under 1.
        assert usage["requests"] == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("status", [500, 429])
@pytest.mark.parametrize("path", [SSE_PATH, f"/v1beta/models/{MODEL}:generateContent"])
async def test_b23_an_upstream_error_refunds_the_token_reservation(
    status: int, path: str
) -> None:
    app = build(TOKENS_ENV, standin=create_standin(fail_with=status))
    async with running(app) as client:
        response = await client.post(path, json=BODY)
        assert response.status_code == status
        assert await settles_to(app, 0) == 0


# -- B24: per tenant, and shared across versions --------------------------------------------


async def test_b24_the_same_subject_under_two_tenants_has_two_buckets() -> None:
    app = build({"GEMINI_SCALE_RATE_LIMIT": "2/hour"})
    async with running(app, scope=None) as client:
        issuer = app.state.dev_issuer

        async def generate(tenant: str) -> int:
            token = issuer.mint(subject="alice", tenant=tenant)
            response = await client.post(
                f"/v1beta/models/{MODEL}:generateContent",
                json=BODY,
                headers={"authorization": f"Bearer {token}"},
            )
            return response.status_code

        assert [await generate("tenant-1") for _ in range(3)] == [200, 200, 429]
        assert [await generate("tenant-2") for _ in range(3)] == [200, 200, 429]


async def test_b24_v1_and_v1beta_share_one_bucket_by_default() -> None:
    app = build({"GEMINI_SCALE_RATE_LIMIT": "2/hour"})
    async with running(app) as client:
        statuses = [
            (await client.post(f"/{v}/models/{MODEL}:generateContent", json=BODY)).status_code
            for v in ("v1", "v1beta", "v1", "v1beta")
        ]
    assert statuses == [200, 200, 429, 429]


async def test_the_default_budget_is_per_principal_and_model() -> None:
    app = build({"GEMINI_SCALE_RATE_LIMIT": "1/hour"})
    async with running(app) as client:
        statuses = [
            (await client.post(f"/v1beta/models/{m}:generateContent", json=BODY)).status_code
            for m in ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash")
        ]
    assert statuses == [200, 200, 429]


# -- the SDK's view ---------------------------------------------------------------------------


async def test_the_sdk_surfaces_our_429_as_its_own_client_error() -> None:
    app = build({"GEMINI_SCALE_RATE_LIMIT": "2/hour"})
    async with running(app) as client:
        sdk = genai.Client(
            api_key="unused-the-gateway-holds-the-key",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                api_version="v1beta",
                headers={"Authorization": client.headers["authorization"]},
                httpx_async_client=client,
            ),
        )
        for _ in range(2):
            answer = await sdk.aio.models.generate_content(model=MODEL, contents="Hello")
            assert answer.text
        with pytest.raises(errors.ClientError) as caught:
            await sdk.aio.models.generate_content(model=MODEL, contents="Hello")
    assert caught.value.code == 429
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    kinds = [detail["@type"] for detail in caught.value.details["error"]["details"]]
    assert kinds == [
        "type.googleapis.com/google.rpc.QuotaFailure",
        "type.googleapis.com/google.rpc.RetryInfo",
    ]


# -- each limiter counts a request once ----------------------------------------------------------


async def test_a_public_request_counts_once_in_each_limiter() -> None:
    """Without a principal the principal limiter keys on the client address, like the
    per-address limiter; each counts a request once, in its own counter (when they shared
    one, each request counted twice: with a limit of 3, only 2 requests passed)."""
    app = build({"GEMINI_SCALE_RATE_LIMIT": "3/hour", "GEMINI_SCALE_IP_RATE_LIMIT": "100/hour"})
    async with lifespan(app):
        transport = StreamingASGITransport(app, client=("192.0.2.10", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            statuses = [(await client.get("/openapi.json")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        ip_limiter = middleware(app, IPRateLimitMiddleware)
        usage = await bucket_usage(ip_limiter, None, model=None, client=("192.0.2.10", 5555))
        assert usage == {"requests": pytest.approx(4, abs=0.01)}
