"""CacheMiddleware behaviour not covered by the catalogue: generation modes, invalidation
over HTTP, marks on FastAPI routes, pass-through, options."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request

from gemini_scale import cache
from gemini_scale.caching import CacheMiddleware, model_tag, principal_tag
from gemini_scale.errors import ConfigurationError
from gemini_scale.policies import CachePolicy
from gemini_scale.principal import Principal
from tests.cache.conftest import Backend
from tests.cache.support import (
    COUNT,
    EMBED,
    GENERATE,
    ISSUER,
    MODEL_GET,
    MODELS,
    RULES,
    FakeAuth,
    Upstream,
    cached,
    call,
    gemini_app,
    generate_body,
    status_of,
    who,
)


@pytest.mark.parametrize(
    ("mode", "body", "cached_"),
    [
        ("deterministic", generate_body("a", temperature=0), True),
        ("deterministic", generate_body("a", temperature=0, candidateCount=2), False),
        ("deterministic", generate_body("a", temperature=None), False),
        ("all", generate_body("a", temperature=0.9), True),
        ("off", generate_body("a", temperature=0), False),
    ],
)
async def test_generation_modes(mode: str, body: dict[str, object], cached_: bool) -> None:
    async with cached(generation=mode) as stack:  # type: ignore[arg-type]
        await stack.client.post(GENERATE, json=body, headers=who("alice"))
        again = await stack.client.post(GENERATE, json=body, headers=who("alice"))
        assert (status_of(again) == "gemini-scale; hit") is cached_
        if not cached_:
            assert status_of(again) == "gemini-scale; fwd=bypass"


async def test_count_tokens_and_embeddings_are_always_deterministic() -> None:
    async with cached(generation="off") as stack:
        for path in (COUNT, EMBED):
            body = {"requests": [{"content": {"parts": [{"text": "x"}]}}]}
            await stack.client.post(path, json=body, headers=who("alice"))
            again = await stack.client.post(path, json=body, headers=who("alice"))
            assert status_of(again) == "gemini-scale; hit"


async def test_a_policy_overrides_the_generation_mode() -> None:
    rules = {**RULES, "/v1beta/models/{model}:generateContent": CachePolicy(
        ttl=60, methods=frozenset({"POST"}), generation="all")}
    async with cached(rules=rules, generation="off") as stack:
        body = generate_body("a", temperature=1)
        await stack.client.post(GENERATE, json=body, headers=who("alice"))
        assert status_of(await stack.client.post(GENERATE, json=body, headers=who("alice"))) == (
            "gemini-scale; hit")


async def test_invalidation_by_model_principal_and_key(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock, expose_key=True) as stack:
        alice = Principal(issuer=ISSUER, subject="alice")

        async def status(path: str, sub: str = "alice") -> str:
            answer = await stack.client.get(path, headers=who(sub))
            return status_of(answer).partition("; key=")[0]

        for path in (MODEL_GET, MODELS):
            assert await status(path) == "gemini-scale; fwd=miss; stored"
        await status(MODEL_GET, "bob")
        await stack.engine.invalidate(tags=[model_tag("gemini-2.5-flash")])
        assert await status(MODEL_GET) == "gemini-scale; fwd=miss; stored"
        assert await status(MODELS) == "gemini-scale; hit"  # no {model}: untouched
        await stack.engine.invalidate(tags=[principal_tag(alice)])
        assert await status(MODEL_GET) == "gemini-scale; fwd=miss; stored"
        assert await status(MODEL_GET, "bob") == "gemini-scale; fwd=miss; stored"  # by model
        assert await status(MODELS) == "gemini-scale; hit"  # shared: nobody's own
        shared = await stack.client.get(MODELS, headers=who("alice"))
        key = status_of(shared).partition('key="')[2].rstrip('"')
        assert await stack.engine.invalidate(keys=[key]) == 1
        assert await status(MODELS) == "gemini-scale; fwd=miss; stored"


async def test_custom_policy_tags() -> None:
    rules = {"GET /v1beta/models/{model}": CachePolicy(ttl=60, tags=("catalogue",))}
    async with cached(rules=rules) as stack:
        await stack.client.get(MODEL_GET, headers=who("alice"))
        await stack.engine.invalidate(tags=["catalogue"])
        again = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert status_of(again) == "gemini-scale; fwd=miss; stored"


async def test_the_outcome_and_key_are_shared_with_other_layers() -> None:
    seen: list[dict[str, object]] = []

    async def endpoint(request: Request) -> dict[str, str]:
        return {"ok": "yes"}

    router = APIRouter()
    router.add_api_route("/things/{model}", endpoint, methods=["GET"])
    cache(ttl=30)(endpoint)
    app = FastAPI()
    app.include_router(router, prefix="/api")
    stack = CacheMiddleware(app)

    async def spy(scope, receive, send):  # type: ignore[no-untyped-def]
        await stack(scope, receive, send)
        seen.append(dict(scope["gemini_scale"].extras))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=FakeAuth(spy)),
                                 base_url="http://t") as client:
        for _ in range(2):
            answer = await client.get("/api/things/m", headers=who("alice"))
            assert answer.json() == {"ok": "yes"}
    assert seen[0]["cache"] == "stored"  # a miss whose answer was kept
    assert "cache_hit" not in seen[0]
    assert seen[1]["cache"] == "hit"
    assert seen[1]["cache_hit"] is True
    assert seen[0]["cache_key"] == seen[1]["cache_key"]


async def test_routes_without_a_policy_and_other_scopes_pass_through() -> None:
    upstream = Upstream()
    app = CacheMiddleware(gemini_app(upstream), rules={})
    answer = await call(FakeAuth(app), "GET", MODEL_GET, headers=who("alice"))
    assert answer.status == 200
    assert "cache-status" not in answer.headers
    sent: list[object] = []

    async def receive() -> dict[str, str]:
        return {"type": "lifespan.startup"} if not sent else {"type": "lifespan.shutdown"}

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_anonymous_requests_on_a_principal_route_are_not_cached() -> None:
    async with cached() as stack:
        for _ in range(2):
            answer = await stack.client.get(MODEL_GET)
            assert status_of(answer) == "gemini-scale; fwd=bypass"
        shared = [await stack.client.get(MODELS) for _ in range(2)]
        assert status_of(shared[1]) == "gemini-scale; hit"  # shared entries need nobody


def test_options_are_validated() -> None:
    app = gemini_app(Upstream())
    for options in ({"generation": "sometimes"}, {"max_entry_bytes": 0},
                    {"max_body_bytes": True}):
        with pytest.raises(ConfigurationError):
            CacheMiddleware(app, **options)  # type: ignore[arg-type]
    from gemini_scale.caching import CacheEngine
    from gemini_scale.stores import MemoryStore

    store = MemoryStore()
    with pytest.raises(ConfigurationError):
        CacheMiddleware(app, store=store, engine=CacheEngine(store))
    for bad in ({"ttl": 0}, {"ttl": 1, "scope": "world"}, {"ttl": 1, "methods": frozenset()},
                {"ttl": 1, "vary": ("Accept",)}, {"ttl": 1, "vary": ("*",)},
                {"ttl": 1, "generation": "maybe"}, {"ttl": 1, "max_bytes": 0},
                {"ttl": 1, "tags": ("",)}):
        with pytest.raises(ConfigurationError):
            CachePolicy(**bad)  # type: ignore[arg-type]


async def test_an_answer_sent_by_path_is_passed_on_and_not_stored() -> None:
    """ASGI ``http.response.pathsend``: the held start goes out first; nothing is kept."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    middleware = CacheMiddleware(app, rules={"/file": CachePolicy(ttl=60)})
    answer = await call(FakeAuth(middleware), "GET", "/file", headers=who("alice"))
    assert [m["type"] for m in answer.messages] == [
        "http.response.start", "http.response.pathsend"]
    assert answer.headers["cache-status"] == "gemini-scale; fwd=miss"
    assert middleware.engine.stats.stored == 0


class _ChunkedAnswer:
    """An ASGI endpoint whose answer comes in three body messages, with or without a
    Content-Length (a class: Starlette calls plain functions with a Request)."""

    parts = (b'{"models": [', b'"a", "b"', b"]}")

    def __init__(self, *, declare_length: bool) -> None:
        self.declare_length = declare_length

    async def __call__(self, scope: dict[str, object], receive: object, send: object) -> None:
        headers = [(b"content-type", b"application/json")]
        if self.declare_length:
            headers.append((b"content-length", str(sum(map(len, self.parts))).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        for i, part in enumerate(self.parts):
            more = i < len(self.parts) - 1
            await send({"type": "http.response.body", "body": part, "more_body": more})  # type: ignore[operator]


@pytest.mark.parametrize("declare_length", [True, False])
async def test_a_relayed_answer_in_chunks_is_tagged_when_its_length_is_declared(
    declare_length: bool,
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    endpoint = _ChunkedAnswer(declare_length=declare_length)
    inner = Starlette(routes=[Route("/v1beta/models", endpoint)])
    rules = {"GET /v1beta/models": CachePolicy(ttl=60, scope="shared")}
    app = FakeAuth(CacheMiddleware(inner, rules=rules))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.get("/v1beta/models", headers=who("alice"))
        second = await client.get("/v1beta/models", headers=who("alice"))
    assert first.content == second.content == b'{"models": ["a", "b"]}'
    assert status_of(second) == "gemini-scale; hit"  # stored either way
    if declare_length:
        assert status_of(first) == "gemini-scale; fwd=miss; stored"
        assert first.headers["etag"] == second.headers["etag"]
    else:  # the start went out before the body was known: no tag on the miss
        assert status_of(first) == "gemini-scale; fwd=miss"
        assert "etag" not in first.headers
