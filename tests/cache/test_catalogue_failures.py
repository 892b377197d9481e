"""research/security.md §4C, through HTTP: broken answers, huge answers, stampedes and a
failing store (C13, C14, C16, C17, C22)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import GeminiUpstream
from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from gemini_scale.stores import MemoryStore, RedisStore
from gemini_scale.types import Message
from tests.cache.conftest import Backend
from tests.cache.support import (
    COUNT,
    MODEL_GET,
    FakeAuth,
    Upstream,
    cached,
    call,
    eventually,
    http_scope,
    who,
)
from tests.servers import serve

BROKEN = "/broken"
HUGE = "/huge"


def broken_app(calls: list[int], *, fail_after: int | None = 1) -> Starlette:
    """``/broken``: a cacheable JSON answer that sends its headers, part of its body, then
    fails (``fail_after`` chunks; ``None``: it completes)."""

    async def broken(request: Request) -> Response:
        calls.append(1)

        async def body() -> AsyncIterator[bytes]:
            for index in range(4):
                if fail_after is not None and index == fail_after:
                    raise RuntimeError("the upstream connection was reset")
                yield b'{"part": %d}' % index if index == 0 else b" " * 8

        return StreamingResponse(body(), media_type="application/json",
                                 headers={"content-length": "35"})

    return Starlette(routes=[Route(BROKEN, broken)])


@asynccontextmanager
async def resetting_upstream(calls: list[int]) -> AsyncIterator[int]:
    """A raw TCP "Gemini" that sends a cacheable 200's headers and half its body, then
    resets the connection (``SO_LINGER`` 0: an RST, not a clean close). Yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        calls.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 64\r\n\r\n" + b'{"totalTokens": 1, "pad": "' + b"x" * 5)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_C13_an_upstream_reset_mid_body_is_not_stored_or_ended_cleanly() -> None:
    """Gateway (uvicorn) -> cache -> the real upstream client -> a TCP peer that resets."""
    calls: list[int] = []
    async with resetting_upstream(calls) as port:

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with GeminiUpstream(base_url=f"http://127.0.0.1:{port}") as upstream:
                app.state.upstream = upstream
                yield

        async def relay(request: Request) -> Response:
            upstream: GeminiUpstream = request.app.state.upstream
            return await upstream.forward(request)

        app = Starlette(routes=[Route(COUNT, relay, methods=["POST"])], lifespan=lifespan)
        rules = {COUNT: CachePolicy(ttl=60, methods=frozenset({"POST"}))}
        cache = CacheMiddleware(app, rules=rules)
        with serve(FakeAuth(cache)) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                for _ in range(2):
                    with pytest.raises(httpx.RemoteProtocolError):  # never a clean short end
                        await client.post(COUNT, json={"contents": []}, headers=who("alice"))
    assert len(calls) == 2  # the second request was a miss that reached the upstream
    assert cache.engine.stats.stored == 0


async def test_C13_in_process(backend: Backend) -> None:
    calls: list[int] = []
    cache = CacheMiddleware(broken_app(calls), rules={BROKEN: CachePolicy(ttl=60)},
                            store=backend.store(), clock=backend.clock)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="reset"):
            await call(FakeAuth(cache), "GET", BROKEN, headers=who("alice"))
    assert len(calls) == 2
    assert cache.engine.stats.stored == 0


async def test_C14_an_exception_before_the_start_is_a_500_and_not_stored(
    backend: Backend,
) -> None:
    upstream = Upstream(fail=lambda n: n == 1)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        recorded: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            recorded.append(message)

        with pytest.raises(RuntimeError, match="upstream call 1 failed"):
            await stack.app(http_scope("GET", MODEL_GET, headers=who("alice")), receive, send)
        assert recorded[0]["status"] == 500  # Starlette's ServerErrorMiddleware answered
        answer = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert answer.json()["n"] == 2
        assert answer.headers["cache-status"] == "gemini-scale; fwd=miss; stored"


async def test_C14_an_exception_after_the_first_chunk_is_the_apps_own(backend: Backend) -> None:
    calls: list[int] = []
    cache = CacheMiddleware(broken_app(calls, fail_after=2), rules={BROKEN: CachePolicy(ttl=60)},
                            store=backend.store(), clock=backend.clock)
    with pytest.raises(RuntimeError, match="reset"):  # not "response already started"
        await call(FakeAuth(cache), "GET", BROKEN, headers=who("alice"))
    assert cache.engine.stats.stored == 0
    whole = CacheMiddleware(broken_app(calls, fail_after=None),
                            rules={BROKEN: CachePolicy(ttl=60)}, store=backend.store(),
                            clock=backend.clock)
    done = await call(FakeAuth(whole), "GET", BROKEN, headers=who("alice"))
    assert done.complete
    assert whole.engine.stats.stored == 1


# -- C16: huge answers ---------------------------------------------------------------------

CHUNK = 64 * 1024
TOTAL = 50 * 1024 * 1024
LIMIT = 1024 * 1024


def huge_app() -> Starlette:
    async def huge(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            pattern = bytes(range(256)) * (CHUNK // 256)
            for index in range(TOTAL // CHUNK):
                yield bytes(bytearray(pattern[:-1]) + bytes([index % 256]))  # a new object

        return StreamingResponse(body(), media_type="application/json")

    return Starlette(routes=[Route(HUGE, huge)])


@pytest.mark.slow
async def test_C16_a_huge_answer_passes_intact_and_is_not_kept(backend: Backend) -> None:
    cache = CacheMiddleware(huge_app(), rules={HUGE: CachePolicy(ttl=60)},
                            store=backend.store(), clock=backend.clock, max_entry_bytes=LIMIT)
    app = FakeAuth(cache)
    expected = hashlib.sha256()
    pattern = bytes(range(256)) * (CHUNK // 256)
    for index in range(TOTAL // CHUNK):
        expected.update(pattern[:-1] + bytes([index % 256]))
    received = hashlib.sha256()
    size = 0

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: Message) -> None:
        nonlocal size
        if message["type"] == "http.response.body":
            received.update(message.get("body", b""))
            size += len(message.get("body", b""))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        await app(http_scope("GET", HUGE, headers=who("alice")), receive, send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == TOTAL
    assert received.digest() == expected.digest()
    assert cache.engine.stats.stored == 0
    assert peak - base <= LIMIT + 4 * CHUNK, peak - base  # the limit plus a few chunks in flight


# -- C17: stampedes ------------------------------------------------------------------------


async def stampede(stack: Any, count: int, body: Any = None) -> list[httpx.Response]:
    return await asyncio.gather(*(
        stack.client.post(COUNT, json=body or {"contents": []}, headers=who("alice"))
        for _ in range(count)
    ))


async def test_C17a_a_stampede_makes_one_upstream_call(backend: Backend) -> None:
    upstream = Upstream(hold=asyncio.Event())
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        crowd = asyncio.ensure_future(stampede(stack, 100))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        await eventually(lambda: stack.engine.stats.waits == 99)  # all queued behind the leader
        upstream.hold.set()  # type: ignore[union-attr]
        answers = await asyncio.wait_for(crowd, 30)
        assert len(upstream.calls) == 1
        assert {a.content for a in answers} == {answers[0].content}
        statuses = sorted(a.headers["cache-status"] for a in answers)
        assert statuses.count("gemini-scale; fwd=miss; stored") == 1
        assert statuses.count("gemini-scale; fwd=miss; collapsed") == 99
        assert stack.engine.stats.coalesced == 99


@pytest.mark.parametrize("control", ["private", "no-store"])
async def test_C17b_followers_of_an_uncacheable_leader_call_upstream_themselves(
    backend: Backend, control: str
) -> None:
    upstream = Upstream(hold=asyncio.Event(), headers={"cache-control": control})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        crowd = asyncio.ensure_future(stampede(stack, 100))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        await eventually(lambda: stack.engine.stats.waits == 99)
        upstream.hold.set()  # type: ignore[union-attr]
        answers = await asyncio.wait_for(crowd, 30)
        assert len(upstream.calls) == 100
        numbers = [a.json()["n"] for a in answers]
        assert sorted(numbers) == list(range(1, 101))  # nobody got another's answer


async def test_C17c_followers_go_upstream_when_the_leader_hangs(backend: Backend) -> None:
    upstream = Upstream(hold=asyncio.Event(), hold_first_only=True)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      wait_timeout=0.1) as stack:
        crowd = asyncio.ensure_future(stampede(stack, 10))
        await asyncio.wait_for(upstream.entered.wait(), 10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while len(upstream.calls) < 10:
            assert loop.time() - started < 10
            await asyncio.sleep(0.01)
        upstream.hold.set()  # type: ignore[union-attr]
        answers = await asyncio.wait_for(crowd, 30)
        assert sorted(a.json()["n"] for a in answers) == list(range(1, 11))
        assert stack.engine.stats.wait_timeouts == 9


# -- C22: the store fails ------------------------------------------------------------------


@pytest.mark.redis
async def test_C22_a_dead_store_makes_the_cache_step_aside(redis_servers: Any) -> None:
    server = redis_servers.server()
    store = RedisStore.from_url(server.url, socket_timeout=0.2, connect_timeout=0.2)
    try:
        async with cached(store=store) as stack:
            first = await stack.client.get(MODEL_GET, headers=who("alice"))
            assert first.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
            server.stop()
            loop = asyncio.get_running_loop()
            for _ in range(5):
                started = loop.time()
                answer = await stack.client.get(MODEL_GET, headers=who("alice"))
                assert answer.status_code == 200
                assert answer.headers["cache-status"] == "gemini-scale; fwd=bypass"
                assert loop.time() - started < 1.0
            assert len(stack.upstream.calls) == 6  # every request reached the upstream
            assert stack.engine.stats.store_errors >= 1
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_C22_a_stalled_store_is_bounded_by_the_store_timeout(redis_servers: Any) -> None:
    import signal

    from gemini_scale.caching import CacheEngine

    server = redis_servers.server()
    store = RedisStore.from_url(server.url, socket_timeout=5, connect_timeout=1)
    engine = CacheEngine(store, store_timeout=0.05)
    try:
        async with cached(engine=engine) as stack:
            await stack.client.get(MODEL_GET, headers=who("bob"))
            server.process.send_signal(signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                answer = await stack.client.get(MODEL_GET, headers=who("alice"))
                assert answer.status_code == 200
                assert loop.time() - started < 1.0
            finally:
                server.process.send_signal(signal.SIGCONT)
    finally:
        await store.aclose()


async def test_C22_a_corrupt_entry_is_a_miss_and_deleted(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock, expose_key=True) as stack:
        first = await stack.client.get(MODEL_GET, headers=who("alice"))
        key = first.headers["cache-status"].partition('key="')[2].rstrip('"')
        store = backend.store()
        name = stack.engine.entry_name(key)
        entry = await stack.engine.get(key)  # a MemoryStore holds it as an object, not bytes
        assert entry is not None
        raw = entry.encode()
        if not isinstance(store, MemoryStore):
            assert await store.get(name) == raw
        await store.set(name, raw[: len(raw) // 2], ttl=60)  # truncated
        answer = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert answer.status_code == 200
        assert answer.headers["cache-status"].startswith("gemini-scale; fwd=miss; stored")
        assert stack.engine.stats.corrupt == 1
        assert json.loads(answer.content)["n"] == 2
