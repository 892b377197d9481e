"""Per-route lifecycle (``@version`` and central rules) and deprecated or removed versions."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemini_scale import (
    Version,
    VersionBundle,
    VersionMiddleware,
    VersionPolicy,
    gemini_versions,
    version,
)
from tests.gateway import lifespan

DEPRECATED = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
SUNSET = dt.date(2027, 1, 1)


async def ok(request: Request) -> Response:
    return JSONResponse({"path": request.url.path})


@version(deprecated=DEPRECATED, sunset=SUNSET, replacement="/v1beta/new", info="https://x.test/d")
async def old_route(request: Request) -> Response:
    return JSONResponse({"old": True})


@version(added="v1beta")
async def beta_only(request: Request) -> Response:
    return JSONResponse({"beta": True})


@version(removed="2026-01-15", replacement="/reports")
async def legacy_report(request: Request) -> Response:
    return JSONResponse({"report": "legacy"})


DATED = VersionBundle(Version("2026-01-15"), Version("2025-06-01"))


def app_with(**options: object) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1beta/old", old_route),
            Route("/v1beta/beta-only", beta_only),
            Route("/v1beta/models", ok),
            Route("/legacy-report", legacy_report),
            Route("/healthz", ok),
        ]
    )
    app.add_middleware(VersionMiddleware, dated=DATED, **options)  # type: ignore[arg-type]
    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app_with())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def test_deprecated_route_carries_rfc_headers(client: httpx.AsyncClient) -> None:
    for prefix in ("/v1", "/v1beta"):
        response = await client.get(f"{prefix}/old")
        assert response.status_code == 200
        assert response.headers["deprecation"] == f"@{int(DEPRECATED.timestamp())}"
        assert parsedate_to_datetime(response.headers["sunset"]) == dt.datetime(
            2027, 1, 1, tzinfo=dt.UTC
        )
        links = response.headers.get_list("link")
        assert '<https://x.test/d>; rel="deprecation"' in links
        assert '</v1beta/new>; rel="successor-version"' in links


async def test_route_added_in_a_later_version_is_404_for_older(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1beta/beta-only")).status_code == 200
    response = await client.get("/v1/beta-only")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["status"] == "NOT_FOUND"
    assert "added in v1beta" in error["message"]


async def test_removed_route_names_its_replacement(client: httpx.AsyncClient) -> None:
    old = await client.get("/legacy-report", headers={"X-API-Version": "2025-06-01"})
    assert old.json() == {"report": "legacy"}
    gone = await client.get("/legacy-report", headers={"X-API-Version": "2026-01-15"})
    assert gone.status_code == 404
    assert "removed in API version 2026-01-15. Use /reports instead." in gone.text
    assert gone.headers["cache-control"] == "no-store"


async def test_central_rules_work_like_marks() -> None:
    rules = {"GET /v1beta/models": VersionPolicy(deprecated=DEPRECATED)}
    transport = httpx.ASGITransport(app_with(rules=rules))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/v1/models")
        assert response.json() == {"path": "/v1beta/models"}
        assert response.headers["deprecation"] == f"@{int(DEPRECATED.timestamp())}"


async def test_deprecated_and_removed_versions() -> None:
    bundle = VersionBundle(
        Version("v3"),
        Version("v2", deprecated=DEPRECATED, sunset=SUNSET, replacement="v3"),
        Version("v1", removed=True, replacement="v3"),
    )
    app = Starlette(routes=[Route("/v3/models", ok), Route("/healthz", ok)])
    app.add_middleware(VersionMiddleware, versions=bundle)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        current = await client.get("/v3/models")
        assert "deprecation" not in current.headers
        deprecated = await client.get("/v2/models")
        assert deprecated.json() == {"path": "/v3/models"}
        assert deprecated.headers["deprecation"].startswith("@")
        assert "sunset" in deprecated.headers
        assert deprecated.headers["link"] == '</v3>; rel="successor-version"'
        removed = await client.get("/v1/models")
        assert removed.status_code == 404
        assert "API version v1 has been removed; use v3 instead." in removed.text
        assert (await client.get("/healthz")).status_code == 200


async def test_health_routes_are_never_gated(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-API-Version": "junk"})
    assert response.status_code == 200


async def test_unknown_version_names_in_marks_fail_at_start_up() -> None:
    @version(added="v7")
    async def mistaken(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1beta/x", mistaken)])
    app.add_middleware(VersionMiddleware)
    with pytest.raises(RuntimeError, match="unknown version 'v7'"):
        async with lifespan(app):
            pass


async def test_fastapi_included_router_marks_are_found() -> None:
    router = APIRouter()

    @router.get("/models/{model}")
    @version(deprecated=DEPRECATED)
    async def get_model(model: str) -> dict[str, str]:
        return {"model": model}

    app = FastAPI()
    app.include_router(router, prefix="/v1beta")
    app.add_middleware(VersionMiddleware, versions=gemini_versions())
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/v1/models/gemini-2.5-flash")
        assert response.json() == {"model": "gemini-2.5-flash"}
        assert "deprecation" in response.headers


async def test_version_policy_without_middleware_is_refused() -> None:
    """The fail-safe audit: a route marked @version with no VersionMiddleware in the stack."""
    from gemini_scale import JSONBodyMiddleware

    app = Starlette(routes=[Route("/v1beta/old", old_route)])
    app.add_middleware(JSONBodyMiddleware)
    with pytest.raises(RuntimeError, match="version"):
        async with lifespan(app):
            pass
