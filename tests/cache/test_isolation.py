"""Isolation under load: many principals sending overlapping requests at once; no answer
ever reaches a principal other than the one it was made for. And the rate limiter in front
charges a hit its request but no tokens."""

from __future__ import annotations

import asyncio
import random

import httpx

from gemini_scale import Principal, RateLimitMiddleware, RateLimitPolicy
from gemini_scale.caching import CacheMiddleware
from tests.cache.conftest import Backend
from tests.cache.support import (
    COUNT,
    GENERATE,
    ISSUER,
    MODEL_GET,
    MODELS,
    RULES,
    FakeAuth,
    Upstream,
    cached,
    gemini_app,
    generate_body,
    who,
)
from tests.ratelimit.helpers import bucket_usage


async def test_no_answer_reaches_another_principal(backend: Backend) -> None:
    rng = random.Random(20261128)  # a fixed seed: the same interleavings on every run
    principals = [(f"user-{i}", rng.choice([None, "acme", "globex"])) for i in range(12)]
    upstream = Upstream(delay=0.001)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:

        async def one(sub: str, tenant: str | None) -> None:
            kind = rng.randrange(4)
            headers = who(sub, tenant=tenant)
            if kind == 0:
                answer = await stack.client.get(MODEL_GET, headers=headers)
            elif kind == 1:
                answer = await stack.client.post(COUNT, json={"contents": [rng.randrange(3)]},
                                                 headers=headers)
            elif kind == 2:
                answer = await stack.client.post(
                    GENERATE, json=generate_body(f"q{rng.randrange(3)}"), headers=headers)
            else:
                answer = await stack.client.get(MODELS, headers=headers)  # shared by design
                assert answer.status_code == 200
                return
            assert answer.status_code == 200
            made_for = answer.json()
            assert (made_for["principal"], made_for["tenant"]) == (sub, tenant), (
                sub, tenant, made_for, answer.headers.get("cache-status"))

        for _ in range(6):
            batch = [one(*rng.choice(principals)) for _ in range(60)]
            await asyncio.gather(*batch)
        stats = stack.engine.stats
        assert stats.hits + stats.coalesced > 50  # the test did exercise the cache
        assert stats.misses > 20


async def test_a_hit_charges_its_request_but_no_tokens(backend: Backend) -> None:
    upstream = Upstream()
    upstream.content = (
        b'{"candidates": [], "usageMetadata": {"promptTokenCount": 30, "totalTokenCount": 45}}'
    )
    store = backend.store()
    cache = CacheMiddleware(gemini_app(upstream), rules=RULES, store=store, clock=backend.clock)
    limiter = RateLimitMiddleware(
        cache,
        store=store,
        clock=backend.clock,
        default=RateLimitPolicy.parse("100/minute", tokens="100000/minute"),
    )
    transport = httpx.ASGITransport(app=FakeAuth(limiter))
    alice = Principal(issuer=ISSUER, subject="alice")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = generate_body("same")
        await client.post(GENERATE, json=body, headers=who("alice"))
        assert await bucket_usage(limiter, alice) == {"requests": 1, "tokens": 45}
        second = await client.post(GENERATE, json=body, headers=who("alice"))
        assert second.headers["cache-status"] == "gemini-scale; hit"
        assert await bucket_usage(limiter, alice) == {"requests": 2, "tokens": 45}
    assert len(upstream.calls) == 1
