"""Pieces of the cache tests: a scriptable fake Gemini app that counts its calls and echoes
who and what it saw, a fake authenticator, the cache stack over HTTP, and a raw ASGI
recorder that keeps every message and its arrival time (for streams)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import Principal
from gemini_scale.caching import CacheEngine, CacheMiddleware
from gemini_scale.policies import CachePolicy
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

ISSUER = "https://idp.example/"
MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
COUNT = f"/v1beta/models/{MODEL}:countTokens"
EMBED = f"/v1beta/models/{MODEL}:batchEmbedContents"
MODELS = "/v1beta/models"
MODEL_GET = f"/v1beta/models/{MODEL}"

#: Policies by path template: listing shared, model methods per principal (POST allowed).
POST = frozenset({"POST"})
RULES: Mapping[str, CachePolicy] = {
    "GET /v1beta/models": CachePolicy(ttl=60, scope="shared"),
    "GET /v1/models": CachePolicy(ttl=60, scope="shared"),
    "GET /v1beta/models/{model}": CachePolicy(ttl=60),
    "/v1/models/{model}:generateContent": CachePolicy(ttl=60, methods=POST),
    "/v1beta/models/{model}:generateContent": CachePolicy(ttl=60, methods=POST),
    "/v1beta/models/{model}:streamGenerateContent": CachePolicy(ttl=60, methods=POST),
    "/v1beta/models/{model}:countTokens": CachePolicy(ttl=60, methods=POST),
    "/v1beta/models/{model}:batchEmbedContents": CachePolicy(ttl=60, methods=POST),
    "/other": CachePolicy(ttl=60, methods=frozenset({"GET", "POST"})),
}


def who(sub: str, *, tenant: str | None = None, iss: str = ISSUER) -> dict[str, str]:
    """Headers the fake authenticator turns into a verified principal."""
    headers = {"x-test-sub": sub, "x-test-iss": iss}
    if tenant is not None:
        headers["x-test-tenant"] = tenant
    return headers


class FakeAuth:
    """Stands in for OAuth2Middleware: ``x-test-sub`` (+ ``x-test-iss``, ``x-test-tenant``)
    becomes ``scope["state"]["principal"]`` (the same object for the same values, as the
    verified-token cache gives); without ``x-test-sub`` the request is anonymous."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._principals: dict[tuple[str, str, str | None], Principal] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            sub = headers.get("x-test-sub")
            if sub is not None:
                values = (headers.get("x-test-iss", ISSUER), sub, headers.get("x-test-tenant"))
                found = self._principals.get(values)
                if found is None:
                    found = self._principals[values] = Principal(
                        issuer=values[0], subject=values[1], tenant=values[2]
                    )
                scope.setdefault("state", {})["principal"] = found
        await self.app(scope, receive, send)


def sse(*events: Mapping[str, Any]) -> list[bytes]:
    """Gemini SSE frames (CRLF framing, Google's separators)."""
    return [
        b"data: " + json.dumps(e, separators=(",", ": ")).encode() + b"\r\n\r\n" for e in events
    ]


def json_array(*events: Mapping[str, Any]) -> list[bytes]:
    """The JSON-array stream form, one element per chunk."""
    chunks = [b"[" + json.dumps(events[0]).encode()]
    chunks += [b",\r\n" + json.dumps(e).encode() for e in events[1:]]
    chunks.append(b"]")
    return chunks


def event(text: str, *, last: bool = False) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if last:
        candidate["finishReason"] = "STOP"
    return {"candidates": [candidate], "usageMetadata": {"totalTokenCount": 7}}


@dataclass
class Upstream:
    """What the fake Gemini app answers, and what it saw.

    Every answer embeds a call counter ``n`` (a hit replays an old ``n``), the principal
    and the headers it received, so tests can tell who an answer was made for.
    """

    calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content: bytes | None = None
    """A fixed body instead of the echo."""
    hold: asyncio.Event | None = None
    """Model calls wait for it (after counting themselves in ``entered``)."""
    hold_first_only: bool = False
    """Only the first call waits for ``hold``."""
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    delay: float = 0.0
    fail: Callable[[int], bool] | None = None
    """``fail(n)``: the n-th call (1-based) raises instead of answering."""
    stream: list[bytes] | None = None
    """Chunks of a streamed answer (default: three SSE events)."""
    interval: float = 0.0
    stream_error: BaseException | None = None
    """Raised by the stream after its second chunk."""
    media_type: str | None = None

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        principal = request.scope.get("state", {}).get("principal")
        self.calls.append(
            {
                "path": request.url.path,
                "query": request.url.query,
                "principal": principal.subject if principal is not None else None,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        number = len(self.calls)
        self.entered.set()
        if self.hold is not None and (number == 1 or not self.hold_first_only):
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None and self.fail(number):
            raise RuntimeError(f"upstream call {number} failed")
        if request.url.path.endswith(":streamGenerateContent"):
            return self._streamed()
        if self.content is not None:
            response: Response = Response(
                self.content, status_code=self.status,
                media_type=self.media_type or "application/json",
            )
        else:
            echo = {
                "n": number,
                "principal": principal.subject if principal is not None else None,
                "tenant": principal.tenant if principal is not None else None,
                "path": request.url.path,
                "seen": {k: v for k, v in request.headers.items() if k.startswith("x-")},
            }
            response = JSONResponse(echo, status_code=self.status)
        for name, value in self.headers.items():
            response.headers[name] = value
        response.raw_headers.extend(self.raw_headers)
        return response

    def _streamed(self) -> Response:
        chunks = self.stream if self.stream is not None else sse(
            event("Hello"), event(" world"), event("!", last=True)
        )

        async def body() -> AsyncIterator[bytes]:
            for index, chunk in enumerate(chunks):
                if index and self.interval:
                    await asyncio.sleep(self.interval)
                yield chunk
                if index == 1 and self.stream_error is not None:
                    raise self.stream_error

        response = StreamingResponse(
            body(), status_code=self.status, media_type=self.media_type or "text/event-stream"
        )
        for name, value in self.headers.items():
            response.headers[name] = value
        return response


def gemini_app(upstream: Upstream) -> Starlette:
    routes = []
    for version in ("v1", "v1beta"):
        routes += [
            Route(f"/{version}/models", upstream.handle, methods=["GET"]),
            Route(f"/{version}/models/{{model}}", upstream.handle, methods=["GET"]),
        ]
        routes += [
            Route(f"/{version}/models/{{model}}:{method}", upstream.handle, methods=["POST"])
            for method in ("generateContent", "streamGenerateContent", "countTokens",
                           "batchEmbedContents")
        ]
    routes.append(Route("/other", upstream.handle, methods=["GET", "POST"]))
    return Starlette(routes=routes)


@dataclass
class Stack:
    client: httpx.AsyncClient
    cache: CacheMiddleware
    upstream: Upstream
    app: ASGIApp

    @property
    def engine(self) -> CacheEngine:
        return self.cache.engine


@asynccontextmanager
async def cached(
    *,
    upstream: Upstream | None = None,
    rules: Mapping[str, CachePolicy] | None = None,
    streaming: bool = False,
    **options: Any,
) -> AsyncIterator[Stack]:
    """FakeAuth -> CacheMiddleware(**options) -> the fake Gemini app, over httpx."""
    upstream = upstream or Upstream()
    middleware = CacheMiddleware(
        gemini_app(upstream), rules=RULES if rules is None else rules, **options
    )
    app = FakeAuth(middleware)
    transport: httpx.AsyncBaseTransport
    if streaming:
        from gemini_scale import StreamingASGITransport

        transport = StreamingASGITransport(app)
    else:
        transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Stack(client, middleware, upstream, app)


def status_of(response: httpx.Response) -> str:
    """The ``Cache-Status`` of an answer (empty when the cache did not handle it)."""
    return response.headers.get("cache-status", "")


def generate_body(
    text: str = "hi", *, temperature: float | None = 0, **config: Any
) -> dict[str, Any]:
    """A generateContent body (temperature 0 by default: deterministic)."""
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    generation = dict(config)
    if temperature is not None:
        generation["temperature"] = temperature
    if generation:
        body["generationConfig"] = generation
    return body


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


# -- raw ASGI -----------------------------------------------------------------------------


@dataclass
class Recorded:
    """Everything an app sent for one request, with arrival times (monotonic seconds)."""

    messages: list[Message] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    started: float = 0.0

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in self.messages[0].get("headers", [])
        }

    @property
    def chunks(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def complete(self) -> bool:
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)


def http_scope(
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Scope:
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    if body:
        raw += [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": raw,
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    json_body: Any = None,
    disconnect_after: int | None = None,
) -> Recorded:
    """Run one request through ``app`` recording every message. With ``disconnect_after``
    the client goes away after that many body messages: ``send`` raises ``OSError`` (as
    uvicorn's does since ASGI 2.4) and ``receive`` answers ``http.disconnect``."""
    body = b"" if json_body is None else json.dumps(json_body).encode()
    recorded = Recorded(started=time.monotonic())
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            raise OSError("client disconnected")
        recorded.messages.append(message)
        recorded.times.append(time.monotonic())
        if (
            disconnect_after is not None
            and message["type"] == "http.response.body"
            and len(recorded.chunks) >= disconnect_after
        ):
            gone.set()

    scope = http_scope(method, path, query=query, headers=headers, body=body)
    try:
        await app(scope, receive, send)
    except (OSError, ClientDisconnect):
        assert disconnect_after is not None
    return recorded


# -- real authentication ------------------------------------------------------------------


@dataclass
class AuthStack(Stack):
    issuer: Any = None
    """The dev issuer that mints tokens (``example_app.dev_issuer.DevIssuer``)."""

    def token(self, sub: str, *, scopes: Sequence[str] = ("gemini.generate",),
              tenant: str | None = None) -> dict[str, str]:
        """An ``Authorization`` header with a fresh valid token."""
        token = self.issuer.mint(subject=sub, scopes=tuple(scopes), tenant=tenant)
        return {"authorization": f"Bearer {token}"}


@asynccontextmanager
async def authenticated(
    *,
    upstream: Upstream | None = None,
    scopes: Mapping[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[AuthStack]:
    """OAuth2Middleware (a dev issuer's JWTs) -> CacheMiddleware -> the fake Gemini app."""
    from example_app.dev_issuer import DevIssuer
    from gemini_scale import Issuer, OAuth2Middleware

    upstream = upstream or Upstream()
    issuer = DevIssuer(audience="gemini-scale-cache-tests")
    middleware = CacheMiddleware(gemini_app(upstream), rules=RULES, **options)
    app = OAuth2Middleware(
        middleware,
        issuers=[Issuer(issuer=issuer.issuer, audience=issuer.audience, jwks=issuer.jwks())],
        rules=scopes,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield AuthStack(client, middleware, upstream, app, issuer)
