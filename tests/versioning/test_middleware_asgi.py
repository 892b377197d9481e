"""VersionMiddleware at the ASGI level: scopes it leaves alone, the body it replays, refusals
raised while the app reads, answers served from the cache, and strict v1 answers streamed
through the whole gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import (
    CacheMiddleware,
    CachePolicy,
    FieldRenamed,
    MemoryStore,
    Version,
    VersionBundle,
    VersionMiddleware,
    api_version,
    gemini_versions,
)
from gemini_scale.types import Message, Scope
from tests.cache.support import FakeAuth, call, http_scope, who
from tests.gateway import build, running
from tests.sse import sse_events

BUNDLE = VersionBundle(
    Version("2026-02-01", FieldRenamed("title", "name")), Version("2026-01-01")
)


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {"name": json.loads(body).get("name") if body else None,
         "version": api_version(request), "bytes": len(body)}
    )


def echo_app(**options: Any) -> VersionMiddleware:
    app = Starlette(routes=[Route("/things", echo, methods=["GET", "POST"])])
    return VersionMiddleware(app, versions=None, dated=BUNDLE, **options)


async def test_lifespan_and_websocket_scopes_pass_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)

    middleware = VersionMiddleware(app, dated=BUNDLE)
    websocket = {"type": "websocket", "path": "/v1/models", "headers": [], "query_string": b""}
    await middleware(dict(websocket), None, None)  # type: ignore[arg-type]
    assert seen == [websocket]


async def test_replayed_body_then_the_real_disconnect() -> None:
    """D04: after the migrated body, ``receive`` waits for the server's own message."""
    received: list[Message] = []
    gone = asyncio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        received.append(await receive())
        received.append(await asyncio.wait_for(receive(), 2))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    body = json.dumps({"title": "x"}).encode()
    chunks = [body[:5], body[5:]]

    async def receive() -> Message:
        if chunks:
            piece = chunks.pop(0)
            if not chunks:
                gone.set()
            return {"type": "http.request", "body": piece, "more_body": bool(chunks)}
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("POST", "/things", headers={"x-api-version": "2026-01-01"}, body=body)
    await VersionMiddleware(app, versions=None, dated=BUNDLE)(scope, receive, send)
    assert json.loads(received[0]["body"]) == {"name": "x"}
    assert received[0]["more_body"] is False
    assert received[1] == {"type": "http.disconnect"}


async def test_a_body_over_the_limit_is_relayed_unmigrated() -> None:
    app = echo_app(max_body_bytes=64)
    small = await call(app, "POST", "/things", json_body={"title": "t"},
                       headers={"x-api-version": "2026-01-01"})
    assert json.loads(small.body)["title"] == "t"
    big = await call(app, "POST", "/things", json_body={"title": "t" * 200},
                     headers={"x-api-version": "2026-01-01"})
    assert json.loads(big.body)["title"] is None  # not renamed: the head never saw "name"


async def test_a_body_whose_last_piece_passes_the_limit_is_relayed_unmigrated() -> None:
    """The limit holds for a body sent in pieces, its last piece included."""
    received: list[Message] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        received.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    body = json.dumps({"title": "t" * 200}).encode()
    chunks = [body[:10], body[10:]]

    async def receive() -> Message:
        if chunks:
            piece = chunks.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope = http_scope("POST", "/things", headers={"x-api-version": "2026-01-01"})
    await VersionMiddleware(app, versions=None, dated=BUNDLE, max_body_bytes=64)(
        scope, receive, send
    )
    assert received[0]["body"] == body  # as it came: not renamed
    assert received[0]["more_body"] is False


async def test_a_refusal_while_the_app_reads_is_googles_400_not_a_500() -> None:
    """Strict v1 refuses the body when a plain Starlette endpoint reads it (no handlers)."""
    app = Starlette(routes=[Route(
        "/v1beta/models/{model}:generateContent", echo, methods=["POST"]
    )])
    middleware = VersionMiddleware(app, versions=gemini_versions(strict_v1=True))
    transport = httpx.ASGITransport(middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/models/m:generateContent",
            json={"contents": [], "systemInstruction": {"parts": []}},
        )
        assert response.status_code == 400
        assert "Unknown name" in response.json()["error"]["message"]
        fine = await client.post("/v1/models/m:generateContent", json={"contents": []})
        assert fine.json()["version"] == "v1"


async def test_a_cache_hit_is_migrated_on_the_way_out_too() -> None:
    """The cache sits behind the version layer: it sees head requests only, so one entry
    serves every version, and an old client's hit is migrated like a miss."""
    calls: list[int] = []

    async def thing(request: Request) -> Response:
        calls.append(1)
        return JSONResponse({"name": "cached", "n": len(calls)})

    app = Starlette(routes=[Route("/thing", thing)])
    app.add_middleware(CacheMiddleware, store=MemoryStore(),
                       rules={"GET /thing": CachePolicy(ttl=60)})
    app.add_middleware(FakeAuth)
    app.add_middleware(VersionMiddleware, versions=None, dated=BUNDLE)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        head = await client.get("/thing", headers={**who("ann"), "x-api-version": "2026-02-01"})
        old = await client.get("/thing", headers={**who("ann"), "x-api-version": "2026-01-01"})
        assert head.json() == {"name": "cached", "n": 1}
        assert old.json() == {"title": "cached", "n": 1}
        assert "hit" in old.headers["cache-status"]
        assert len(calls) == 1


def _answer(text: str, *, last: bool = True) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if last:  # Gemini's last chunk says why it stopped
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 5,
                          "cachedContentTokenCount": 2},
    }


def _upstream() -> Starlette:
    """A Gemini upstream whose answers carry the v1beta-only ``cachedContentTokenCount``."""

    async def generate(request: Request) -> Response:
        await request.body()
        if request.url.path.endswith(":generateContent"):
            return JSONResponse(_answer("whole"))
        sse = request.query_params.get("alt") == "sse"

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                event = json.dumps(_answer(f"part {i}", last=i == 2))
                if sse:
                    yield f"data: {event}\r\n\r\n".encode()
                else:
                    yield ("[" if i == 0 else ",\r\n").encode() + event.encode()
                await asyncio.sleep(0.01)
            if not sse:
                yield b"]"

        return StreamingResponse(events(), media_type="text/event-stream" if sse
                                 else "application/json")

    return Starlette(routes=[
        Route("/{version}/models/{model}", generate, methods=["POST"]),
    ])


async def test_strict_v1_answers_lose_v1beta_members_even_streamed() -> None:
    app = build({"GEMINI_SCALE_STRICT_V1": "1", "GEMINI_SCALE_CACHE_TTL": "0"},
                standin=_upstream())
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with running(app) as client:
        whole = await client.post("/v1/models/gemini-2.5-flash:generateContent", json=body)
        assert whole.status_code == 200
        assert "cachedContentTokenCount" not in whole.json()["usageMetadata"]
        assert whole.json()["usageMetadata"]["totalTokenCount"] == 5
        beta = await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body)
        assert beta.json()["usageMetadata"]["cachedContentTokenCount"] == 2
        sse = await client.post(
            "/v1/models/gemini-2.5-flash:streamGenerateContent", params={"alt": "sse"},
            json=body,
        )
        events = sse_events(sse.content)
        assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in events] == [
            "part 0", "part 1", "part 2"
        ]
        assert all("cachedContentTokenCount" not in e["usageMetadata"] for e in events)
        array = await client.post(
            "/v1/models/gemini-2.5-flash:streamGenerateContent", json=body
        )
        elements = json.loads(array.content)
        assert len(elements) == 3
        assert all("cachedContentTokenCount" not in e["usageMetadata"] for e in elements)


async def test_strict_v1_array_documents_lose_v1beta_members_in_every_element() -> None:
    """A JSON array with a ``Content-Length`` (a replayed ``streamGenerateContent``) is one
    document: strict v1 takes ``cachedContentTokenCount`` out of each of its elements."""
    raw = json.dumps([_answer("a"), _answer("b")]).encode()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        ]})
        await send({"type": "http.response.body", "body": raw})

    middleware = VersionMiddleware(app, versions=gemini_versions(strict_v1=True))
    transport = httpx.ASGITransport(middleware)
    path = "models/gemini-2.5-flash:streamGenerateContent"
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        v1 = await client.post(f"/v1/{path}", json={"contents": []})
        beta = await client.post(f"/v1beta/{path}", json={"contents": []})
    assert [e["usageMetadata"] for e in v1.json()] == [
        {"promptTokenCount": 3, "totalTokenCount": 5}
    ] * 2
    assert int(v1.headers["content-length"]) == len(v1.content)
    assert beta.json() == [_answer("a"), _answer("b")]


async def test_strict_v1_cached_stream_replays_lose_v1beta_members() -> None:
    """The cache replays a stored ``streamGenerateContent`` array whole, with its length:
    the hit is as strict as the miss."""
    app = build({"GEMINI_SCALE_STRICT_V1": "1", "GEMINI_SCALE_CACHE_GENERATION": "all"},
                standin=_upstream())
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with running(app) as client:
        answers = [
            await client.post("/v1/models/gemini-2.5-flash:streamGenerateContent", json=body)
            for _ in range(2)
        ]
    assert "hit" in answers[1].headers["cache-status"]
    for answer in answers:
        elements = json.loads(answer.content)
        assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in elements] == [
            "part 0", "part 1", "part 2"
        ]
        assert all("cachedContentTokenCount" not in e["usageMetadata"] for e in elements)


async def test_an_outer_layers_route_match_moves_to_the_head_route() -> None:
    """A gemini-scale layer outside VersionMiddleware matched the client's path; after the
    rewrite every layer sees the head route (its template and policies)."""
    from gemini_scale import JSONBodyMiddleware
    from gemini_scale.routing import CONTEXT_KEY

    async def template(request: Request) -> Response:
        route = request.scope[CONTEXT_KEY].route
        return JSONResponse({"template": route.template if route else None})

    app = Starlette(routes=[Route("/v1beta/models/{model}", template)])
    app.add_middleware(VersionMiddleware)
    app.add_middleware(JSONBodyMiddleware)  # outermost: creates the context first
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/v1/models/gemini-2.5-flash")
        assert response.json() == {"template": "/v1beta/models/{model}"}


async def test_a_body_the_version_layer_migrated_is_not_parsed_again(
    monkeypatch: Any,
) -> None:
    """In the gateway's order (versions outside the body check), a body migrated up to the
    head is parsed once, by the version layer: the body check takes its result, and the app
    sees the migrated body and its parse."""
    from gemini_scale import JSONBodyMiddleware, fastjson
    from gemini_scale.body import JSON_KEY
    from gemini_scale.routing import CONTEXT_KEY

    parses: list[bytes] = []
    real = fastjson.loads

    def counted(raw: bytes | bytearray) -> Any:
        parses.append(bytes(raw))
        return real(raw)

    monkeypatch.setattr(fastjson, "loads", counted)

    async def things(request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {"raw": json.loads(body), "parsed": request.scope[CONTEXT_KEY].extras[JSON_KEY]}
        )

    app = Starlette(routes=[Route("/things", things, methods=["POST"])])
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(VersionMiddleware, versions=None, dated=BUNDLE)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/things", json={"title": "old"}, headers={"x-api-version": "2026-01-01"}
        )
    assert response.status_code == 200
    assert response.json() == {"raw": {"name": "old"}, "parsed": {"name": "old"}}
    requests = [raw for raw in parses if not raw.startswith(b'{"raw"')]  # not the answer
    assert requests == [b'{"title":"old"}']  # the migrated body is not parsed again
