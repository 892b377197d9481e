"""Every middleware is an ASGI 3 app to the servers that look, compiled or not.

uvicorn (``interface="auto"``, its default) and hypercorn tell ASGI 2 from ASGI 3 by
``iscoroutinefunction(app.__call__)``. Compiled with mypyc, a middleware that inherits its
``__call__`` answered no there, so an app handed to the server as ``RateLimitMiddleware(app)``
failed every request with a TypeError (ASGI 2 calls ``app(scope)``).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import gemini_scale
from gemini_scale import MetricsMiddleware, RateLimitMiddleware, RateLimitPolicy
from gemini_scale.routing import GeminiMiddleware
from tests.servers import serve

# What each needs beyond the app (the rest have defaults for every option).
_OPTIONS: dict[str, dict[str, Any]] = {
    "OAuth2Middleware": {"issuer": "https://issuer.example", "audience": "gemini"},
    "MetricsMiddleware": {"registry": None},  # a fresh registry per instance (see below)
}


async def _models(request: Request) -> Response:
    return JSONResponse({"models": []})


def _app() -> Starlette:
    return Starlette(routes=[Route("/v1beta/models", _models)])


def _middleware_classes() -> list[type[GeminiMiddleware]]:
    found = [
        value
        for name in gemini_scale.__all__
        if inspect.isclass(value := getattr(gemini_scale, name))
        and issubclass(value, GeminiMiddleware)
        and value is not GeminiMiddleware
    ]
    assert len(found) >= 7, found
    return found


def _build(cls: type[GeminiMiddleware]) -> Any:
    options = dict(_OPTIONS.get(cls.__name__, {}))
    if "registry" in options:
        options["registry"] = CollectorRegistry()
    return cls(_app(), **options)


@pytest.mark.parametrize("cls", _middleware_classes(), ids=lambda cls: cls.__name__)
def test_servers_detect_each_middleware_as_asgi3(cls: type[GeminiMiddleware]) -> None:
    middleware = _build(cls)
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio.iscoroutinefunction(middleware.__call__)  # what uvicorn asks on 3.11-3.13
    config = uvicorn.Config(middleware, lifespan="off", log_config=None)
    config.load()
    assert config.interface == "asgi3"


def test_a_subclass_of_a_middleware_is_detected_as_asgi3_too() -> None:
    class Mine(RateLimitMiddleware):
        pass

    class Deeper(Mine):
        pass

    for cls in (Mine, Deeper):
        assert inspect.iscoroutinefunction(cls(_app()).__call__)


def test_a_middleware_served_directly_by_uvicorn_answers() -> None:
    # The outermost app is the middleware itself, the interface left to uvicorn's detection.
    registry = CollectorRegistry()
    limited = RateLimitMiddleware(_app(), default=RateLimitPolicy.parse("2/minute"))
    app = MetricsMiddleware(limited, registry=registry)
    with serve(app, interface="auto") as live, httpx.Client(base_url=live.url) as client:
        answers = [client.get("/v1beta/models") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[0].json() == {"models": []}
    assert answers[2].json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_a_subclass_keeps_a_call_of_its_own() -> None:
    """A plain ``__call__`` (returning the awaitable), the class's own or a mixin's met
    first, is what runs: never replaced by the coroutine function further up."""

    class Counting(RateLimitMiddleware):
        calls = 0

        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            type(self).calls += 1
            return super().__call__(scope, receive, send)

    class Wrapping:
        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            return GeminiMiddleware.__call__(self, scope, receive, send)  # type: ignore[arg-type]

    class Mixed(Wrapping, RateLimitMiddleware):
        pass

    assert vars(Counting)["__call__"].__qualname__.endswith("Counting.__call__")
    assert Mixed.__call__ is Wrapping.__call__

    async def one_request() -> int:
        transport = httpx.ASGITransport(app=Counting(_app()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/v1beta/models")).status_code

    assert asyncio.run(one_request()) == 200
    assert Counting.calls == 1
