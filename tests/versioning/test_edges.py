"""Edges of version migration: hostile bodies, framing, caches and compression, several
deprecations at once, and paths that only look versioned."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemini_scale import (
    CacheMiddleware,
    FieldRenamed,
    ModelRenamed,
    Version,
    VersionBundle,
    VersionChange,
    VersionMiddleware,
    VersionPolicy,
    cache,
    gemini_versions,
)
from gemini_scale.gemini_json import (
    NonFiniteNumberError,
    _camel_memo,
    camel_name,
    dump_json,
    respelled,
)
from gemini_scale.types import Message, Scope
from gemini_scale.versioning import ModelAlias, RequestInfo, streams
from tests.cache.support import call

OLD, HEAD = "2026-01-01", "2026-03-01"
RENAMED = VersionBundle(Version(HEAD, FieldRenamed("name", "fullName")), Version(OLD))


def scripted(*messages: Message, bundle: VersionBundle = RENAMED) -> VersionMiddleware:
    """An app that sends exactly ``messages``, behind dated versions."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    return VersionMiddleware(app, versions=None, dated=bundle)


def start(status: int = 200, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json"), *headers]}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


OLD_CLIENT = {"x-api-version": OLD}


async def test_a_lone_surrogate_in_a_body_is_not_a_500() -> None:
    """``"\\ud800"`` parses but is no UTF-8: it goes on escaped, as the client wrote it."""
    seen: list[bytes] = []

    async def echo(request: Request) -> Response:
        seen.append(await request.body())
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1beta/models/{m}:generateContent", echo, methods=["POST"])])
    raw = b'{"contents":[{"parts":[{"text":"\\ud800"}]}],"generation_config":{}}'
    middleware = VersionMiddleware(app)
    transport = httpx.ASGITransport(middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/models/m:generateContent", content=raw,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200
    assert json.loads(seen[-1]) == {"contents": [{"parts": [{"text": "\ud800"}]}],
                                    "generationConfig": {}}
    assert b"\\ud800" in respelled(raw)  # the upstream client's respelling too


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN", b"Infinity"])
async def test_a_number_json_cannot_write_is_never_sent_on_as_infinity(number: bytes) -> None:
    """``1e400`` parses into an infinity: a body that must be re-encoded is refused (400)
    rather than sent on with the non-JSON ``Infinity``; one that needs no change is relayed
    byte for byte, and the upstream client's respelling keeps it as it came."""
    seen: list[bytes] = []

    async def echo(request: Request) -> Response:
        seen.append(await request.body())
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1beta/models/{m}:generateContent", echo, methods=["POST"])])
    respelt = b'{"contents":[],"generation_config":{"temperature":' + number + b"}}"
    as_is = b'{"contents":[],"generationConfig":{"temperature":' + number + b"}}"
    transport = httpx.ASGITransport(VersionMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.post(
            "/v1/models/m:generateContent", content=respelt,
            headers={"content-type": "application/json"},
        )
        relayed = await client.post(
            "/v1/models/m:generateContent", content=as_is,
            headers={"content-type": "application/json"},
        )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert "out of range" in error["message"]
    assert relayed.status_code == 200
    assert seen == [as_is]
    assert respelled(respelt) == respelt


def test_only_a_non_finite_number_is_reported_as_one() -> None:
    """``NonFiniteNumberError`` (a 400 for the client) is the encoder's out-of-range float
    only; another encoding error (a hook's circular value) stays what it is."""
    with pytest.raises(NonFiniteNumberError):
        dump_json({"x": float("nan")})
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular") as raised:
        dump_json(looped)
    assert not isinstance(raised.value, NonFiniteNumberError)


@pytest.mark.parametrize("content_type", [b"application/json", b"text/event-stream"])
async def test_an_answer_with_a_number_json_cannot_write_is_relayed_as_it_came(
    content_type: bytes,
) -> None:
    """An answer to migrate that holds ``1e400`` goes back unmigrated, never as ``Infinity``
    (and the answers around it are still migrated)."""
    if content_type == b"text/event-stream":
        raw = b'data: {"fullName":"a","x":1e400}\n\ndata: {"fullName":"b"}\n\n'
        expected = b'data: {"fullName":"a","x":1e400}\n\ndata: {"name":"b"}\n\n'
    else:
        raw = expected = b'{"fullName":"a","x":1e400}'
    head = start(200)
    head["headers"] = [(b"content-type", content_type)]
    recorded = await call(scripted(head, body(raw)), "GET", "/x", headers=OLD_CLIENT)
    assert recorded.status == 200
    assert recorded.body == expected
    streamed = b'[{"fullName":"a","x":1e400},\r\n{"fullName":"b"}]'
    recorded = await call(scripted(start(200), body(streamed)), "POST",
                          "/models/m:streamGenerateContent", headers=OLD_CLIENT)
    assert b"Infinity" not in recorded.body
    assert b'{"fullName":"a","x":1e400}' in recorded.body
    assert b'{"name":"b"}' in recorded.body


async def test_a_dot_segment_refusal_quotes_the_path_with_its_root_path() -> None:
    """Behind a proxy that mounts the gateway under a prefix, the 404 for a dot-segment
    path names the path the client sent, prefix included (once per request: refusals are
    remembered by the routed path)."""
    app = VersionMiddleware(Starlette())
    for root in ("/gw", "/other", ""):
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        path = f"{root}/v1/./models/m:generateContent"
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
                 "root_path": root, "query_string": b"", "headers": []}
        await app(scope, receive, send)
        assert sent[0]["status"] == 404
        message = json.loads(sent[1]["body"])["error"]["message"]
        assert message == f"Method not found: POST {path}."


async def test_a_body_too_deep_to_respell_is_a_400_not_a_500() -> None:
    """A ``/v1`` body that parses (orjson reads 1024 levels) but is deeper than the
    respelling can walk is the client's error."""
    reached: list[bytes] = []

    async def echo(request: Request) -> Response:
        reached.append(await request.body())
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1beta/models/{m}:generateContent", echo, methods=["POST"])])
    transport = httpx.ASGITransport(VersionMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for depth in (10, 1000):
            raw = b'{"generation_config": {}, "contents": ' + b"[" * depth + b"]" * depth + b"}"
            response = await client.post(
                "/v1/models/m:generateContent", content=raw,
                headers={"content-type": "application/json"},
            )
            if depth == 10:
                assert response.status_code == 200
                continue
            assert response.status_code == 400
            assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
            assert "nested too deeply" in response.json()["error"]["message"]
    assert len(reached) == 1


@pytest.mark.parametrize("name", [
    "generation__config", "generation_config_", "generation_Config", "Generation_config",
    "generation_c\u00f6nfig", "2_d",
])
def test_only_proto_field_names_are_respelled(name: str) -> None:
    """proto3 JSON reads a field by its json_name or its proto name (lower-case words joined
    by single ``_``): no other spelling is that field, so none is respelled into it."""
    assert camel_name(name) == name
    raw = json.dumps({name: {"top_k": 1}, "safety_settings": [], "tool_config_2d": {}}).encode()
    sent = json.loads(respelled(raw))
    assert sent == {name: {"topK": 1}, "safetySettings": [], "toolConfig2d": {}}


def test_long_member_names_are_not_remembered() -> None:
    before = len(_camel_memo)
    name = "a_" * 5000 + "a"
    assert camel_name(name).startswith("aA")
    assert len(_camel_memo) == before


def test_user_named_struct_members_keep_their_spelling() -> None:
    raw = json.dumps({
        "contents": [{"parts": [{"text": "x", "part_metadata": {"source_file": "a.txt"}}]}],
        "generation_config": {"response_schema": {
            "type": "object", "default": {"first_name": "Ada"}, "example": {"first_name": "G"},
        }},
    }).encode()
    sent = json.loads(respelled(raw))
    part = sent["contents"][0]["parts"][0]
    assert part["partMetadata"] == {"source_file": "a.txt"}
    schema = sent["generationConfig"]["responseSchema"]
    assert schema["default"] == {"first_name": "Ada"}
    assert schema["example"] == {"first_name": "G"}


@pytest.mark.parametrize("chunk", [1, 7, 64])
async def test_an_event_too_large_to_hold_is_relayed_and_the_next_one_migrated(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(streams, "MAX_HELD_BYTES", 200)
    big = b'data: {"fullName":"' + b"x" * 400 + b'"}\r\n\r\n'
    small = b'data: {"fullName":"y"}\r\n\r\n'
    stream = big + small
    messages = [start(200)]
    messages[0]["headers"] = [(b"content-type", b"text/event-stream")]
    messages += [body(stream[i : i + chunk], True) for i in range(0, len(stream), chunk)]
    messages.append(body(b""))
    recorded = await call(scripted(*messages), "GET", "/x", headers=OLD_CLIENT)
    assert recorded.body == big + b'data: {"name":"y"}\r\n\r\n'


async def test_sse_fields_around_the_data_are_kept() -> None:
    stream = (
        b'id: 7\nevent: user\n: note\ndata: {"fullName":"A"}\nretry: 5\n\n'
        b'\ndata: {"fullName":"B"}\n\n'
    )
    recorded = await call(scripted(
        {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/event-stream")]},
        body(stream),
    ), "GET", "/x", headers=OLD_CLIENT)
    assert recorded.body == (
        b'id: 7\nevent: user\n: note\ndata: {"name":"A"}\nretry: 5\n\n\ndata: {"name":"B"}\n\n'
    )


async def test_a_json_array_document_is_migrated_whole() -> None:
    """An array answer with a length is a document: a change on ``*.name`` sees the list."""
    bundle = VersionBundle(Version(HEAD, FieldRenamed("*.name", "fullName")), Version(OLD))
    document = b'[{"fullName":"a"},{"fullName":"b"}]'
    recorded = await call(scripted(
        start(200, (b"content-length", str(len(document)).encode())), body(document),
        bundle=bundle,
    ), "GET", "/x", headers=OLD_CLIENT)
    assert json.loads(recorded.body) == [{"name": "a"}, {"name": "b"}]
    assert recorded.headers["content-length"] == str(len(recorded.body))


async def test_a_renamed_models_version_goes_back_in_every_array_element() -> None:
    """A replayed stream (an array with a length, a document) is renamed as the live one
    (streamed element by element) is."""
    bundle = VersionBundle(Version(HEAD, ModelRenamed("old-model", "new-model")), Version(OLD))
    document = b'[{"modelVersion":"new-model"},{"modelVersion":"new-model"}]'
    for framing in ([], [(b"content-length", str(len(document)).encode())]):
        recorded = await call(
            scripted(start(200, *framing), body(document), bundle=bundle),
            "POST", "/models/old-model:streamGenerateContent", headers=OLD_CLIENT,
        )
        assert json.loads(recorded.body) == [{"modelVersion": "old-model"}] * 2, framing


async def test_head_204_and_a_start_without_body_keep_their_framing() -> None:
    head = await call(scripted(start(200, (b"content-length", b"20")), body(b"")),
                      "HEAD", "/x", headers=OLD_CLIENT)
    assert head.headers["content-length"] == "20"
    empty = await call(scripted(start(204), body(b"")), "GET", "/x", headers=OLD_CLIENT)
    assert "content-length" not in empty.headers
    alone = await call(scripted(start(200, (b"content-length", b"0"))), "GET", "/x",
                       headers=OLD_CLIENT)
    assert [m["type"] for m in alone.messages] == ["http.response.start"]
    assert alone.headers["content-length"] == "0"


async def test_pathsend_gets_the_start_first() -> None:
    recorded = await call(scripted(
        start(200, (b"content-length", b"30")),
        {"type": "http.response.pathsend", "path": "/tmp/x.json"},
    ), "GET", "/x", headers=OLD_CLIENT)
    assert [m["type"] for m in recorded.messages] == [
        "http.response.start", "http.response.pathsend"
    ]
    assert recorded.headers["content-length"] == "30"


async def test_an_inner_gzip_layer_does_not_hide_the_answer_from_migration() -> None:
    async def user(request: Request) -> Response:
        return JSONResponse({"fullName": "Ada " * 200})

    app = Starlette(routes=[Route("/user", user)])
    app.add_middleware(GZipMiddleware, minimum_size=10)
    app.add_middleware(VersionMiddleware, versions=None, dated=RENAMED)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        old = await client.get("/user", headers={**OLD_CLIENT, "accept-encoding": "gzip"})
        assert old.json() == {"name": "Ada " * 200}
        assert "content-encoding" not in old.headers
        new = await client.get("/user", headers={"accept-encoding": "gzip"})
        assert new.headers["content-encoding"] == "gzip"
        assert new.json() == {"fullName": "Ada " * 200}
    corrupt = await call(scripted(
        start(200, (b"content-encoding", b"gzip")), body(b"\x1f\x8bnot gzip at all"),
    ), "GET", "/x", headers=OLD_CLIENT)
    assert corrupt.headers["content-encoding"] == "gzip"
    assert corrupt.body == b"\x1f\x8bnot gzip at all"


async def test_dated_answers_vary_on_the_header_and_name_the_version_in_etags() -> None:
    recorded = await call(scripted(
        start(200, (b"etag", b'"abc"'), (b"content-length", b"16")), body(b'{"fullName":"A"}'),
    ), "GET", "/x", headers=OLD_CLIENT)
    assert recorded.headers["vary"] == "X-API-Version"
    assert recorded.headers["etag"] == f'"abc.v{OLD}"'
    head = await call(scripted(start(200, (b"etag", b'"abc"')), body(b'{"fullName":"A"}')),
                      "GET", "/x", headers={"x-api-version": HEAD})
    assert head.headers["etag"] == '"abc"'
    assert head.headers["vary"] == "X-API-Version"


async def test_refusal_messages_name_each_requests_own_route() -> None:
    async def ok(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/items/{id}", ok, methods=["GET", "DELETE"])])
    app.add_middleware(
        VersionMiddleware, versions=None, dated=RENAMED,
        rules={"/items/{id}": VersionPolicy(added=HEAD), "/reports/{name}": VersionPolicy(
            added=HEAD)},
    )
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.delete("/items/1", headers=OLD_CLIENT)
        second = await client.get("/items/2", headers=OLD_CLIENT)
        alice = await client.get("/reports/alice", headers=OLD_CLIENT)
        bob = await client.get("/reports/bob", headers=OLD_CLIENT)
    assert first.json()["error"]["message"].startswith("DELETE /items/{id} ")
    assert second.json()["error"]["message"].startswith("GET /items/{id} ")
    # Routes the app does not have are named by the rule that matched them.
    assert bob.json()["error"]["message"].startswith("GET /reports/{name} ")
    assert alice.json()["error"]["message"].startswith("GET /reports/{name} ")
    assert "alice" not in bob.text


@pytest.mark.parametrize("everywhere", [False, True])
async def test_a_changes_head_links_move_to_the_clients_version_only_when_it_says_so(
    everywhere: bool,
) -> None:
    """A link to a head-only route (or a document under the head's prefix) stays as it is for
    a ``/v1`` client; a change whose links exist in every version has them under ``/v1``."""
    class Moved(VersionChange):
        links_in_every_version = everywhere

        def response_headers(self, method: str, path: str) -> list[tuple[str, str]]:
            return [("link", '</v1beta/models/m:modern>; rel="successor-version"')]

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1beta/models/{m}:legacy", ok)])
    app.add_middleware(VersionMiddleware, versions=VersionBundle(
        Version("v1beta", Moved()), Version("v1")))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        old = await client.get("/v1/models/m:legacy")
        head = await client.get("/v1beta/models/m:legacy")
    expected = "/v1/" if everywhere else "/v1beta/"
    assert old.headers["link"] == f'<{expected}models/m:modern>; rel="successor-version"'
    assert "link" not in head.headers  # the change is the step from v1 to the head


async def test_several_deprecations_make_one_deprecation_and_one_sunset() -> None:
    early, late = dt.date(2025, 1, 1), dt.date(2026, 1, 1)

    async def generate(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1beta/models/{model}:generateContent", generate,
                                  methods=["POST"])])
    aliases = [ModelAlias("old-model", "new-model", late, late)]
    app.add_middleware(
        VersionMiddleware, versions=gemini_versions(aliases=aliases),
        rules={"POST /v1beta/models/{model}:generateContent": VersionPolicy(
            deprecated=early, sunset=early, replacement="/v1beta/other")},
    )
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1beta/models/old-model:generateContent", json={})
    deprecation = response.headers.get_list("deprecation")
    assert deprecation == [f"@{int(dt.datetime(2025, 1, 1, tzinfo=dt.UTC).timestamp())}"]
    assert len(response.headers.get_list("sunset")) == 1
    assert "2025" in response.headers["sunset"]
    links = response.headers.get_list("link")
    assert '</v1beta/models/new-model>; rel="successor-version"' in links
    assert '</v1beta/other>; rel="successor-version"' in links


async def test_an_apps_own_versioned_paths_are_not_taken_over() -> None:
    async def own(request: Request) -> Response:
        return JSONResponse({"served": request.url.path})

    app = Starlette(routes=[
        Route("/v1/chat/completions", own, methods=["POST"]),
        Route("/v2/users", own),
        Route("/v1beta/models", own),
    ])
    app.add_middleware(VersionMiddleware)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        chat = await client.post("/v1/chat/completions", json={})
        users = await client.get("/v2/users")
        models = await client.get("/v1/models")
        unknown = await client.get("/v9/models")
    assert chat.json() == {"served": "/v1/chat/completions"}
    assert users.json() == {"served": "/v2/users"}
    assert models.json() == {"served": "/v1beta/models"}
    assert unknown.status_code == 404


class RenameLimit(VersionChange):
    """`limit` is called `page_size`."""

    routes = ("GET /users",)

    def upgrade_request(self, request: RequestInfo) -> None:
        request.query[:] = [("page_size" if n == "limit" else n, v) for n, v in request.query]


async def test_request_hooks_honour_their_routes_and_removals_keep_the_query_bytes() -> None:
    async def echo(request: Request) -> Response:
        return JSONResponse({"query": request.scope["query_string"].decode()})

    bundle = VersionBundle(Version(HEAD, RenameLimit()), Version(OLD))
    app = Starlette(routes=[Route("/users", echo), Route("/orders", echo)])
    app.add_middleware(VersionMiddleware, dated=bundle)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        users = await client.get("/users?limit=5", headers=OLD_CLIENT)
        orders = await client.get("/orders?limit=5", headers=OLD_CLIENT)
    assert users.json() == {"query": "page_size=5"}
    assert orders.json() == {"query": "limit=5"}
    alt = VersionMiddleware(_echo_query_app())
    recorded = await call(alt, "GET", "/v1beta/models",
                          query=b"flag&%24alt=json%3Benum-encoding%3Dint&pageSize=5")
    assert json.loads(recorded.body) == {"query": "flag&pageSize=5"}


def _echo_query_app() -> Callable[..., Any]:
    async def echo(request: Request) -> Response:
        return JSONResponse({"query": request.scope["query_string"].decode()})

    return Starlette(routes=[Route("/v1beta/models", echo)])


async def test_strict_v1_accepts_response_json_schema() -> None:
    async def echo(request: Request) -> Response:
        return JSONResponse(await request.json())

    app = Starlette(routes=[Route("/v1beta/models/{m}:generateContent", echo, methods=["POST"])])
    app.add_middleware(VersionMiddleware, versions=gemini_versions(strict_v1=True))
    transport = httpx.ASGITransport(app)
    body = {"contents": [], "generationConfig": {"responseJsonSchema": {"type": "string"}}}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/models/m:generateContent", json=body)
    assert response.status_code == 200


async def test_header_values_empty_and_impossible_dates() -> None:
    async def ok(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", ok)])
    app.add_middleware(VersionMiddleware, versions=None, dated=RENAMED, unknown="closest")
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        empty = await client.get("/x", headers={"x-api-version": " "})
        assert empty.headers["x-api-version"] == HEAD
        for impossible in ("2026-02-30", "2026-13-45", "9999-99-99"):
            response = await client.get("/x", headers={"x-api-version": impossible})
            assert response.status_code == 400, impossible
        waterfall = await client.get("/x", headers={"x-api-version": "2026-02-28"})
        assert waterfall.headers["x-api-version"] == OLD


@pytest.mark.parametrize("unknown", ["reject", "closest"])
async def test_two_version_header_lines_are_one_comma_joined_value(unknown: str) -> None:
    """RFC 9110: several lines of a field are its lines joined by commas. Two versions in
    two lines are refused as the same two in one line are, never the first one served."""
    async def ok(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", ok)])
    app.add_middleware(VersionMiddleware, versions=None, dated=RENAMED, unknown=unknown)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        one_line = await client.get("/x", headers={"x-api-version": f"{HEAD}, {OLD}"})
        two_lines = await client.get(
            "/x", headers=[("x-api-version", HEAD), ("x-api-version", OLD)]
        )
        same_twice = await client.get(
            "/x", headers=[("x-api-version", HEAD), ("x-api-version", HEAD)]
        )
        with_empty = [
            await client.get("/x", headers=lines)
            for lines in ([("x-api-version", OLD), ("x-api-version", "")],
                          [("x-api-version", ""), ("x-api-version", OLD)],
                          [("x-api-version", ""), ("x-api-version", " ")])
        ]
    assert one_line.status_code == two_lines.status_code == same_twice.status_code == 400
    assert f"{HEAD}, {OLD}" in two_lines.json()["error"]["message"]
    # Empty lines are no element of the list (RFC 9110 §5.6.1): one version, or none.
    assert [a.status_code for a in with_empty] == [200, 200, 200]
    assert [a.headers["x-api-version"] for a in with_empty] == [OLD, OLD, HEAD]


@pytest.mark.parametrize("name", [b"Content-Type", b"CONTENT-TYPE"])
async def test_an_answer_whose_header_names_have_capitals_is_migrated(name: bytes) -> None:
    # ASGI asks for lower-case names; some apps send them capitalised all the same.
    app = scripted(
        {"type": "http.response.start", "status": 200,
         "headers": [(name, b"application/json"), (b"ETag", b'"abc"')]},
        body(b'{"fullName": "Ada"}'),
    )
    answer = await call(app, "GET", "/people/1", headers=OLD_CLIENT)
    assert json.loads(answer.body) == {"name": "Ada"}
    assert answer.headers["etag"] == f'"abc.v{OLD}"'


def _person_and_note() -> VersionMiddleware:
    """A JSON route and a text route, shared-cached, under the RENAMED dated versions."""

    async def person(request: Request) -> Response:
        return JSONResponse({"fullName": "Ada"})

    async def note(request: Request) -> Response:
        return Response("plain text", media_type="text/plain")

    app = Starlette(routes=[Route("/people/{id}", cache(ttl=300, scope="shared")(person)),
                            Route("/notes/{id}", cache(ttl=300, scope="shared")(note))])
    return VersionMiddleware(CacheMiddleware(app), versions=None, dated=RENAMED)


async def test_an_older_versions_client_revalidates_with_the_tag_it_was_given() -> None:
    """A migrated answer's tag names its version (``"abc.v<version>"``); sent back in
    ``If-None-Match``, it is the head's tag to the cache inside, and the 304 names the
    version again."""

    transport = httpx.ASGITransport(_person_and_note())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for version in (HEAD, OLD):
            headers = {"x-api-version": version}
            first = await client.get("/people/1", headers=headers)
            tag = first.headers["etag"]
            assert tag.endswith(f'.v{version}"') == (version == OLD)
            again = await client.get("/people/1", headers={**headers, "if-none-match": tag})
            assert again.status_code == 304
            assert again.headers["etag"] == tag
            listed = f'"other", W/{tag}'  # a list, and a weak comparison
            assert (await client.get(
                "/people/1", headers={**headers, "if-none-match": listed}
            )).status_code == 304
            head = await client.head("/people/1", headers=headers)  # the GET's fields
            assert head.headers["etag"] == tag
            revalidated = await client.head("/people/1", headers={**headers, "if-none-match": tag})
            assert revalidated.status_code == 304
        # An answer that is not migrated (not JSON) names the version too, and revalidates.
        old = {"x-api-version": OLD}
        text = await client.get("/notes/1", headers=old)
        assert text.headers["etag"].endswith(f'.v{OLD}"')
        again = await client.get("/notes/1", headers={**old, "if-none-match": text.headers["etag"]})
        assert again.status_code == 304
        assert again.headers["etag"] == text.headers["etag"]


async def test_the_heads_tag_never_matches_an_older_versions_answer() -> None:
    """A tag without the version's suffix names another representation (the head's): it is
    dropped, so the older version's client gets its own answer, not a 304; ``*`` matches."""

    transport = httpx.ASGITransport(_person_and_note())
    old = {"x-api-version": OLD}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for path in ("/people/1", "/notes/1"):
            head_tag = (await client.get(path, headers={"x-api-version": HEAD})).headers["etag"]
            other = await client.get(path, headers={**old, "if-none-match": head_tag})
            assert other.status_code == 200, path
            assert other.headers["etag"] == head_tag[:-1] + f'.v{OLD}"'
            listed = f'{head_tag}, {other.headers["etag"]}'
            assert (await client.get(
                path, headers={**old, "if-none-match": listed}
            )).status_code == 304
            star = await client.get(path, headers={**old, "if-none-match": "*"})
            assert star.status_code == 304
            assert star.headers["etag"] == other.headers["etag"]
        assert other.text == "plain text"
        person_answer = await client.get(
            "/people/1", headers={**old, "if-none-match": '"abc"'}
        )
        assert person_answer.json() == {"name": "Ada"}


async def test_if_none_match_keeps_only_the_versions_own_tags() -> None:
    """The layers inside see the version's tags as the head's, ``*``, and nothing else."""

    async def validators(request: Request) -> Response:
        return JSONResponse({"fullName": request.headers.getlist("if-none-match")})

    app = VersionMiddleware(Starlette(routes=[Route("/v", validators)]),
                            versions=None, dated=RENAMED)
    cases = [
        (['"abc"'], []),  # no tag left: no header, so the answer is a 200
        ([f'"abc", W/"def.v{OLD}"'], ['W/"def"']),
        (['"abc"', f'"def.v{OLD}"'], ['"def"']),  # one header line each
        (["*"], ["*"]),
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for sent, seen in cases:
            headers = [("x-api-version", OLD), *(("if-none-match", value) for value in sent)]
            assert (await c.get("/v", headers=headers)).json() == {"name": seen}, sent
        head = await c.get("/v", headers=[("if-none-match", f'"abc.v{OLD}"')])
        assert head.json() == {"fullName": [f'"abc.v{OLD}"']}  # the head's: as sent


@pytest.mark.parametrize(("content_type", "migrated"), [
    (None, True), ("application/json", True), ("application/problem+json", True),
    ("application/x-www-form-urlencoded", False),  # never buffered before authentication
])
async def test_which_request_bodies_an_older_version_migrates(
    content_type: str | None, migrated: bool
) -> None:
    seen: list[bytes] = []

    async def echo(request: Request) -> Response:
        seen.append(await request.body())
        return JSONResponse({})

    app = VersionMiddleware(Starlette(routes=[Route("/people", echo, methods=["POST"])]),
                            versions=None, dated=RENAMED)
    headers = {**OLD_CLIENT, **({"content-type": content_type} if content_type else {})}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        await c.post("/people", content=b'{"name": "Ada"}', headers=headers)
    assert json.loads(seen[0]) == ({"fullName": "Ada"} if migrated else {"name": "Ada"})


async def test_a_head_answer_carries_its_gets_tag_under_a_route_limited_change() -> None:
    async def thing(request: Request) -> Response:
        return JSONResponse({"name": "x"}, headers={"etag": '"abc"'})

    bundle = VersionBundle(
        Version("2026-02-01", FieldRenamed("title", "name", routes=["GET /things"])),
        Version("2026-01-01"),
    )
    app = VersionMiddleware(Starlette(routes=[Route("/things", thing)]), versions=None,
                            dated=bundle)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        old = {"x-api-version": "2026-01-01"}
        got, headed = await client.get("/things", headers=old), await client.head("/things",
                                                                                   headers=old)
    assert got.json() == {"title": "x"}
    assert headed.headers["etag"] == got.headers["etag"] == '"abc.v2026-01-01"'
