"""GeminiUpstream: server keys only, Google envelopes for every failure, unbuffered relay.

The upstream is the real stand-in behind StreamingASGITransport, or an ``httpx.MockTransport``
for failures the stand-in cannot produce; streaming and disconnects are also proven through
a real uvicorn server (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from example_app.standin import ReceivedRequest, StreamGate, create_standin
from gemini_scale.errors import ConfigurationError
from gemini_scale.observability.metrics import BoundedLabel
from gemini_scale.upstream import GeminiUpstream, StreamingASGITransport, UpstreamResponse
from tests.servers import free_port, serve
from tests.sse import sse_events

SSE_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
GENERATE_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
PROMPT_TEXT = "my secret prompt about rivers"
PROMPT = {"contents": [{"parts": [{"text": PROMPT_TEXT}], "role": "user"}]}
JSON_TYPE = "application/json; charset=UTF-8"
STANDIN_URL = "http://standin.invalid"


async def drain(response: httpx.Response, into: list[bytes]) -> None:
    async for chunk in response.aiter_raw():
        into.append(chunk)


def gateway(upstream: Callable[[Request], GeminiUpstream]) -> Starlette:
    """A minimal service whose one endpoint relays everything upstream."""

    async def relay(request: Request) -> Response:
        return await upstream(request).forward(request)

    return Starlette(routes=[Route("/{path:path}", relay, methods=["GET", "POST", "DELETE"])])


@dataclass
class Stack:
    client: httpx.AsyncClient
    upstream: GeminiUpstream
    received: list[ReceivedRequest]


@asynccontextmanager
async def stack(
    *, api_keys: tuple[str, ...] = ("server-key-1", "server-key-2"), **standin: Any
) -> AsyncIterator[Stack]:
    """Client -> gateway (forward) -> GeminiUpstream -> stand-in, all in-process and streaming."""
    received: list[ReceivedRequest] = []
    app = create_standin(received=received, **standin)
    async with GeminiUpstream(
        base_url=STANDIN_URL, api_keys=api_keys, transport=StreamingASGITransport(app)
    ) as upstream:
        transport = StreamingASGITransport(gateway(lambda _: upstream))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=5
        ) as client:
            yield Stack(client, upstream, received)


@asynccontextmanager
async def mocked(
    handler: Callable[[httpx.Request], Any], **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, GeminiUpstream]]:
    """The same gateway over an ``httpx.MockTransport`` upstream."""
    async with GeminiUpstream(
        base_url=STANDIN_URL, transport=httpx.MockTransport(handler), **options
    ) as upstream:
        transport = StreamingASGITransport(gateway(lambda _: upstream))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=5
        ) as client:
            yield client, upstream


def assert_envelope(response: httpx.Response, code: int, status: str) -> dict[str, Any]:
    assert response.status_code == code
    assert response.headers["content-type"] == JSON_TYPE
    assert response.headers["cache-control"] == "no-store"
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], error["status"]) == (code, status)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


# -- what goes upstream ---------------------------------------------------------------------


async def test_caller_credentials_never_reach_upstream() -> None:
    async with stack() as s:
        response = await s.client.post(
            SSE_PATH,
            params=[("alt", "sse"), ("key", "caller-key"), ("$alt", "json;enum-encoding=int"),
                    ("foo", "bar")],
            json=PROMPT,
            headers={
                "authorization": "Bearer caller-token",
                "x-goog-api-key": "caller-key",
                "cookie": "session=caller-cookie",
                "x-goog-user-project": "caller-project",
                "accept-encoding": "gzip, br",
                "x-request-id": "req-123",
            },
        )
    assert response.status_code == 200
    assert len(sse_events(response.content)) >= 2
    [seen] = s.received
    assert seen.path == SSE_PATH
    assert seen.query == (("alt", "sse"),)
    assert seen.header("x-goog-api-key") == "server-key-1"
    assert seen.header("authorization") is None
    assert seen.header("cookie") is None
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("content-type") == "application/json"
    assert seen.header("x-request-id") == "req-123"
    assert json.loads(seen.body) == PROMPT
    assert not any("caller" in value for _, value in seen.headers)


async def test_server_keys_are_used_round_robin() -> None:
    async with stack(api_keys=("k1", "k2", " ", "k3")) as s:
        for _ in range(4):
            assert (await s.client.get("/v1/models")).status_code == 200
    assert [r.header("x-goog-api-key") for r in s.received] == ["k1", "k2", "k3", "k1"]
    assert s.upstream.key_count == 3


async def test_no_server_key_means_no_key_header() -> None:
    async with stack(api_keys=()) as s:
        await s.client.get("/v1/models", headers={"x-goog-api-key": "caller-key"})
    assert s.received[0].header("x-goog-api-key") is None


async def test_request_sends_the_server_key_and_drops_credentials() -> None:
    received: list[ReceivedRequest] = []
    transport = StreamingASGITransport(create_standin(received=received))
    async with GeminiUpstream(
        base_url=STANDIN_URL, api_keys=["server-key"], transport=transport
    ) as upstream:
        response = await upstream.request(
            "POST",
            GENERATE_PATH,
            query=[("key", "leak"), ("alt", "json")],
            json_body=json.dumps(PROMPT).encode(),
            headers={"Authorization": "Bearer x", "X-Goog-Api-Key": "leak", "Cookie": "a=b",
                     "X-Goog-User-Project": "proj", "Connection": "close"},
        )
        assert isinstance(response, UpstreamResponse)
        assert response.status_code == 200
        await response.aclose()
    [seen] = received
    assert seen.query == (("alt", "json"),)
    assert seen.header("x-goog-api-key") == "server-key"
    assert seen.header("authorization") is None
    assert seen.header("cookie") is None
    assert seen.header("x-goog-user-project") == "proj"


@asynccontextmanager
async def forwarding(
    received: list[ReceivedRequest], **forward: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a service whose ``POST /`` forwards to the stand-in (recording into
    ``received``) with ``forward`` as :meth:`GeminiUpstream.forward`'s options."""
    app = create_standin(received=received)
    async with GeminiUpstream(
        base_url=STANDIN_URL, transport=StreamingASGITransport(app)
    ) as upstream:

        async def endpoint(request: Request) -> Response:
            return await upstream.forward(request, **forward)

        service = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
        async with httpx.AsyncClient(
            transport=StreamingASGITransport(service), base_url="http://svc"
        ) as client:
            yield client


async def test_forward_to_another_path_with_another_body() -> None:
    received: list[ReceivedRequest] = []
    async with forwarding(
        received, path="/v1/models/gemini-2.5-flash:countTokens", body=json.dumps(PROMPT).encode()
    ) as client:
        response = await client.post("/", content=b"ignored")
    assert response.status_code == 200
    assert response.json()["totalTokens"] > 0
    assert received[0].path == "/v1/models/gemini-2.5-flash:countTokens"


@pytest.mark.parametrize("name", ["generation__config", "generation_config_", "generation_Config"])
async def test_forward_respells_only_proto_field_names(name: str) -> None:
    """A name proto3 JSON does not read as a field goes upstream as sent (Gemini refuses
    it): respelling it into the field would answer a request the client did not send."""
    received: list[ReceivedRequest] = []
    async with forwarding(received, path=GENERATE_PATH) as client:
        body = {**PROMPT, "system_instruction": {"parts": [{"text": "be brief"}]},
                name: {"temperature": 0}}
        await client.post("/", json=body)
    sent = json.loads(received[0].body)
    assert sent == {**PROMPT, "systemInstruction": {"parts": [{"text": "be brief"}]},
                    name: {"temperature": 0}}


# -- what comes back ------------------------------------------------------------------------


async def test_success_relays_only_safe_headers() -> None:
    body = json.dumps({"candidates": []}, indent=2).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={
            "content-type": JSON_TYPE, "vary": "Origin, X-Origin, Referer",
            "set-cookie": "NID=1", "connection": "keep-alive", "keep-alive": "timeout=5",
            "server": "scaffolding on HTTPServer2", "alt-svc": 'h3=":443"',
            "x-goog-api-key": "echoed",
        })

    async with mocked(handler) as (client, _):
        response = await client.post(GENERATE_PATH, json=PROMPT)
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-type"] == JSON_TYPE
    assert response.headers["vary"] == "Origin, X-Origin, Referer"
    assert response.headers["content-length"] == str(len(body))
    for name in ("set-cookie", "connection", "keep-alive", "server", "alt-svc", "x-goog-api-key"):
        assert name not in response.headers


async def test_sse_passes_through_byte_for_byte() -> None:
    direct_app = create_standin()
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(direct_app), base_url="http://s"
    ) as direct:
        expected = (await direct.post(SSE_PATH, params={"alt": "sse"}, json=PROMPT)).content
    async with stack() as s:
        response = await s.client.post(SSE_PATH, params={"alt": "sse"}, json=PROMPT)
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["content-disposition"] == "attachment"
    assert "content-length" not in response.headers
    assert response.content == expected


@pytest.mark.parametrize("code", [429, 500, 503])
async def test_upstream_error_envelope_passes_through_unchanged(code: int) -> None:
    direct_app = create_standin(fail_with=code)
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(direct_app), base_url="http://s"
    ) as direct:
        expected = (await direct.post(GENERATE_PATH, json=PROMPT)).content
    async with stack(fail_with=code) as s:
        response = await s.client.post(GENERATE_PATH, json=PROMPT)
    assert response.status_code == code
    assert response.content == expected
    assert response.headers["cache-control"] == "no-store"
    # Google's RetryInfo.retryDelay "27s" also becomes Retry-After for non-SDK clients.
    assert response.headers.get("retry-after") == ("27" if code == 429 else None)


async def test_non_google_error_body_is_wrapped_with_the_same_status() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("models"):
            return httpx.Response(502, text="<html>Bad Gateway</html>",
                                  headers={"content-type": "text/html"})
        return httpx.Response(400, json={"detail": "nope"})

    async with mocked(handler) as (client, _):
        html = await client.get("/v1/models")
        other = await client.post(GENERATE_PATH, json=PROMPT)
    error = assert_envelope(html, 502, "UNAVAILABLE")
    assert "html" not in error["message"].lower()
    assert_envelope(other, 400, "INVALID_ARGUMENT")


async def test_array_wrapped_error_is_unwrapped() -> None:
    inner = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json=[inner], headers={"retry-after": "7"})

    async with mocked(handler) as (client, _):
        response = await client.post(GENERATE_PATH, json=PROMPT)
    assert response.status_code == 429
    assert response.json() == inner
    assert response.headers["retry-after"] == "7"


# -- failures map to Google envelopes -------------------------------------------------------


async def test_unreachable_upstream_is_503_with_retry_after() -> None:
    async with GeminiUpstream(
        base_url=f"http://127.0.0.1:{free_port()}", api_keys=["server-key"], connect_timeout=2
    ) as upstream:
        service = gateway(lambda _: upstream)
        async with httpx.AsyncClient(
            transport=StreamingASGITransport(service), base_url="http://svc"
        ) as client:
            response = await client.post(GENERATE_PATH, json=PROMPT)
    assert_envelope(response, 503, "UNAVAILABLE")
    assert int(response.headers["retry-after"]) >= 1


async def test_unresolvable_host_is_503() -> None:
    async with GeminiUpstream(base_url="http://gemini.invalid", connect_timeout=2) as upstream:
        response = await upstream.request("GET", "/v1/models")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (httpx.ReadTimeout, 504, "DEADLINE_EXCEEDED"),
        (httpx.WriteTimeout, 504, "DEADLINE_EXCEEDED"),
        (httpx.ConnectTimeout, 503, "UNAVAILABLE"),
        (httpx.PoolTimeout, 503, "UNAVAILABLE"),
        (httpx.ConnectError, 503, "UNAVAILABLE"),
        (httpx.RemoteProtocolError, 503, "UNAVAILABLE"),
    ],
)
async def test_transport_failures_map_to_envelopes(
    error: type[httpx.TransportError], code: int, status: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    async with mocked(handler) as (client, _):
        response = await client.post(GENERATE_PATH, json=PROMPT)
    assert_envelope(response, code, status)
    assert ("retry-after" in response.headers) == (code == 503)


async def test_slow_upstream_hits_the_timeout() -> None:
    app = create_standin(latency=5)
    async with GeminiUpstream(
        base_url=STANDIN_URL, timeout=0.05, transport=StreamingASGITransport(app)
    ) as upstream:
        response = await upstream.request("GET", "/v1/models")
    assert response.status_code == 504


async def test_closed_pool_is_503() -> None:
    upstream = GeminiUpstream(base_url=STANDIN_URL, transport=httpx.MockTransport(
        lambda request: httpx.Response(200)))
    await upstream.aclose()
    assert upstream.is_closed
    response = await upstream.request("GET", "/v1/models")
    assert response.status_code == 503


async def test_in_process_app_crash_is_503() -> None:
    async def crashing(scope: Any, receive: Any, send: Any) -> None:
        raise LookupError("bug in the upstream app")

    async with GeminiUpstream(
        base_url=STANDIN_URL, transport=StreamingASGITransport(crashing)
    ) as upstream:
        response = await upstream.request("GET", "/v1/models")
    assert response.status_code == 503


class BrokenStream(httpx.AsyncByteStream):
    """An upstream body that fails after some bytes."""

    def __init__(self, first: bytes, error: type[httpx.TransportError]) -> None:
        self.first = first
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise self.error("connection reset")

    async def aclose(self) -> None:
        self.closed = True


FIRST_EVENT = b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}],"role": "model"}}]}'


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [(httpx.ReadError, 503, "UNAVAILABLE"), (httpx.ReadTimeout, 504, "DEADLINE_EXCEEDED")],
)
async def test_sse_read_error_mid_stream_ends_with_an_error_event(
    error: type[httpx.TransportError], code: int, status: str
) -> None:
    stream = BrokenStream(FIRST_EVENT + b"\r\n\r\n", error)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    async with mocked(handler) as (client, _):
        response = await client.post(SSE_PATH, params={"alt": "sse"}, json=PROMPT)
    assert response.status_code == 200
    events = sse_events(response.content)
    assert len(events) == 2
    assert events[-1]["error"]["code"] == code
    assert events[-1]["error"]["status"] == status
    assert stream.closed


async def test_sdk_raises_the_mid_stream_error() -> None:
    stream = BrokenStream(FIRST_EVENT + b"\r\n\r\n", httpx.ReadError)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    async with mocked(handler) as (client, _):
        sdk = genai.Client(api_key="caller", http_options=types.HttpOptions(
            base_url="http://gateway", api_version="v1beta", httpx_async_client=client))
        try:
            texts: list[str | None] = []

            async def consume() -> None:
                async for chunk in await sdk.aio.models.generate_content_stream(
                    model="gemini-2.5-flash", contents="x"
                ):
                    texts.append(chunk.text)

            with pytest.raises(errors.ServerError) as caught:
                await consume()
            assert texts == ["Hel"]
            assert caught.value.code == 503
        finally:
            sdk.close()
            await sdk.aio.aclose()


@pytest.mark.parametrize(
    ("content_type", "first"),
    [("text/event-stream", FIRST_EVENT[:30]), (JSON_TYPE, b'[{"candidates": [')],
)
async def test_broken_stream_without_a_clean_boundary_is_left_truncated(
    content_type: str, first: bytes
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        stream = BrokenStream(first, httpx.ReadError)
        return httpx.Response(200, headers={"content-type": content_type}, stream=stream)

    received: list[bytes] = []
    async with (
        mocked(handler) as (client, _),
        client.stream("POST", SSE_PATH, json=PROMPT) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await drain(response, received)
    assert b"".join(received) == first


# -- the whole chain with the official SDK --------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta"])
async def test_sdk_through_forward(version: str) -> None:
    async with stack() as s:
        sdk = genai.Client(api_key="caller-key", http_options=types.HttpOptions(
            base_url="http://gateway", api_version=version, httpx_async_client=s.client))
        try:
            whole = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="Hi")
            chunks = [c async for c in await sdk.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents="Hi")]
            count = await sdk.aio.models.count_tokens(model="gemini-2.5-flash", contents="Hi")
            embedded = await sdk.aio.models.embed_content(
                model="gemini-embedding-001", contents="Hi")
            names = [m.name async for m in await sdk.aio.models.list(config={"page_size": 2})]
        finally:
            sdk.close()
            await sdk.aio.aclose()
    assert len(chunks) >= 2
    assert "".join(c.text or "" for c in chunks) == whole.text
    assert count.total_tokens == 1
    assert embedded.embeddings is not None
    assert len(embedded.embeddings) == 1
    assert "models/gemini-2.5-flash" in names
    assert {r.header("x-goog-api-key") for r in s.received} == {"server-key-1", "server-key-2"}


# -- logs -----------------------------------------------------------------------------------


async def test_logs_hold_no_key_token_or_prompt(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="httpx")  # configure_logging keeps it to warnings
    async with stack(api_keys=("server-secret-key",)) as s:
        await s.client.post(
            SSE_PATH, params={"alt": "sse", "key": "caller-query-key"}, json=PROMPT,
            headers={"authorization": "Bearer caller-token", "x-goog-api-key": "caller-key"},
        )
    async with GeminiUpstream(
        base_url=f"http://127.0.0.1:{free_port()}", api_keys=["server-secret-key"]
    ) as upstream:
        await upstream.request("POST", GENERATE_PATH, json_body=json.dumps(PROMPT).encode())
    assert any(r.name.startswith("gemini_scale.upstream") for r in caplog.records)
    # Everything logged, ours and httpx's for our upstream calls; not the test client's own.
    logged = "\n".join(
        record.getMessage() for record in caplog.records
        if "http://gateway/" not in record.getMessage()
    )
    assert "standin.invalid" in logged
    for secret in ("server-secret-key", "caller-query-key", "caller-token", "caller-key",
                   PROMPT_TEXT):
        assert secret not in logged


# -- streaming is never buffered, and a gone client cancels the upstream --------------------


async def test_first_chunk_is_relayed_before_upstream_finishes_in_process() -> None:
    gate = StreamGate(after=1)
    try:
        async with stack(gate=gate) as s, s.client.stream(
            "POST", SSE_PATH, params={"alt": "sse"}, json=PROMPT
        ) as response:
            chunks = response.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), 2)
            assert first.startswith(b"data: ")
            assert first.endswith(b"\r\n\r\n")
            assert await gate.held(2)
            assert gate.outcomes == []
            gate.release()
            rest = b"".join([chunk async for chunk in chunks])
        events = sse_events(first + rest)
        assert events[-1]["candidates"][0]["finishReason"] == "STOP"
        assert gate.outcomes == ["completed"]
    finally:
        gate.release()


async def test_client_going_away_cancels_the_upstream_in_process() -> None:
    gate = StreamGate(after=1)
    try:
        async with stack(gate=gate) as s:
            async with s.client.stream(
                "POST", SSE_PATH, params={"alt": "sse"}, json=PROMPT
            ) as response:
                await asyncio.wait_for(anext(response.aiter_raw()), 2)
                assert await gate.held(2)
            assert await gate.ended(2)
        assert gate.outcomes == ["cancelled"]
        assert not gate.released
    finally:
        gate.release()


def uvicorn_gateway(standin: Starlette) -> Starlette:
    """The gateway as a server would run it: the upstream lives in the server's lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with GeminiUpstream(
            base_url=STANDIN_URL, api_keys=["server-key"], transport=StreamingASGITransport(standin)
        ) as upstream:
            app.state.upstream = upstream
            yield

    async def relay(request: Request) -> Response:
        upstream: GeminiUpstream = request.app.state.upstream
        return await upstream.forward(request)

    return Starlette(
        routes=[Route("/{path:path}", relay, methods=["GET", "POST"])], lifespan=lifespan
    )


async def read_first_event(
    response: httpx.Response,
) -> tuple[bytes, AsyncIterator[bytes]]:
    """Read until one whole event arrived (bounded); also return the rest of the body."""
    received = b""
    chunks = response.aiter_raw()
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in received:
            received += await anext(chunks)
    return received, chunks


@pytest.mark.slow
async def test_first_chunk_reaches_a_socket_client_before_upstream_finishes() -> None:
    gate = StreamGate(after=1)
    try:
        with serve(uvicorn_gateway(create_standin(gate=gate))) as server:
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=10) as client,
                client.stream("POST", SSE_PATH, params={"alt": "sse"}, json=PROMPT) as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                first, chunks = await read_first_event(response)
                assert await gate.held(5)
                # The client holds event 1 while the stand-in is still held mid-stream.
                assert not gate.released
                assert gate.outcomes == []
                assert first.count(b"\r\n\r\n") == 1
                gate.release()
                rest = b"".join([chunk async for chunk in chunks])
            assert await gate.ended(5)
        events = sse_events(first + rest)
        assert len(events) >= 2
        assert events[-1]["candidates"][0]["finishReason"] == "STOP"
        assert gate.outcomes == ["completed"]
    finally:
        gate.release()


@pytest.mark.slow
async def test_socket_client_disconnect_cancels_the_upstream_stream() -> None:
    gate = StreamGate(after=1)
    try:
        with serve(uvicorn_gateway(create_standin(gate=gate))) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                async with client.stream(
                    "POST", SSE_PATH, params={"alt": "sse"}, json=PROMPT
                ) as response:
                    await read_first_event(response)
                    assert await gate.held(5)
                # Leaving the block mid-body closes the connection; the client stays open.
                assert await gate.ended(5)
            assert gate.outcomes == ["cancelled"]
            assert not gate.released
    finally:
        gate.release()


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"base_url": "ftp://example.com"},
        {"base_url": "not a url"},
        {"base_url": "https://example.com/?key=abc"},
        {"api_keys": "one-key-as-a-string"},
        {"timeout": 0},
        {"connect_timeout": -1},
        {"max_connections": 0},
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        GeminiUpstream(**options)


async def test_base_url_path_prefix_is_kept() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json={})

    async with GeminiUpstream(
        base_url="http://proxy.example/gemini/", transport=httpx.MockTransport(handler)
    ) as upstream:
        response = await upstream.request("GET", "/v1/models")
        assert isinstance(response, UpstreamResponse)
        await response.aclose()
        with pytest.raises(ValueError, match="must start with"):
            await upstream.request("GET", "v1/models")
    assert paths == ["/gemini/v1/models"]
    assert upstream.base_url == "http://proxy.example/gemini"


async def test_only_answered_calls_admit_a_model_id_to_the_upstream_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prometheus_client import REGISTRY

    from gemini_scale.upstream import client as upstream_client

    monkeypatch.setattr(upstream_client, "_MODELS", BoundedLabel(2))

    def duration_count(model: str, status: str) -> float:
        return REGISTRY.get_sample_value(
            "gemini_scale_upstream_request_duration_seconds_count",
            {"gen_ai_request_model": model, "http_response_status_code": status},
        ) or 0.0

    before = duration_count("gemini-2.5-flash", "200")
    async with stack() as s:
        for i in range(3):  # made-up ids: the upstream answers 404
            path = f"/v1beta/models/made-up-{i}-{id(s)}:generateContent"
            assert (await s.client.post(path, json=PROMPT)).status_code == 404
        assert (await s.client.post(GENERATE_PATH, json=PROMPT)).status_code == 200
    assert duration_count("gemini-2.5-flash", "200") == before + 1
    assert upstream_client._MODELS.known(f"made-up-0-{id(s)}") == "(other)"
