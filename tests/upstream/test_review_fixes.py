"""GeminiUpstream review fixes: the routed path goes upstream, paths that cannot are refused,
a client that leaves before the upstream answers cancels the call, and malformed upstream
error bodies still map to Google's envelope.

Upstreams are ``httpx.MockTransport`` handlers or raw ASGI apps behind
StreamingASGITransport; disconnects are driven by a raw ASGI client and by a real uvicorn
server (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from gemini_scale import JSONBodyMiddleware, MetricsMiddleware, VersionMiddleware
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send
from gemini_scale.upstream import GeminiUpstream, StreamingASGITransport
from tests.cache.support import call
from tests.servers import serve
from tests.upstream.test_client import BrokenStream, assert_envelope

GENERATE_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
PROMPT = {"contents": [{"parts": [{"text": "Hi"}], "role": "user"}]}
UPSTREAM_URL = "http://upstream.invalid"
JSON_TYPE = "application/json; charset=UTF-8"


def relay(upstream: GeminiUpstream) -> Starlette:
    """A service whose one endpoint relays everything upstream."""

    async def endpoint(request: Request) -> Response:
        return await upstream.forward(request)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


@asynccontextmanager
async def recorded(
    answer: Callable[[httpx.Request], httpx.Response] | None = None,
) -> AsyncIterator[tuple[GeminiUpstream, list[httpx.Request]]]:
    """A GeminiUpstream over a MockTransport that records every request it gets."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request) if answer else httpx.Response(200, json={"candidates": []})

    async with GeminiUpstream(
        base_url=UPSTREAM_URL, api_keys=["server-key"], transport=httpx.MockTransport(handler)
    ) as upstream:
        yield upstream, seen


# -- the path that goes upstream ------------------------------------------------------------


async def test_mounted_app_forwards_the_routed_path_without_its_mount() -> None:
    async with recorded() as (upstream, seen):
        gemini = FastAPI()

        @gemini.post("/v1beta/models/{model}:generateContent")
        async def generate(request: Request, model: str) -> Response:
            return await upstream.forward(request)

        gemini.add_middleware(VersionMiddleware)
        root = Starlette(routes=[Mount("/gateway", gemini)])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(root), base_url="http://t"
        ) as client:
            for version in ("v1beta", "v1"):
                path = f"/gateway/{version}/models/gemini-2.5-flash:generateContent"
                assert (await client.post(path, json=PROMPT)).status_code == 200
    assert [request.url.path for request in seen] == [GENERATE_PATH, GENERATE_PATH]


async def test_root_path_is_not_forwarded() -> None:
    async with recorded() as (upstream, seen):
        transport = httpx.ASGITransport(relay(upstream), root_path="/gateway")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/gateway" + GENERATE_PATH, json=PROMPT)
    assert response.status_code == 200
    assert [request.url.path for request in seen] == [GENERATE_PATH]


async def test_query_and_fragment_characters_in_the_path_stay_in_the_path() -> None:
    async with recorded() as (upstream, seen):
        transport = StreamingASGITransport(relay(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for raw in ("m%3Fkey=x:countTokens", "m%23:countTokens", "m%252F..:countTokens"):
                url = httpx.URL(f"http://t/v1beta/models/{raw}")
                assert (await client.post(url, json=PROMPT)).status_code == 200
    assert [(r.url.raw_path, r.url.query) for r in seen] == [
        (b"/v1beta/models/m%3Fkey=x:countTokens", b""),
        (b"/v1beta/models/m%23:countTokens", b""),
        (b"/v1beta/models/m%252F..:countTokens", b""),  # the text "%2F", not a separator
    ]


@pytest.mark.parametrize(
    "raw",
    [
        "/v1beta/models/gemini%00",
        "/v1beta/models/gemini%7F",
        "/v1beta/models/x%1B%5B31m",
        "/v1beta/models/%2E%2E",
        "/v1beta/models/%2e",
        "/v1beta/models/%2E%2E/files",
        "/v1beta/%2E%2E/models/gemini-2.5-flash:generateContent",
    ],
)
async def test_paths_that_cannot_go_upstream_are_refused(raw: str) -> None:
    async with recorded() as (upstream, seen):
        transport = StreamingASGITransport(relay(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get(httpx.URL("http://t" + raw))
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert seen == []


async def test_own_call_with_a_control_character_is_refused() -> None:
    async with recorded() as (upstream, seen):
        response = await upstream.request("GET", "/v1beta/models/gemini\x00")
    assert response.status_code == 400
    assert json.loads(bytes(response.body))["error"]["status"] == "INVALID_ARGUMENT"
    assert seen == []


# -- a client that leaves before the upstream answers -----------------------------------------


class HeldUpstream:
    """An upstream that takes the request, then "generates" for 10 s before it answers.

    It stops early when its caller goes away and records that: on ``http.disconnect`` (a
    server's app that ``listens``) or when its task is cancelled. Thread-safe: it may run in
    a uvicorn server's thread.
    """

    def __init__(self, *, listens: bool = True) -> None:
        self.listens = listens
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body", False):
            pass
        self.started.set()
        try:
            with anyio.move_on_after(10):
                if not self.listens:
                    await anyio.sleep_forever()
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.cancelled.set()
                return
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"candidates": []}'})


class RawClient:
    """A raw ASGI client: sends ``body`` in two chunks, then ``http.disconnect`` once it
    :meth:`leave` s. Records what the app sends."""

    def __init__(self, body: bytes) -> None:
        half = len(body) // 2
        self._pending: list[Message] = [
            {"type": "http.request", "body": body[half:], "more_body": False},
            {"type": "http.request", "body": body[:half], "more_body": True},
        ]
        self._left = asyncio.Event()
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self._pending:
            return self._pending.pop()
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._left.set()


def http_scope(path: str, query: bytes) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": query,
        "headers": [(b"host", b"gateway"), (b"content-type", b"application/json")],
        "server": ("gateway", 80), "client": ("127.0.0.1", 50000), "state": {},
        "extensions": {},
    }


async def waited(event: threading.Event, seconds: float) -> bool:
    return await asyncio.to_thread(event.wait, seconds)


async def leave_while_held(
    app: ASGIApp, scope: Scope, client: RawClient, held: HeldUpstream
) -> None:
    """Run ``app`` for ``client``, who leaves once the upstream holds the call: the upstream
    must stop within 0.5 s, and the app end by itself without raising."""

    async def call() -> None:
        await app(scope, client.receive, client.send)

    task = asyncio.create_task(call())
    try:
        assert await waited(held.started, 2)
        client.leave()
        assert await waited(held.cancelled, 0.5)
        await asyncio.wait_for(task, 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def body_layer(app: ASGIApp) -> ASGIApp:
    """An outer layer that reads the body first and replays it to the app."""
    return JSONBodyMiddleware(app)


CALLS = [(GENERATE_PATH, b""), (STREAM_PATH, b"alt=sse")]


@pytest.mark.parametrize(("path", "query"), CALLS)
@pytest.mark.parametrize(
    ("outer", "listens"),
    [(None, True), (body_layer, True), (None, False)],
    ids=["plain", "replayed-body", "upstream-deaf-to-disconnects"],
)
async def test_leaving_before_the_upstream_answers_cancels_the_upstream_call(
    path: str, query: bytes, outer: Callable[[ASGIApp], ASGIApp] | None, listens: bool
) -> None:
    held = HeldUpstream(listens=listens)
    async with GeminiUpstream(
        base_url=UPSTREAM_URL, transport=StreamingASGITransport(held)
    ) as upstream:
        app: ASGIApp = relay(upstream)
        app = outer(app) if outer else app
        client = RawClient(json.dumps(PROMPT).encode())
        await leave_while_held(app, http_scope(path, query), client, held)
    statuses = [m["status"] for m in client.sent if m["type"] == "http.response.start"]
    assert 500 not in statuses


async def test_forward_with_its_own_body_still_cancels_and_keeps_the_request_body() -> None:
    held = HeldUpstream()
    read_after: list[bytes] = []
    async with GeminiUpstream(
        base_url=UPSTREAM_URL, transport=StreamingASGITransport(held)
    ) as upstream:

        async def endpoint(request: Request) -> Response:
            response = await upstream.forward(request, body=b'{"contents": []}')
            read_after.append(await request.body())
            return response

        app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])
        sent = json.dumps(PROMPT).encode()
        client = RawClient(sent)
        await leave_while_held(app, http_scope(GENERATE_PATH, b""), client, held)
    assert read_after == [sent]


async def test_an_upstream_that_answers_first_is_relayed_as_before() -> None:
    async with recorded() as (upstream, seen):
        client = RawClient(json.dumps(PROMPT).encode())
        await asyncio.wait_for(
            relay(upstream)(http_scope(GENERATE_PATH, b""), client.receive, client.send), 2
        )
    assert client.sent[0]["status"] == 200
    assert json.loads(b"".join(m.get("body", b"") for m in client.sent[1:])) == {"candidates": []}
    assert len(seen) == 1


def socket_gateway(held: HeldUpstream) -> FastAPI:
    """The gateway as a server runs it: the upstream lives in the server's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with GeminiUpstream(
            base_url=UPSTREAM_URL, transport=StreamingASGITransport(held)
        ) as upstream:
            app.state.upstream = upstream
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1beta/models/{model}:generateContent")
    async def generate(request: Request, model: str) -> Response:
        return await request.app.state.upstream.forward(request)  # type: ignore[no-any-return]

    @app.post("/v1beta/models/{model}:streamGenerateContent")
    async def stream(request: Request, model: str) -> Response:
        return await request.app.state.upstream.forward(request)  # type: ignore[no-any-return]

    app.add_middleware(VersionMiddleware)
    app.add_middleware(MetricsMiddleware, registry=CollectorRegistry(), access_log=False)
    return app


@pytest.mark.slow
@pytest.mark.parametrize(("path", "query"), CALLS)
async def test_socket_client_leaving_before_the_upstream_answers_cancels_it(
    path: str, query: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    held = HeldUpstream()
    with serve(socket_gateway(held)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            call = asyncio.create_task(
                client.post(path + ("?" + query.decode() if query else ""), json=PROMPT)
            )
            try:
                assert await waited(held.started, 5)
                call.cancel()  # the client gives up: its connection closes
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                assert await waited(held.cancelled, 0.5)
            finally:
                call.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- malformed upstream error bodies ----------------------------------------------------------


@pytest.mark.parametrize("delay", ["1e999s", "infs", "-infs", "nans", "1e300s"])
async def test_unusable_retry_delay_is_ignored(delay: str) -> None:
    envelope = {"error": {
        "code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}],
    }}
    async with recorded(lambda _: httpx.Response(429, json=envelope)) as (upstream, _):
        transport = StreamingASGITransport(relay(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post(GENERATE_PATH, json=PROMPT)
    assert response.status_code == 429
    assert response.json() == envelope
    assert response.headers["cache-control"] == "no-store"
    assert "retry-after" not in response.headers


async def test_deeply_nested_error_body_is_wrapped() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    answer = httpx.Response(502, content=body, headers={"content-type": "application/json"})
    async with recorded(lambda _: answer) as (upstream, _):
        transport = StreamingASGITransport(relay(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post(GENERATE_PATH, json=PROMPT)
    error = assert_envelope(response, 502, "UNAVAILABLE")
    assert error["message"] == "The upstream Gemini API answered 502 Bad Gateway."


# -- an upstream that breaks off its answer is not a client that left ----------------------


async def test_an_answer_the_upstream_broke_off_is_not_a_client_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        stream = BrokenStream(b'{"candidates": [ ', httpx.RemoteProtocolError)
        return httpx.Response(200, headers={"content-type": JSON_TYPE}, stream=stream)

    caplog.set_level(logging.INFO, logger="gemini_scale.access")
    registry = CollectorRegistry()
    async with recorded(handler) as (upstream, _):
        app = MetricsMiddleware(relay(upstream), registry=registry)
        answer = await call(app, "POST", GENERATE_PATH, json_body=PROMPT)
    assert answer.status == 200
    assert answer.messages[-1].get("more_body") is True  # left unfinished: the server aborts
    assert registry.get_sample_value(
        "gemini_scale_client_disconnects_total", {"http_route": "/{path:path}"}
    ) is None
    [record] = [r for r in caplog.records if r.name == "gemini_scale.access"]
    access = record.access  # type: ignore[attr-defined]
    assert access["client_disconnected"] is False
    assert access["upstream_broken"] is True
    assert access["status"] == 200


async def test_leaving_before_the_upstream_answers_is_a_client_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 499 the relay answers reaches no one: the metrics layer records a client that
    left before any answer (no time to first byte, no bytes), not an answered request."""
    caplog.set_level(logging.INFO, logger="gemini_scale.access")
    registry = CollectorRegistry()
    held = HeldUpstream()
    async with GeminiUpstream(
        base_url=UPSTREAM_URL, transport=StreamingASGITransport(held)
    ) as upstream:
        app = MetricsMiddleware(relay(upstream), registry=registry)
        client = RawClient(json.dumps(PROMPT).encode())
        await leave_while_held(app, http_scope(GENERATE_PATH, b""), client, held)
    assert registry.get_sample_value(
        "gemini_scale_client_disconnects_total", {"http_route": "/{path:path}"}
    ) == 1
    [record] = [r for r in caplog.records if r.name == "gemini_scale.access"]
    access = record.access  # type: ignore[attr-defined]
    assert (access["status"], access["client_disconnected"]) == (499, True)
    assert "ttfb_ms" not in access
