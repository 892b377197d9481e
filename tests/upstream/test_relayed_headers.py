"""Headers the upstream sends back: relayed byte for byte (UTF-8 values included), never a
500, and never a pooled connection left taken; an error's ``Retry-After`` is relayed only
when it is one (delay-seconds or an HTTP-date). A ``HEAD`` goes upstream as a ``GET``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gemini_scale.types import Receive, Scope, Send
from gemini_scale.upstream import GeminiUpstream
from tests.servers import serve
from tests.upstream.test_review_fixes import GENERATE_PATH, PROMPT, recorded, relay

EURO_DISPOSITION = 'inline; filename="\u20ac.json"'.encode()
QUOTA_ERROR = {
    "error": {
        "code": 429,
        "message": "Quota exceeded.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "27s"},
        ],
    }
}


async def post(app: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.post(GENERATE_PATH, json=PROMPT)


async def test_a_utf8_header_value_is_relayed_as_it_came() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers=[(b"content-type", b"application/json"),
                     (b"content-disposition", EURO_DISPOSITION)],
            json={"candidates": []},
        )

    async with recorded(answer) as (upstream, _):
        response = await post(relay(upstream))
    assert response.status_code == 200
    assert response.json() == {"candidates": []}
    assert dict(response.headers.raw)[b"content-disposition"] == EURO_DISPOSITION


@pytest.mark.parametrize(
    ("given", "relayed"),
    [
        ('inline; filename="\u20ac"'.encode(), "27"),  # not a Retry-After: RetryInfo says
        (b"soon", "27"),
        (b"12", "12"),
        (b"Wed, 21 Oct 2037 07:28:00 GMT", "Wed, 21 Oct 2037 07:28:00 GMT"),
    ],
)
async def test_an_error_relays_only_a_usable_retry_after(given: bytes, relayed: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            headers=[(b"content-type", b"application/json"), (b"retry-after", given)],
            json=QUOTA_ERROR,
        )

    async with recorded(answer) as (upstream, _):
        response = await post(relay(upstream))
    assert response.status_code == 429
    assert response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert response.headers["retry-after"] == relayed


async def test_utf8_headers_leave_no_pooled_connection_taken() -> None:
    """Over a real socket, with a pool of one connection: answers with a UTF-8 header (on a
    success and on an error) are relayed, and each call after them finds its connection."""

    async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        failing = scope["path"].endswith("/fail")
        await send({
            "type": "http.response.start",
            "status": 429 if failing else 200,
            "headers": [(b"content-type", b"application/json"),
                        (b"retry-after" if failing else b"content-disposition",
                         EURO_DISPOSITION)],
        })
        await send({"type": "http.response.body",
                    "body": b'{"error": {"code": 429, "message": "q"}}' if failing
                    else b'{"candidates": []}' * 500})

    with serve(upstream_app) as live:
        async with GeminiUpstream(
            base_url=live.url, max_connections=1, connect_timeout=2
        ) as upstream:
            for path in ("/ok", "/fail", "/ok", "/fail", "/ok"):
                response = await upstream.request("GET", path)
                assert response.status_code == (429 if path == "/fail" else 200)
                if path == "/ok":
                    assert dict(response.raw_headers)[b"content-disposition"] == (
                        EURO_DISPOSITION
                    )
                    await response.aclose()  # type: ignore[attr-defined]


async def test_head_goes_upstream_as_get() -> None:
    async with recorded() as (upstream, seen):
        transport = httpx.ASGITransport(app=relay(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.head("/v1beta/models")
    assert response.status_code == 200
    assert [(request.method, request.url.path) for request in seen] == [
        ("GET", "/v1beta/models")
    ]


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_a_bodiless_methods_body_is_drained_not_sent(method: str) -> None:
    """Such a body is not a Gemini request's: it is read and dropped (never kept whole,
    whatever its size) and the upstream call carries none."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 10_000

    async with recorded() as (upstream, seen):
        transport = httpx.ASGITransport(app=relay_all(upstream))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await client.request(method, "/v1beta/models", content=chunks())
    assert response.status_code == 200
    assert [(r.method, r.content) for r in seen] == [("DELETE" if method == "DELETE" else "GET",
                                                      b"")]


def relay_all(upstream: GeminiUpstream) -> Starlette:
    """A service whose one endpoint relays every method upstream."""

    async def endpoint(request: Request) -> Response:
        return await upstream.forward(request)

    return Starlette(routes=[Route("/{path:path}", endpoint,
                                   methods=["GET", "HEAD", "POST", "DELETE"])])
