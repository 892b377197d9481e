"""Single flight: N identical concurrent misses make one upstream call, in one process and
across two uvicorn replicas sharing Redis; when the leader fails, the others still get
answers of their own (never the leader's error)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from gemini_scale.stores import RedisStore
from tests.cache.conftest import Backend
from tests.cache.support import COUNT, FakeAuth, Upstream, cached, eventually, who
from tests.servers import LiveServer, serve

REQUESTS = 20


async def crowd(client: httpx.AsyncClient, count: int = REQUESTS) -> list[httpx.Response]:
    return await asyncio.gather(*(
        client.post(COUNT, json={"contents": [{"parts": [{"text": "same"}]}]},
                    headers=who("alice"))
        for _ in range(count)
    ))


async def test_twenty_concurrent_misses_make_one_upstream_call(backend: Backend) -> None:
    upstream = Upstream(hold=asyncio.Event())
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        requests = asyncio.ensure_future(crowd(stack.client))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        await eventually(lambda: stack.engine.stats.waits == REQUESTS - 1)
        upstream.hold.set()  # type: ignore[union-attr]
        answers = await asyncio.wait_for(requests, 30)
    assert len(upstream.calls) == 1
    assert all(a.status_code == 200 and a.json()["n"] == 1 for a in answers)


async def test_when_the_leader_fails_the_waiters_still_get_answers(backend: Backend) -> None:
    upstream = Upstream(hold=asyncio.Event(), hold_first_only=True, fail=lambda n: n == 1)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        transport = httpx.ASGITransport(app=stack.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            requests = asyncio.ensure_future(crowd(client))
            await asyncio.wait_for(upstream.entered.wait(), 10)
            await eventually(lambda: stack.engine.stats.waits == REQUESTS - 1)
            upstream.hold.set()  # type: ignore[union-attr]
            answers = await asyncio.wait_for(requests, 30)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * (REQUESTS - 1) + [500]  # only the leader saw its failure
    assert all("upstream call 1" not in a.text for a in answers)


# -- two uvicorn replicas sharing Redis ----------------------------------------------------

SLOW = 0.4


def replica_app(url: str, prefix: str, calls: list[str], fail_first: bool) -> Any:
    """A replica: a slow upstream behind the cache on its own RedisStore (made lazily in
    the replica's event loop: a client is bound to the loop that uses it)."""

    async def slow(request: Request) -> Response:
        await request.body()
        with lock:
            calls.append(request.url.path)
            number = len(calls)
        await asyncio.sleep(SLOW)
        if fail_first and number == 1:
            return JSONResponse({"error": {"code": 503}}, status_code=503)
        return JSONResponse({"n": number})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await store.aclose()  # in the replica's loop, which owns its connections

    lock = threading.Lock()
    app = Starlette(routes=[Route(COUNT, slow, methods=["POST"])], lifespan=lifespan)
    store = RedisStore.from_url(url, prefix=prefix, socket_timeout=3, connect_timeout=3)
    rules = {COUNT: CachePolicy(ttl=60, methods=frozenset({"POST"}))}
    cache = CacheMiddleware(app, rules=rules, store=store, wait_timeout=10)
    cache.engine.poll_interval = 0.005
    return FakeAuth(cache)


@contextmanager
def replicas(url: str, prefix: str, calls: list[str], *, fail_first: bool) -> Iterator[
    list[LiveServer]
]:
    with ExitStack() as stack:
        yield [stack.enter_context(serve(replica_app(url, prefix, calls, fail_first)))
               for _ in range(2)]


@asynccontextmanager
async def clients(servers: list[LiveServer]) -> AsyncIterator[list[httpx.AsyncClient]]:
    # One Host for both, as a load balancer in front of them passes the client's on: the
    # host is part of the key.
    host = {"host": "gemini.example"}
    async with httpx.AsyncClient(base_url=servers[0].url, headers=host, timeout=20) as one, \
            httpx.AsyncClient(base_url=servers[1].url, headers=host, timeout=20) as two:
        yield [one, two]


def delete_prefixed(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


async def spread(pair: list[httpx.AsyncClient]) -> list[httpx.Response]:
    body = {"contents": [{"parts": [{"text": "same"}]}]}
    return await asyncio.gather(*(
        pair[i % 2].post(COUNT, json=body, headers=who("alice")) for i in range(REQUESTS)
    ))


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("leader_fails", [False, True])
async def test_two_replicas_sharing_redis(machine_redis_url: str, leader_fails: bool) -> None:
    """20 requests over two replicas: one upstream call; when the leader's call fails,
    the waiters call upstream themselves and never see its error."""
    prefix = f"gs-cache-sf-{uuid.uuid4().hex[:12]}"
    calls: list[str] = []
    try:
        with replicas(machine_redis_url, prefix, calls, fail_first=leader_fails) as servers:
            async with clients(servers) as pair:
                started = time.monotonic()
                answers = await spread(pair)
                elapsed = time.monotonic() - started
    finally:
        delete_prefixed(machine_redis_url, prefix)
    assert elapsed < 10
    statuses = sorted(a.status_code for a in answers)
    if not leader_fails:
        assert len(calls) == 1
        assert all(a.json() == {"n": 1} for a in answers)
        assert statuses == [200] * REQUESTS
    else:
        assert statuses == [200] * (REQUESTS - 1) + [503]
        assert all(a.json()["n"] >= 2 for a in answers if a.status_code == 200)
