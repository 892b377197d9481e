"""Request bodies: JSON only, capped, parsed once; refusals in Google's envelope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from orjson import loads as orjson_loads
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemini_scale import JSONBodyMiddleware
from gemini_scale.types import Message

seen: list[bytes] = []


async def echo(request: Request) -> Response:
    body = await request.body()
    seen.append(body)
    context = request.scope["gemini_scale"]
    return JSONResponse({"length": len(body), "parsed": context.extras.get("json")})


def app(max_body_bytes: int = 1024) -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/echo", echo, methods=["POST", "GET"]),
            Route("/other", echo, methods=["POST"]),
        ],
        middleware=[
            Middleware(JSONBodyMiddleware, max_body_bytes=max_body_bytes, path_prefixes=("/v1/",))
        ],
    )


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


async def post(
    path: str, content: bytes, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app(**kw))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.post(
            path, content=content, headers=headers or {"content-type": "application/json"}
        )


def assert_google_error(response: httpx.Response, code: int, status: str) -> None:
    assert response.status_code == code
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["status"] == status
    assert error["message"]
    assert seen == []  # the app never ran


async def test_valid_json_is_parsed_once_and_replayed_unchanged() -> None:
    raw = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    response = await post("/v1/echo", raw)
    assert response.status_code == 200
    assert response.json() == {
        "length": len(raw),
        "parsed": {"contents": [{"parts": [{"text": "hi"}]}]},
    }
    assert seen == [raw]


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1', b"\xff\xfe", b"[" * 100_000])
async def test_malformed_json_is_400(raw: bytes) -> None:
    response = await post("/v1/echo", raw, max_body_bytes=1_000_000)
    assert_google_error(response, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null"])
async def test_a_body_that_is_not_an_object_is_400(raw: bytes) -> None:
    assert_google_error(await post("/v1/echo", raw), 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_wrong_content_type_is_415(content_type: str) -> None:
    response = await post("/v1/echo", b'{"a": 1}', {"content-type": content_type})
    assert_google_error(response, 415, "INVALID_ARGUMENT")


async def test_a_missing_content_type_is_415() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        request = client.build_request("POST", "/v1/echo", content=b'{"a": 1}')
        assert "content-type" not in request.headers
        assert_google_error(await client.send(request), 415, "INVALID_ARGUMENT")


async def test_json_with_charset_is_accepted() -> None:
    response = await post("/v1/echo", b"{}", {"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


async def test_an_oversized_body_is_413_by_declared_length() -> None:
    response = await post("/v1/echo", b'{"a": "' + b"x" * 2000 + b'"}')
    assert_google_error(response, 413, "INVALID_ARGUMENT")


async def test_an_oversized_chunked_body_is_413_while_reading() -> None:
    """No Content-Length: the cap is enforced as chunks arrive, without reading the rest."""
    received = 0
    chunks = [b'{"a": "', *[b"x" * 512] * 1000, b'"}']
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal received
        received += 1
        body = chunks[received - 1]
        return {"type": "http.request", "body": body, "more_body": received < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/echo",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "scheme": "http",
        "http_version": "1.1",
        "server": ("t", 80),
        "client": ("127.0.0.1", 1),
        "asgi": {"version": "3.0"},
    }
    await app()(scope, receive, send)
    assert sent[0]["status"] == 413
    assert received < 10  # stopped early


async def test_other_paths_and_methods_pass_through() -> None:
    response = await post("/other", b"not json", {"content-type": "text/plain"})
    assert response.status_code == 200
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/v1/echo")).status_code == 200


async def test_an_empty_body_passes_to_the_app() -> None:
    response = await post("/v1/echo", b"", {})
    assert response.status_code == 200
    assert response.json() == {"length": 0, "parsed": None}


async def test_a_bad_content_length_is_400() -> None:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        request = client.build_request(
            "POST", "/v1/echo", content=b"{}", headers={"content-type": "application/json"}
        )
        request.headers["content-length"] = "abc"
        assert_google_error(await client.send(request), 400, "INVALID_ARGUMENT")


async def _raw_post(content_length: bytes, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` straight through ASGI with this ``Content-Length`` (no client fixes it)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/echo", "raw_path": b"/v1/echo", "root_path": "",
        "query_string": b"", "server": ("t", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"application/json"), (b"content-length", content_length)],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app()(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    ("content_length", "body", "status"),
    [
        (b"7", b'{"a":1}', 200),
        (b"007", b'{"a":1}', 200),  # leading zeros, as int() reads them
        (b"0" * 21 + b"7", b'{"a":1}', 200),  # longer than the digits read directly
        (b"0", b"", 200),
        (b"00", b"", 200),
        (b"1024", b'{"a":1}', 200),  # at the cap: read, then held to the body's real size
        (b"1025", b'{"a":1}', 413),
        (b"9" * 18, b'{"a":1}', 413),
        (b"9" * 30, b'{"a":1}', 413),
        (b"12a", b'{"a":1}', 400),
        (b"", b'{"a":1}', 400),
        (b"\xd9\xa1", b'{"a":1}', 400),  # a non-ASCII digit is not a length
    ],
)
async def test_content_length_is_read_as_a_decimal_number(
    content_length: bytes, body: bytes, status: int
) -> None:
    got, answer = await _raw_post(content_length, body)
    assert got == status, answer
    if status == 200:
        assert orjson_loads(answer)["parsed"] == ({"a": 1} if body else None)
