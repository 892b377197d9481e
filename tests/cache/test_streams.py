"""Streamed answers (research/security.md C15): recorded as they pass with no delay, stored
only when they end cleanly, replayed byte for byte (SSE and the JSON-array form)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from gemini_scale.types import Message
from tests.cache.conftest import Backend
from tests.cache.support import (
    STREAM,
    FakeAuth,
    Upstream,
    cached,
    call,
    event,
    generate_body,
    http_scope,
    json_array,
    sse,
    who,
)
from tests.servers import serve
from tests.sse import sse_events

BODY = generate_body("tell me")


async def test_C15_stream_caching_is_off_by_default(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        for _ in range(2):
            answer = await call(stack.app, "POST", STREAM, query=b"alt=sse",
                                headers=who("alice"), json_body=BODY)
            assert answer.headers["cache-status"] == "gemini-scale; fwd=bypass"
        assert len(stack.upstream.calls) == 2
        assert stack.engine.stats.stored == 0


async def test_C15_a_complete_sse_stream_is_replayed_byte_for_byte(backend: Backend) -> None:
    chunks = sse(*(event(f"part {i}") for i in range(19)), event("end", last=True))
    upstream = Upstream(stream=chunks)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        first = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                           json_body=BODY)
        assert first.headers["cache-status"] == "gemini-scale; fwd=miss"
        assert first.chunks[:-1] == chunks or first.chunks == chunks  # passed through as sent
        replay = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                            json_body=BODY)
        assert replay.headers["cache-status"] == "gemini-scale; hit"
        assert replay.body == first.body == b"".join(chunks)
        assert replay.headers["content-type"] == first.headers["content-type"]
        assert len(sse_events(replay.body)) == 20  # Gemini's framing, nothing injected
        assert len(upstream.calls) == 1


async def test_a_json_array_stream_is_replayed_byte_for_byte(backend: Backend) -> None:
    chunks = json_array(event("a"), event("b"), event("c", last=True))
    upstream = Upstream(stream=chunks, media_type="application/json")
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        first = await call(stack.app, "POST", STREAM, headers=who("alice"), json_body=BODY)
        replay = await call(stack.app, "POST", STREAM, headers=who("alice"), json_body=BODY)
        assert replay.headers["cache-status"] == "gemini-scale; hit"
        assert replay.body == first.body == b"".join(chunks)
        assert replay.headers["content-type"] == "application/json"
        sse_form = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                              json_body=BODY)
        assert sse_form.headers["cache-status"] == "gemini-scale; fwd=miss"  # another key


async def test_C15_the_first_chunk_is_not_held_back(backend: Backend) -> None:
    """The upstream produces its second chunk only after the client has the first: a
    buffering cache would deadlock here."""
    client_has_first = asyncio.Event()

    async def streamed(request: Request) -> Response:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            yield sse(event("first"))[0]
            await asyncio.wait_for(client_has_first.wait(), 5)
            yield sse(event("second", last=True))[0]

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route(STREAM, streamed, methods=["POST"])])
    rules = {STREAM: CachePolicy(ttl=60, methods=frozenset({"POST"}), streams=True,
                                 generation="all")}
    cache = CacheMiddleware(app, rules=rules, store=backend.store(), clock=backend.clock)
    received: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            client_has_first.set()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = http_scope("POST", STREAM, headers=who("alice"), body=b"{}")
    await asyncio.wait_for(FakeAuth(cache)(scope, receive, send), 10)
    assert len(received) == 2
    assert cache.engine.stats.stored == 1


async def test_C15_a_disconnected_stream_is_not_stored(backend: Backend) -> None:
    upstream = Upstream(stream=sse(*(event(f"{i}") for i in range(20))))
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        cut = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                         json_body=BODY, disconnect_after=5)
        assert not cut.complete
        assert stack.engine.stats.stored == 0
        again = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                           json_body=BODY)
        assert again.headers["cache-status"] == "gemini-scale; fwd=miss"  # reached upstream
        assert len(upstream.calls) == 2


async def test_C15_a_stream_with_an_error_frame_is_not_stored(backend: Backend) -> None:
    error = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    upstream = Upstream(stream=sse(event("a"), error))
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        for _ in range(2):
            answer = await call(stack.app, "POST", STREAM, query=b"alt=sse",
                                headers=who("alice"), json_body=BODY)
            assert answer.complete
        assert len(upstream.calls) == 2
        assert stack.engine.stats.stored == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [*sse(event("a"))[:1], b'data: {"candidates": '],  # ends inside an event
        json_array(event("a"), event("b"))[:-1],  # the array never closes
    ],
)
async def test_a_stream_that_ends_mid_event_is_not_stored(
    backend: Backend, chunks: list[bytes]
) -> None:
    upstream = Upstream(stream=chunks)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                   json_body=BODY)
        assert stack.engine.stats.stored == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [*json_array(event("a"), event("b", last=True)), b"xx"],
        [b'[{"a": 1}]', b'[{"b": 2}]'],  # a second array
        [b'[{"a": 1}]\n', b"]"],
    ],
)
async def test_a_json_array_stream_with_more_after_its_end_is_not_stored(
    backend: Backend, chunks: list[bytes]
) -> None:
    upstream = Upstream(stream=chunks, media_type="application/json")
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        for _ in range(2):
            answer = await call(stack.app, "POST", STREAM, headers=who("alice"), json_body=BODY)
            assert answer.body == b"".join(chunks)  # passed on as it came
            assert answer.headers["cache-status"] == "gemini-scale; fwd=miss"
        assert stack.engine.stats.stored == 0
        assert len(upstream.calls) == 2


BLOCKED = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"totalTokenCount": 3}}


@pytest.mark.parametrize(
    ("chunks", "media_type", "stored"),
    [
        (sse(event("a"), event("b")), "text/event-stream", 0),  # no last chunk
        (json_array(event("a"), event("b")), "application/json", 0),
        (sse(event("a"), event("b", last=True)), "text/event-stream", 1),
        (sse(BLOCKED), "text/event-stream", 1),  # a blocked prompt's one chunk is its last
        (sse({"candidates": [{"content": {"parts": [{"text": '"finishReason"'}]}}]}),
         "text/event-stream", 0),  # the words in the text are not the member
        (sse({"candidates": [{"content": {"parts": [
            {"functionCall": {"name": "f", "args": {"finishReason": "x"}}}]}}]}),
         "text/event-stream", 0),  # nor a member of a function call's arguments
        (json_array({"candidates": [{"content": {"parts": [
            {"functionCall": {"name": "f", "args": {"finishReason": "x"}}}]}}]}),
         "application/json", 0),
        (sse({"candidates": [{"index": 0, "finishReason": "STOP"}, {"index": 1}]},
             {"candidates": [{"index": 1, "content": {"parts": [{"text": "more"}]}}]}),
         "text/event-stream", 0),  # one of two candidates finished
        (sse({"candidates": [{"index": 0, "finishReason": "STOP"}, {"index": 1}]},
             {"candidates": [{"index": 1, "finishReason": "MAX_TOKENS"}]}),
         "text/event-stream", 1),  # both did
    ],
)
async def test_a_stream_cut_short_cleanly_before_its_last_chunk_is_not_stored(
    backend: Backend, chunks: list[bytes], media_type: str, stored: int
) -> None:
    """A stream that ends on a clean boundary but never sent Gemini's last chunk (the one
    with ``finishReason``, or ``blockReason`` for a blocked prompt) was cut short upstream:
    it goes on as it came, and is not stored."""
    upstream = Upstream(stream=chunks, media_type=media_type)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        query = b"alt=sse" if media_type == "text/event-stream" else b""
        answer = await call(stack.app, "POST", STREAM, query=query, headers=who("alice"),
                            json_body=BODY)
        assert answer.body == b"".join(chunks)
        assert stack.engine.stats.stored == stored


async def test_a_stream_that_raises_midway_is_not_stored(backend: Backend) -> None:
    upstream = Upstream(stream_error=RuntimeError("upstream reset"))
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True) as stack:
        with pytest.raises(RuntimeError, match="upstream reset"):
            await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                       json_body=BODY)
        assert stack.engine.stats.stored == 0


async def test_stream_replay_over_a_real_server_is_byte_identical() -> None:
    chunks = sse(*(event(f"chunk {i}") for i in range(9)), event("end", last=True))
    upstream = Upstream(stream=chunks, interval=0.01)
    from tests.cache.support import RULES, gemini_app

    cache = CacheMiddleware(gemini_app(upstream), rules=RULES, streams=True)
    with serve(FakeAuth(cache)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            bodies = []
            for _ in range(2):
                async with client.stream("POST", STREAM, params={"alt": "sse"}, json=BODY,
                                         headers=who("alice")) as response:
                    assert response.status_code == 200
                    bodies.append((response.headers["cache-status"],
                                   b"".join([c async for c in response.aiter_raw()])))
    assert bodies[0] == ("gemini-scale; fwd=miss", b"".join(chunks))
    assert bodies[1] == ("gemini-scale; hit", b"".join(chunks))
    assert len(upstream.calls) == 1


async def test_streams_over_the_size_cap_pass_but_are_not_stored(backend: Backend) -> None:
    chunks = sse(*(event("x" * 100) for _ in range(50)))
    upstream = Upstream(stream=chunks)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock,
                      streams=True, max_entry_bytes=1000) as stack:
        answer = await call(stack.app, "POST", STREAM, query=b"alt=sse", headers=who("alice"),
                            json_body=BODY)
        assert answer.body == b"".join(chunks)
        assert stack.engine.stats.stored == 0
