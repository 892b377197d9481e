"""StreamingASGITransport streams, propagates disconnects and never leaks the app's task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from gemini_scale.types import Receive, Scope, Send
from gemini_scale.upstream import StreamingASGITransport


async def drain(response: httpx.Response, into: list[bytes]) -> None:
    async for chunk in response.aiter_raw():
        into.append(chunk)


class GatedApp:
    """Sends one chunk, waits for ``release``, then sends the rest; records what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent_first = asyncio.Event()
        self.messages: list[str] = []
        self.outcome: str | None = None
        self.ended = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: 1\r\n\r\n",
                        "more_body": True})
            self.sent_first.set()
            listener = asyncio.ensure_future(self._listen(receive))
            try:
                await self.release.wait()
            finally:
                listener.cancel()
            await send({"type": "http.response.body", "body": b"data: 2\r\n\r\n",
                        "more_body": False})
            self.outcome = "completed"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        finally:
            self.ended.set()

    async def _listen(self, receive: Receive) -> None:
        while True:
            message = await receive()
            self.messages.append(message["type"])
            if message["type"] == "http.disconnect":
                return


@pytest.fixture
async def gated() -> AsyncIterator[tuple[GatedApp, httpx.AsyncClient]]:
    app = GatedApp()
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://app", timeout=5
    ) as client:
        yield app, client


async def test_first_chunk_arrives_while_the_app_is_still_running(
    gated: tuple[GatedApp, httpx.AsyncClient],
) -> None:
    app, client = gated
    async with client.stream("GET", "/") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        chunks = response.aiter_raw()
        first = await asyncio.wait_for(anext(chunks), 2)
        assert first == b"data: 1\r\n\r\n"
        assert not app.release.is_set()
        assert app.outcome is None
        app.release.set()
        rest = [chunk async for chunk in chunks]
    assert rest == [b"data: 2\r\n\r\n"]
    assert app.outcome == "completed"


async def test_closing_early_disconnects_and_cancels_the_app(
    gated: tuple[GatedApp, httpx.AsyncClient],
) -> None:
    app, client = gated
    tasks_before = asyncio.all_tasks()
    async with client.stream("GET", "/") as response:
        await asyncio.wait_for(anext(response.aiter_raw()), 2)
    await asyncio.wait_for(app.ended.wait(), 2)
    assert app.messages[-1] == "http.disconnect"  # told first, like a server would
    assert app.outcome == "cancelled"
    assert asyncio.all_tasks() <= tasks_before


async def test_request_body_query_and_headers_reach_the_app() -> None:
    seen: dict[str, object] = {}

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.update(path=scope["path"], query=scope["query_string"], method=scope["method"],
                    headers=dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"x-echo", b"yes"), (b"set-cookie", b"a=1")]})
        await send({"type": "http.response.body", "body": body[::-1]})

    async def body_parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    async with httpx.AsyncClient(transport=StreamingASGITransport(echo)) as client:
        response = await client.post(
            "http://app/v1/models/m:generateContent?alt=sse",
            content=body_parts(), headers={"x-probe": "1"},
        )
    assert response.status_code == 201
    assert response.content == b"fedcba"
    assert response.headers["x-echo"] == "yes"
    assert seen["path"] == "/v1/models/m:generateContent"
    assert seen["query"] == b"alt=sse"
    assert seen["method"] == "POST"
    assert seen["headers"][b"x-probe"] == b"1"  # type: ignore[index]


async def test_app_error_before_start_is_a_transport_error_not_a_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise LookupError("boom")

    async with httpx.AsyncClient(transport=StreamingASGITransport(broken)) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get("http://app/")
    assert isinstance(caught.value, httpx.TransportError)
    assert isinstance(caught.value.__cause__, LookupError)


async def test_app_returning_without_a_response_is_a_transport_error() -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    async with httpx.AsyncClient(transport=StreamingASGITransport(silent)) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("http://app/")


async def test_app_error_mid_body_is_a_read_error() -> None:
    async def breaks_mid_body(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise LookupError("boom")

    received: list[bytes] = []
    async with (
        httpx.AsyncClient(transport=StreamingASGITransport(breaks_mid_body)) as client,
        client.stream("GET", "http://app/") as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.ReadError):
            await drain(response, received)
    assert received == [b"partial"]


async def test_read_timeout_applies_to_start_and_chunks() -> None:
    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(10)

    async with httpx.AsyncClient(transport=StreamingASGITransport(slow), timeout=0.05) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("http://app/")


async def test_head_request_has_no_body() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    async with httpx.AsyncClient(transport=StreamingASGITransport(app)) as client:
        response = await client.head("http://app/")
    assert response.status_code == 200
    assert response.content == b""


async def test_aclose_cancels_apps_still_running() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    transport = StreamingASGITransport(forever)
    request = httpx.Request("GET", "http://app/")
    response = await transport.handle_async_request(request)
    assert response.status_code == 200
    await asyncio.wait_for(started.wait(), 2)
    await transport.aclose()
    assert cancelled.is_set()
    await response.aclose()


async def test_queue_bounds_unread_chunks() -> None:
    sent: list[int] = []

    async def firehose(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for index in range(100):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            sent.append(index)
        await send({"type": "http.response.body", "body": b""})

    async with (
        httpx.AsyncClient(transport=StreamingASGITransport(firehose, queue_size=4)) as client,
        client.stream("GET", "http://app/") as response,
    ):
        await asyncio.sleep(0.05)
        assert len(sent) <= 5  # the app waits for the reader
        body = await response.aread()
    assert len(body) == 100
    assert len(sent) == 100
