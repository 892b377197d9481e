"""Shared pieces of the rate-limit tests: a fake authenticator, a Gemini-shaped app that
counts its calls, the limiter stack over HTTP, and a probe that reads a bucket's usage.

The probe charges nothing: it runs the limiter's own acquire with zero costs for the
bucket a request would fall in (found with the public :func:`gemini_scale.keys.identity`),
so it reads exactly what the next request would see.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import (
    Principal,
    RateLimitMiddleware,
    RateLimitPolicy,
    TrustedProxies,
)
from gemini_scale.keys import identity
from gemini_scale.ratelimit.engine import Limit, RateLimiter
from gemini_scale.routing import CONTEXT_KEY, RequestContext, RouteMatch
from gemini_scale.types import ASGIApp, Receive, Scope, Send

ISSUER = "https://idp.example/"
MODEL = "gemini-2.5-flash"
GENERATE_TEMPLATE = "/v1beta/models/{model}:generateContent"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
WINDOW_START = 1_800_000_000.0
"""A FakeClock time on a window boundary of every window that divides 3600 s."""


def who(sub: str, *, tenant: str | None = None, iss: str = ISSUER) -> dict[str, str]:
    """Request headers the fake authenticator turns into a verified principal."""
    headers = {"x-test-sub": sub, "x-test-iss": iss}
    if tenant is not None:
        headers["x-test-tenant"] = tenant
    return headers


def principal(sub: str, *, tenant: str | None = None, iss: str = ISSUER) -> Principal:
    return Principal(issuer=iss, subject=sub, tenant=tenant)


class FakeAuth:
    """Stands in for OAuth2Middleware: ``x-test-sub`` (+ ``x-test-iss``, ``x-test-tenant``)
    become ``scope["state"]["principal"]``; without ``x-test-sub`` the request is anonymous."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            sub = headers.get("x-test-sub")
            if sub is not None:
                found = Principal(
                    issuer=headers.get("x-test-iss", ISSUER),
                    subject=json.loads(sub) if sub.startswith('"') else sub,
                    tenant=headers.get("x-test-tenant"),
                )
                scope.setdefault("state", {})["principal"] = found
        await self.app(scope, receive, send)


@dataclass
class Upstream:
    """What the fake Gemini app answers, and what it saw."""

    calls: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = field(
        default_factory=lambda: {
            "promptTokenCount": 30,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 5,
            "totalTokenCount": 45,
        }
    )
    status: int = 200
    hold: asyncio.Event | None = None
    """When set, model calls wait for it (after counting themselves in ``entered``)."""
    entered: int = 0

    async def generate(self, request: Request) -> Response:
        await request.body()
        self.calls.append(request.url.path)
        self.entered += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.status >= 400:
            return JSONResponse(
                {"error": {"code": self.status, "message": "x", "status": "UNAVAILABLE"}},
                status_code=self.status,
            )
        body: dict[str, Any] = {"candidates": [{"content": {"parts": [{"text": "hi"}]}}]}
        if request.url.path.endswith(":streamGenerateContent"):
            return StreamingResponse(self._events(body), media_type="text/event-stream")
        if self.usage is not None:
            body["usageMetadata"] = self.usage
        return JSONResponse(body)

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Three SSE events with cumulative usage (a third, two thirds, all of it)."""
        for step in (1, 2, 3):
            event = dict(body)
            if self.usage is not None:
                event["usageMetadata"] = {k: v * step // 3 for k, v in self.usage.items()}
            yield b"data: " + json.dumps(event).encode() + b"\r\n\r\n"

    async def listing(self, request: Request) -> Response:
        self.calls.append(request.url.path)
        return JSONResponse({"models": []})

    async def other(self, request: Request) -> Response:
        self.calls.append(request.url.path)
        return JSONResponse({"ok": True})


def gemini_app(upstream: Upstream, extra: Sequence[Route] = ()) -> Starlette:
    routes = [
        Route(f"/{v}/models/{{model}}:generateContent", upstream.generate, methods=["POST"])
        for v in ("v1", "v1beta")
    ]
    routes += [
        Route(f"/{v}/models/{{model}}:streamGenerateContent", upstream.generate, methods=["POST"])
        for v in ("v1", "v1beta")
    ]
    routes += [Route("/v1beta/models", upstream.listing), Route("/other", upstream.other)]
    return Starlette(routes=[*routes, *extra])


@dataclass
class Stack:
    client: httpx.AsyncClient
    limiter: RateLimitMiddleware
    upstream: Upstream

    async def used(
        self, sub: str, *, tenant: str | None = None, policy: RateLimitPolicy | None = None
    ) -> dict[str, float]:
        return await bucket_usage(self.limiter, principal(sub, tenant=tenant), policy=policy)


@asynccontextmanager
async def limited(
    *,
    upstream: Upstream | None = None,
    extra: Sequence[Route] = (),
    client: tuple[str, int] = ("127.0.0.1", 123),
    **options: Any,
) -> AsyncIterator[Stack]:
    """FakeAuth -> RateLimitMiddleware(**options) -> the fake Gemini app, over httpx."""
    upstream = upstream or Upstream()
    middleware = RateLimitMiddleware(gemini_app(upstream, extra), **options)
    transport = httpx.ASGITransport(app=FakeAuth(middleware), client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield Stack(http, middleware, upstream)


def probe_scope(
    who: Principal | None,
    *,
    model: str | None = MODEL,
    template: str = GENERATE_TEMPLATE,
    client: tuple[str, int] | None = None,
) -> Scope:
    """The scope parts :func:`identity` reads, for a request by ``who`` to ``template``."""
    params = {"model": model} if model is not None else {}
    scope: dict[str, Any] = {
        "type": "http",
        "headers": [],
        "state": {"principal": who} if who is not None else {},
        CONTEXT_KEY: RequestContext(route=RouteMatch(template, params, {})),
    }
    if client is not None:
        scope["client"] = client
    return scope


async def probe(
    limiter: RateLimiter, tag: str, limits: Sequence[Limit]
) -> dict[str, float]:
    """Used units per limit kind in a bucket, charging nothing."""
    decision = await limiter.acquire(tag, limits, [0] * len(limits))
    return {state.limit.kind: state.used for state in decision.states}


async def bucket_usage(
    middleware: RateLimitMiddleware,
    who: Principal | None,
    *,
    policy: RateLimitPolicy | None = None,
    model: str | None = MODEL,
    trusted: TrustedProxies | None = None,
    client: tuple[str, int] | None = None,
) -> dict[str, float]:
    """What a principal's bucket of ``policy`` (default: the middleware's) holds now."""
    policy = policy or middleware.default
    assert policy is not None
    scope = probe_scope(who, model=model, client=client)
    found = identity(scope, policy.key, trusted=trusted or middleware.trusted)
    assert found is not None
    return await probe(middleware.limiter, found.tag, middleware.limits_of(policy))


def body(text: str = "x" * 40, *, max_output: int | None = None) -> dict[str, Any]:
    """A generateContent body; its estimate is ceil(len(text)/4) + the output allowance."""
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if max_output is not None:
        request["generationConfig"] = {"maxOutputTokens": max_output}
    return request


def estimate(text: str, output: int) -> int:
    return math.ceil(len(text) / 4) + output


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.001)


def error_of(response: httpx.Response) -> Mapping[str, Any]:
    """The Google error envelope's ``error`` object, after checking the envelope."""
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("cache-control") == "no-store"
    payload = response.json()
    assert set(payload) == {"error"}
    error: Mapping[str, Any] = payload["error"]
    assert error["code"] == response.status_code
    return error


def details_of(error: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    wanted = f"type.googleapis.com/google.rpc.{kind}"
    return [d for d in error.get("details", []) if d["@type"] == wanted]


def rate_limit_header(response: httpx.Response) -> dict[str, Any]:
    """``RateLimit: "requests";r=41;t=17`` as ``{"name": "requests", "r": 41, "t": 17}``."""
    raw = response.headers["ratelimit"]
    name, *params = raw.split(";")
    parsed: dict[str, Any] = {"name": name.strip('"')}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key] = int(value)
    return parsed


def policy_header(response: httpx.Response) -> dict[str, tuple[int, int]]:
    """``RateLimit-Policy`` as ``{name: (quota, window)}``."""
    items = {}
    for item in response.headers["ratelimit-policy"].split(","):
        name, *params = item.strip().split(";")
        values = dict(p.split("=") for p in params)
        items[name.strip('"')] = (int(values["q"]), int(values["w"]))
    return items
