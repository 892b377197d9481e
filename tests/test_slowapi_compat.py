"""A FastAPI service that already limits with slowapi keeps working with OAuth2Middleware in
front, and gemini-scale's key functions give slowapi one bucket per verified principal,
tenant, model, route or (trusted-proxy) client address."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware

from example_app.dev_issuer import DevIssuer
from gemini_scale import ConfigurationError, Issuer, OAuth2Middleware, public
from gemini_scale.keys import (
    TrustedProxies,
    client_ip_key,
    model_key,
    principal_key,
    route_key,
    tenant_key,
)

AUDIENCE = "https://gemini-scale.test"
DEV = DevIssuer(audience=AUDIENCE)
GENERATE = "/v1beta/models/{model}:generateContent"
FLASH = "/v1beta/models/gemini-2.5-flash:generateContent"
PRO = "/v1beta/models/gemini-2.5-pro:generateContent"

Setup = Literal["decorator", "base-middleware", "asgi-middleware"]
SETUPS: tuple[Setup, ...] = ("decorator", "base-middleware", "asgi-middleware")


def slowapi_app(
    key_func: Callable[..., str],
    setup: Setup = "decorator",
    key_style: Literal["url", "endpoint"] = "url",
) -> FastAPI:
    """slowapi's documented setup, then gemini-scale's OAuth2Middleware added in front.

    slowapi scopes every bucket by the request path (``key_style="url"``, its default) or by
    the endpoint function (``"endpoint"``), on top of the key function's value.
    """
    asgi = setup == "asgi-middleware"
    limiter = Limiter(
        key_func=key_func, default_limits=["2/minute"] if asgi else [], key_style=key_style
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    async def generate(request: Request, model: str) -> dict[str, str]:
        return {"model": model, "subject": request.state.principal.subject}

    # slowapi's decorator needs the ``request`` parameter; the ASGI middleware needs none.
    app.post(GENERATE)(generate if asgi else limiter.limit("2/minute")(generate))

    @app.get("/healthz")
    @public
    @limiter.limit("2/minute")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok"}

    if setup == "base-middleware":
        app.add_middleware(SlowAPIMiddleware)
    elif asgi:
        app.add_middleware(SlowAPIASGIMiddleware)
    issuer = Issuer(issuer=DEV.issuer, audience=AUDIENCE, jwks=DEV.jwks())
    app.add_middleware(OAuth2Middleware, issuers=[issuer])  # outermost: runs first
    return app


@asynccontextmanager
async def serving(
    app: FastAPI, peer: tuple[str, int] = ("127.0.0.1", 123)
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=peer)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def token(subject: str, **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {DEV.mint(subject=subject, **claims)}"}


async def statuses(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], times: int = 3
) -> list[int]:
    return [(await client.post(path, headers=headers)).status_code for _ in range(times)]


@pytest.mark.parametrize("setup", SETUPS)
async def test_each_principal_gets_its_own_slowapi_bucket(setup: Setup) -> None:
    async with serving(slowapi_app(principal_key, setup)) as client:
        alice, bob = token("alice"), token("bob")
        first = await client.post(FLASH, headers=alice)
        assert first.status_code == 200
        assert first.json() == {"model": "gemini-2.5-flash", "subject": "alice"}
        assert await statuses(client, FLASH, alice, times=2) == [200, 429]
        assert await statuses(client, FLASH, bob) == [200, 200, 429]
        # a fresh token for the same principal is the same bucket
        refused = await client.post(FLASH, headers=token("alice"))
        assert refused.status_code == 429
        assert "Rate limit exceeded" in refused.text


@pytest.mark.parametrize("setup", SETUPS)
async def test_a_principal_bucket_spans_paths_with_endpoint_key_style(setup: Setup) -> None:
    async with serving(slowapi_app(principal_key, setup, key_style="endpoint")) as client:
        assert await statuses(client, FLASH, token("alice"), times=2) == [200, 200]
        assert await statuses(client, PRO, token("alice"), times=1) == [429]
        assert await statuses(client, PRO, token("bob")) == [200, 200, 429]


@pytest.mark.parametrize("setup", SETUPS)
async def test_unauthenticated_requests_are_refused_before_slowapi(setup: Setup) -> None:
    async with serving(slowapi_app(principal_key, setup)) as client:
        for _ in range(5):
            refused = await client.post(FLASH)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == 'Bearer realm="gemini-scale"'
        assert await statuses(client, FLASH, token("alice")) == [200, 200, 429]


async def test_b08_spoofed_addresses_do_not_escape_the_principal_bucket() -> None:
    async with serving(slowapi_app(principal_key)) as client:
        alice = token("alice")
        codes = [
            (
                await client.post(FLASH, headers={**alice, "x-forwarded-for": f"198.51.100.{n}"})
            ).status_code
            for n in range(4)
        ]
    assert codes == [200, 200, 429, 429]


async def test_tenant_key_shares_a_tenant_and_isolates_the_tenantless() -> None:
    async with serving(slowapi_app(tenant_key)) as client:
        assert await statuses(client, FLASH, token("alice", tenant="acme"), times=2) == [200, 200]
        assert await statuses(client, FLASH, token("bob", tenant="acme"), times=1) == [429]
        assert await statuses(client, FLASH, token("carol")) == [200, 200, 429]
        assert await statuses(client, FLASH, token("dave")) == [200, 200, 429]


async def test_model_key_is_one_bucket_per_model_for_everyone() -> None:
    async with serving(slowapi_app(model_key, key_style="endpoint")) as client:
        assert await statuses(client, FLASH, token("alice"), times=2) == [200, 200]
        assert await statuses(client, FLASH, token("bob"), times=1) == [429]
        assert await statuses(client, PRO, token("bob")) == [200, 200, 429]


async def test_route_key_is_one_bucket_per_route_template() -> None:
    async with serving(slowapi_app(route_key, key_style="endpoint")) as client:
        assert await statuses(client, FLASH, token("alice"), times=1) == [200]
        assert await statuses(client, PRO, token("bob")) == [200, 429, 429]


async def test_client_ip_key_believes_only_trusted_proxies() -> None:
    key = client_ip_key(trusted=TrustedProxies(["127.0.0.1"]))
    behind_proxy = slowapi_app(key)
    async with serving(behind_proxy) as client:
        alice = token("alice")
        one = {**alice, "x-forwarded-for": "203.0.113.1"}
        two = {**alice, "x-forwarded-for": "spoofed, 203.0.113.2"}
        assert await statuses(client, FLASH, one) == [200, 200, 429]
        assert await statuses(client, FLASH, two) == [200, 200, 429]
    # the same key on a peer that is not a proxy: the peer, whatever it forwards
    async with serving(slowapi_app(key), peer=("192.0.2.50", 1)) as client:
        codes = [
            (
                await client.post(FLASH, headers={**alice, "x-forwarded-for": f"203.0.113.{n}"})
            ).status_code
            for n in range(3)
        ]
    assert codes == [200, 200, 429]


async def test_client_ip_key_serves_public_routes() -> None:
    key = client_ip_key(trusted=TrustedProxies(["127.0.0.1"]))
    async with serving(slowapi_app(key)) as client:
        codes = [(await client.get("/healthz")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_principal_key_on_a_public_route_is_a_configuration_error() -> None:
    """No verified principal: an explicit error, never a shared fallback bucket."""
    async with serving(slowapi_app(principal_key)) as client:
        with pytest.raises(ConfigurationError, match="verified principal"):
            await client.get("/healthz")


def test_client_ip_key_needs_trusted_proxies() -> None:
    with pytest.raises(ConfigurationError, match="TrustedProxies"):
        client_ip_key(trusted=["127.0.0.1"])  # type: ignore[arg-type]
