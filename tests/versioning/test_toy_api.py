"""A three-version toy API (dated ``X-API-Version``): a renamed field, a removed field and a
moved endpoint, migrated in both directions across two hops, for JSON, SSE and the JSON
array stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import (
    ConfigurationError,
    EndpointMoved,
    FieldAdded,
    FieldRemoved,
    FieldRenamed,
    Version,
    VersionBundle,
    VersionMiddleware,
)
from tests.cache.support import call
from tests.sse import sse_events

OLDEST, MIDDLE, HEAD = "2025-10-01", "2026-01-15", "2026-03-01"

#: 2025-10-01: {"name", "nickname"} at /people
#: 2026-01-15: "name" is renamed "fullName"
#: 2026-03-01 (head): "nickname" is removed, "/people" moves to "/users", "email" is added
BUNDLE = VersionBundle(
    Version(
        HEAD,
        FieldRemoved("nickname", default="(none)", routes=("POST /users", "POST /users/stream")),
        FieldRemoved("items.*.nickname", default="(none)", routes=("GET /users",)),
        FieldAdded(
            "email", default="unknown@example.com", routes=("POST /users", "POST /users/stream")
        ),
        FieldAdded("items.*.email", routes=("GET /users",)),
        EndpointMoved("/people", "/users"),
        EndpointMoved("/people/stream", "/users/stream"),
    ),
    Version(MIDDLE, FieldRenamed("name", "fullName"), FieldRenamed("items.*.name", "fullName")),
    Version(OLDEST),
)


class Head:
    """The head implementation: it only knows the newest shape, and records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        self.hold = False

    async def user(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append((request.url.path, body))
        return JSONResponse(
            {"fullName": body.get("fullName"), "email": body.get("email"), "id": 7}
        )

    async def listing(self, request: Request) -> Response:
        self.seen.append((request.url.path, None))
        items = [{"fullName": f"user {i}", "email": f"u{i}@example.com"} for i in range(3)]
        return JSONResponse({"items": items})

    async def stream(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append((request.url.path, body))
        sse = request.query_params.get("alt") == "sse"

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                event = json.dumps({"fullName": f"event {i}", "email": "e@example.com"})
                if sse:
                    yield f"data: {event}\r\n\r\n".encode()
                else:
                    yield ("[" if i == 0 else ",\r\n").encode() + event.encode()
                if i == 0 and self.hold:
                    await self.release.wait()
            if not sse:
                yield b"]"

        media = "text/event-stream" if sse else "application/json"
        return StreamingResponse(events(), media_type=media)


def toy_app(head: Head, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/users", head.user, methods=["POST"]),
            Route("/users", head.listing, methods=["GET"]),
            Route("/users/stream", head.stream, methods=["POST"]),
            Route("/healthz", lambda request: JSONResponse({"ok": True})),
        ]
    )
    app.add_middleware(VersionMiddleware, versions=None, dated=BUNDLE, **options)
    return app


@pytest.fixture
def head() -> Head:
    return Head()


@pytest.fixture
async def client(head: Head) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(toy_app(head))
    async with httpx.AsyncClient(transport=transport, base_url="http://toy") as client:
        yield client


async def test_oldest_client_two_hops_request_and_response(
    client: httpx.AsyncClient, head: Head
) -> None:
    response = await client.post(
        "/people", json={"name": "Ada", "nickname": "ada"}, headers={"X-API-Version": OLDEST}
    )
    assert response.status_code == 200
    # Up two hops: renamed, then the removed member dropped, the added one defaulted, and the
    # endpoint moved.
    assert head.seen == [("/users", {"fullName": "Ada", "email": "unknown@example.com"})]
    # Down two hops: the added member gone, the removed one back, the renamed one renamed.
    assert response.json() == {"name": "Ada", "id": 7, "nickname": "(none)"}
    assert response.headers["x-api-version"] == OLDEST


async def test_middle_client_one_hop(client: httpx.AsyncClient, head: Head) -> None:
    response = await client.post(
        "/people", json={"fullName": "Bo"}, headers={"X-API-Version": MIDDLE}
    )
    assert head.seen == [("/users", {"fullName": "Bo", "email": "unknown@example.com"})]
    assert response.json() == {"fullName": "Bo", "id": 7, "nickname": "(none)"}


async def test_head_client_is_untouched(client: httpx.AsyncClient, head: Head) -> None:
    body = {"fullName": "Cy", "email": "cy@example.com"}
    for headers in ({"X-API-Version": HEAD}, {}):  # no header: the head (the default)
        response = await client.post("/users", json=body, headers=headers)
        assert response.json() == {"fullName": "Cy", "email": "cy@example.com", "id": 7}
        assert response.headers["x-api-version"] == HEAD
    assert head.seen == [("/users", body), ("/users", body)]


async def test_old_endpoint_is_not_reachable_on_the_head(client: httpx.AsyncClient) -> None:
    response = await client.post("/people", json={"fullName": "x"})
    assert response.status_code == 404


async def test_wildcard_fields_migrate_in_lists(client: httpx.AsyncClient) -> None:
    response = await client.get("/people", headers={"X-API-Version": OLDEST})
    assert response.json() == {
        "items": [{"name": f"user {i}", "nickname": "(none)"} for i in range(3)]
    }


@pytest.mark.parametrize("alt", ["sse", None])
async def test_streams_migrate_event_by_event(head: Head, alt: str | None) -> None:
    """Each SSE event (or element of the JSON array stream) is migrated on its own, and the
    first one reaches the client while the head still holds the rest."""
    head.hold = True
    app = toy_app(head)
    query = b"alt=sse" if alt else b""
    task = asyncio.create_task(
        call(app, "POST", "/people/stream", query=query, json_body={"name": "S"},
             headers={"x-api-version": OLDEST})
    )
    await asyncio.sleep(0)
    for _ in range(200):
        if head.seen:
            break
        await asyncio.sleep(0.01)
    # Still held after the first event: the recorder must already have it.
    await asyncio.sleep(0.1)
    assert not task.done()
    released = time.monotonic()
    head.release.set()
    recorded = await asyncio.wait_for(task, 5)
    assert recorded.times[1] < released  # the first event went out while the head held
    assert head.seen == [("/users/stream", {"fullName": "S", "email": "unknown@example.com"})]
    first_event = recorded.chunks[0]
    assert b"event 0" in first_event
    assert b"event 1" not in first_event
    expected = [{"name": f"event {i}", "nickname": "(none)"} for i in range(3)]
    if alt:
        assert recorded.headers["content-type"].startswith("text/event-stream")
        assert sse_events(recorded.body) == expected
        assert len(recorded.chunks) >= 3  # one send per upstream chunk, nothing merged
    else:
        assert json.loads(recorded.body) == expected
    assert "content-length" not in recorded.headers


async def test_unknown_version_is_400_listing_the_known(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/users", json={}, headers={"X-API-Version": "2099-01-01"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert all(name in error["message"] for name in (OLDEST, MIDDLE, HEAD))
    assert response.headers["cache-control"] == "no-store"


async def test_unknown_dates_waterfall_when_asked(head: Head) -> None:
    transport = httpx.ASGITransport(toy_app(head, unknown="closest"))
    async with httpx.AsyncClient(transport=transport, base_url="http://toy") as client:
        response = await client.post(
            "/people", json={"name": "W"}, headers={"X-API-Version": "2025-12-31"}
        )
        assert response.headers["x-api-version"] == OLDEST
        assert response.json()["name"] == "W"
        before = await client.post("/users", json={}, headers={"X-API-Version": "2020-01-01"})
        assert before.status_code == 400
        garbage = await client.post("/users", json={}, headers={"X-API-Version": "latest"})
        assert garbage.status_code == 400


async def test_default_version_and_required_header(head: Head) -> None:
    for default, status in ((OLDEST, 200), ("required", 400)):
        transport = httpx.ASGITransport(toy_app(head, default=default))
        async with httpx.AsyncClient(transport=transport, base_url="http://toy") as client:
            response = await client.post("/people", json={"name": "D"})
            assert response.status_code == status
            if status == 200:
                assert response.json()["name"] == "D"
                assert response.headers["x-api-version"] == OLDEST
            else:
                assert "X-API-Version" in response.json()["error"]["message"]


async def test_health_is_never_versioned(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-API-Version": "nonsense"})
    assert response.status_code == 200
    assert "x-api-version" not in response.headers


async def test_a_body_that_is_not_json_reaches_the_app_unchanged(
    client: httpx.AsyncClient, head: Head
) -> None:
    with pytest.raises(json.JSONDecodeError):  # the toy head parses it itself, and fails
        await client.post(
            "/people", content=b"{not json", headers={
                "X-API-Version": OLDEST, "content-type": "application/json"
            },
        )


def test_changelog_lists_every_version_and_change() -> None:
    page = BUNDLE.changelog("Toy API")
    assert page.startswith("# Toy API")
    assert page.index(HEAD) < page.index(MIDDLE) < page.index(OLDEST)
    assert "`name` is renamed `fullName`." in page
    assert "`/people` moves to `/users`." in page
    assert "`nickname` is removed." in page


def test_bundle_validation() -> None:
    with pytest.raises(ConfigurationError):
        VersionBundle(Version("2026-01-01"), Version("2026-03-01"))  # not newest first
    with pytest.raises(ConfigurationError):
        VersionBundle(Version("a"), Version("b", FieldRenamed("x", "y")))  # oldest changes
    with pytest.raises(ConfigurationError):
        VersionBundle(Version("a"), Version("a"))
    with pytest.raises(ConfigurationError):
        FieldRenamed("a.b", "c.d")
    with pytest.raises(ConfigurationError):
        EndpointMoved("/a/{x}", "/b/{y}")
