"""Route policies are found before the framework routes, on Starlette and FastAPI alike."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router

from gemini_scale import (
    CachePolicy,
    ConfigurationError,
    GeminiMiddleware,
    RateLimitPolicy,
    RequestContext,
    RouteMatch,
    Rules,
    cache,
    mark,
    policy_for,
    rate_limit,
    route_path,
)
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

calls: list[str] = []


class CacheEnforcer(GeminiMiddleware):
    """A stand-in for a policy middleware: it answers *before* the endpoint when the route
    has a cache policy, so a test can prove the policy was known before routing."""

    enforces = frozenset({CachePolicy})

    def __init__(self, app: ASGIApp, *, rules: dict[str, Any] | None = None) -> None:
        super().__init__(app)
        self.rules = Rules(rules)

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        policy = policy_for(context, self.rules, CachePolicy, scope)
        if policy is not None:
            template = context.route.template if context.route else "rule"
            response = PlainTextResponse(
                "short-circuit", headers={"x-ttl": str(policy.ttl), "x-template": template}
            )
            await response(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-ttl"] = "none"
            await send(message)

        await self.app(scope, receive, send_wrapper)


async def get(app: ASGIApp, path: str, method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, path)


def endpoint(name: str) -> Any:
    async def handler(request: Request) -> Response:
        calls.append(name)
        return PlainTextResponse(name)

    handler.__name__ = handler.__qualname__ = name
    return handler


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def starlette_app() -> Starlette:
    sub = Starlette(routes=[Route("/deep/{item}", cache(ttl=7)(endpoint("deep")))])
    return Starlette(
        routes=[
            Route("/plain", endpoint("plain")),
            Route("/cached/{model}:generate", cache(ttl=5)(endpoint("cached")), methods=["POST"]),
            Mount(
                "/api",
                routes=[
                    Route("/items/{item_id}", cache(ttl=3)(endpoint("item"))),
                    Mount("/inner", routes=[Route("/x", cache(ttl=2)(endpoint("inner")))]),
                ],
            ),
            Mount("/sub", app=sub),
        ],
        middleware=[Middleware(CacheEnforcer)],
    )


@pytest.mark.parametrize(
    ("method", "path", "ttl", "template"),
    [
        ("POST", "/cached/gemini-2.5-flash:generate", "5", "/cached/{model}:generate"),
        ("GET", "/api/items/42", "3", "/api/items/{item_id}"),
        ("HEAD", "/api/items/42", "3", "/api/items/{item_id}"),
        ("GET", "/api/inner/x", "2", "/api/inner/x"),
        ("GET", "/sub/deep/abc", "7", "/sub/deep/{item}"),
    ],
)
async def test_starlette_marks_are_found_before_the_endpoint(
    method: str, path: str, ttl: str, template: str
) -> None:
    response = await get(starlette_app(), path, method)
    assert response.headers["x-ttl"] == ttl
    assert response.headers["x-template"] == template
    assert calls == []  # the middleware answered: the endpoint never ran


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/plain", 200),  # unmarked
        ("GET", "/cached/m:generate", 405),  # the method does not match the marked route
        ("GET", "/nowhere", 404),
    ],
)
async def test_starlette_unmarked_or_unmatched_requests_pass_through(
    method: str, path: str, status: int
) -> None:
    response = await get(starlette_app(), path, method)
    assert response.status_code == status
    assert response.headers["x-ttl"] == "none"


def fastapi_app(*, marks_above: bool) -> FastAPI:
    inner = APIRouter()
    outer = APIRouter()

    async def generate(model: str) -> dict[str, str]:
        calls.append("generate")
        return {"model": model}

    async def listing() -> dict[str, str]:
        calls.append("listing")
        return {"ok": "yes"}

    if marks_above:  # decorator order must not matter: marks never wrap
        cache(ttl=11)(inner.post("/models/{model}:generateContent")(generate))
    else:
        inner.post("/models/{model}:generateContent")(cache(ttl=11)(generate))
    outer.get("/models")(listing)
    outer.include_router(inner, prefix="/deep")
    app = FastAPI()
    for prefix in ("/v1", "/v1beta"):
        app.include_router(outer, prefix=prefix)
    app.add_middleware(CacheEnforcer)
    return app


@pytest.mark.parametrize("marks_above", [True, False])
@pytest.mark.parametrize("prefix", ["/v1", "/v1beta"])
async def test_fastapi_included_routers_with_prefixes(marks_above: bool, prefix: str) -> None:
    app = fastapi_app(marks_above=marks_above)
    hit = await get(app, f"{prefix}/deep/models/gemini-2.5-flash:generateContent", "POST")
    assert hit.headers["x-ttl"] == "11"
    assert hit.headers["x-template"] == f"{prefix}/deep/models/{{model}}:generateContent"
    passed = await get(app, f"{prefix}/models")
    assert passed.status_code == 200
    assert passed.headers["x-ttl"] == "none"
    assert calls == ["listing"]


def test_route_table_sees_every_fastapi_route() -> None:
    from gemini_scale import route_table

    table = route_table(fastapi_app(marks_above=True))
    found = table.match("POST", "/v1beta/deep/models/x:generateContent")
    assert found is not None
    assert found.params == {"model": "x"}
    assert found.policies[CachePolicy] == CachePolicy(ttl=11)


async def test_unenforced_policy_fails_safe_on_starlette(caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(
        routes=[
            Route("/limited", rate_limit("1/minute")(endpoint("limited"))),
            Route("/other", endpoint("other")),
        ],
        middleware=[Middleware(CacheEnforcer)],
    )
    with caplog.at_level(logging.ERROR):
        for path in ("/limited", "/other"):
            response = await get(app, path)
            assert response.status_code == 500
            assert response.json()["error"]["status"] == "INTERNAL"
            assert response.headers["cache-control"] == "no-store"
    assert calls == []  # nothing was served unprotected
    assert "/limited" in caplog.text
    assert "rate_limit" in caplog.text


async def test_unenforced_policy_fails_safe_on_fastapi() -> None:
    app = FastAPI()
    router = APIRouter()

    @router.get("/x")
    @rate_limit("5/minute")
    async def limited() -> dict[str, str]:
        calls.append("x")
        return {}

    app.include_router(router, prefix="/v1")
    app.add_middleware(CacheEnforcer)
    response = await get(app, "/v1/x")
    assert response.status_code == 500
    assert calls == []


async def test_enforcer_inside_a_mounted_app_counts_for_its_routes() -> None:
    sub = Starlette(
        routes=[Route("/r", rate_limit("5/minute")(endpoint("sub")))],
        middleware=[Middleware(RateLimitEnforcer)],
    )
    app = Starlette(routes=[Mount("/sub", app=sub)], middleware=[Middleware(CacheEnforcer)])
    response = await get(app, "/sub/r")
    assert response.status_code == 200
    assert calls == ["sub"]


class RateLimitEnforcer(GeminiMiddleware):
    enforces = frozenset({RateLimitPolicy})


async def test_wrapping_from_outside_still_finds_marks() -> None:
    router = Router(routes=[Route("/c", cache(ttl=4)(endpoint("c")))])
    app = CacheEnforcer(router)  # no add_middleware, no scope["app"]
    response = await get(app, "/c")
    assert response.headers["x-ttl"] == "4"


async def test_rules_work_on_any_asgi_app() -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append("bare")
        await PlainTextResponse("bare")(scope, receive, send)

    app = CacheEnforcer(bare, rules={"POST /v1/models/{model}:countTokens": CachePolicy(ttl=9)})
    hit = await get(app, "/v1/models/m:countTokens", "POST")
    assert hit.headers["x-ttl"] == "9"
    missed = await get(app, "/v1/models/m:countTokens", "GET")  # method differs
    assert missed.headers["x-ttl"] == "none"
    assert calls == ["bare"]


async def test_marks_take_precedence_over_rules() -> None:
    app = Starlette(
        routes=[Route("/m", cache(ttl=1)(endpoint("m"))), Route("/r", endpoint("r"))],
        middleware=[
            Middleware(CacheEnforcer, rules={"/m": CachePolicy(ttl=99), "/r": CachePolicy(ttl=50)})
        ],
    )
    assert (await get(app, "/m")).headers["x-ttl"] == "1"
    assert (await get(app, "/r")).headers["x-ttl"] == "50"


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = CacheEnforcer(inner)
    for kind in ("lifespan", "websocket"):
        scope: dict[str, Any] = {"type": kind}
        await middleware(scope, _never, _never_send)
        assert "gemini_scale" not in scope
    assert seen == ["lifespan", "websocket"]


async def _never() -> Message:
    raise AssertionError("not called")


async def _never_send(message: Message) -> None:
    raise AssertionError("not called")


def test_marking_twice_with_one_kind_is_an_error() -> None:
    async def handler() -> None: ...

    cache(ttl=1)(handler)
    with pytest.raises(ConfigurationError, match="already has a cache policy"):
        cache(ttl=2)(handler)


def test_marks_return_the_same_function() -> None:
    async def handler() -> None: ...

    assert rate_limit("1/second", tokens="100/minute")(handler) is handler


def test_unmarkable_objects_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        mark(CachePolicy(ttl=1))(len)


@pytest.mark.parametrize("bad", ["lots", "5/fortnight", "-1/minute"])
def test_bad_limit_strings_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        rate_limit(bad)


def test_rules_need_absolute_templates() -> None:
    with pytest.raises(ConfigurationError):
        Rules({"v1/x": CachePolicy(ttl=1)})


async def run_lifespan(app: ASGIApp) -> list[Message]:
    """Drive an ASGI lifespan startup and shutdown; return what the app sent."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    await app(scope, receive, send)
    return sent


async def test_an_unenforced_policy_fails_start_up() -> None:
    app = Starlette(
        routes=[Route("/limited", rate_limit("1/minute")(endpoint("limited")))],
        middleware=[Middleware(CacheEnforcer), Middleware(CacheEnforcer)],
    )
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "/limited" in sent[0]["message"]
    assert "rate_limit" in sent[0]["message"]


async def test_a_well_configured_app_starts() -> None:
    app = Starlette(
        routes=[Route("/c", cache(ttl=1)(endpoint("c")))],
        middleware=[Middleware(RateLimitEnforcer), Middleware(CacheEnforcer)],
    )
    sent = await run_lifespan(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_marks_under_host_routes_fail_the_audit() -> None:
    """Host routing is the framework's alone: a mark there could never be enforced."""
    from starlette.routing import Host

    app = Starlette(
        routes=[
            Host("api.example", app=Router(routes=[Route("/c", cache(ttl=4)(endpoint("hosted")))]))
        ],
        middleware=[Middleware(CacheEnforcer)],
    )
    sent = await run_lifespan(app)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "Host" in sent[0]["message"]


@pytest.mark.parametrize("limits", ["0/minute", "2/minute;5/minute", "1/second;2/1 second"])
def test_ambiguous_or_empty_limits_are_configuration_errors(limits: str) -> None:
    with pytest.raises(ConfigurationError):
        rate_limit(limits)


@pytest.mark.parametrize(
    ("root", "path", "routed"),
    [
        ("", "/v1beta/models", "/v1beta/models"),
        ("/gw", "/gw/v1beta/models", "/v1beta/models"),
        ("/gw", "/gw", "/"),
        ("/gw", "/gwx/v1beta/models", "/gwx/v1beta/models"),  # another segment, not the root
        ("/gw", "/v1beta/models", "/v1beta/models"),  # a server that left the root out
    ],
)
def test_route_path_takes_off_the_root_path_only(root: str, path: str, routed: str) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root}) == routed


def test_a_route_match_is_a_read_only_value() -> None:
    first = RouteMatch("/m/{model}", {"model": "a", "x": "1"}, {})
    second = RouteMatch("/m/{model}", {"x": "1", "model": "a"}, {})
    assert first == second
    assert hash(first) == hash(second)
    assert first != RouteMatch("/m/{model}", {"model": "b", "x": "1"}, {})
    with pytest.raises(AttributeError):
        first.template = "/other"  # type: ignore[misc]
