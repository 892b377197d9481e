"""BodyTimeoutMiddleware: a body that has not all arrived by the deadline is a 408 (security.md
D06), whoever inside was reading it; bodies in time, and waits after the body (a stream
watching its client), are untouched; the server's own cancellations still cancel."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemini_scale import BodyTimeoutMiddleware, JSONBodyMiddleware
from gemini_scale.types import ASGIApp, Message
from tests.servers import serve

DEADLINE = 0.3


def service(calls: list[str]) -> ASGIApp:
    """JSON bodies checked and read by ``JSONBodyMiddleware``, under the deadline."""

    async def echo(request: Request) -> Response:
        calls.append("echo")
        return JSONResponse(await request.json())

    async def watch(request: Request) -> Response:
        """Streams for longer than the deadline while it waits for its client to leave."""
        await request.body()

        async def events() -> Any:
            for n in range(4):
                await asyncio.sleep(DEADLINE / 2)
                yield f"data: {n}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def raw(request: Request) -> Response:
        """Reads the body itself: a disconnect is Starlette's ClientDisconnect here."""
        calls.append("raw")
        return Response(await request.body())

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]),
                            Route("/watch", watch, methods=["POST"]),
                            Route("/raw", raw, methods=["POST"])])
    return BodyTimeoutMiddleware(JSONBodyMiddleware(app, path_prefixes=("/echo", "/watch")),
                                 seconds=DEADLINE)


def scope(path: str = "/echo") -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }


async def exchange(app: ASGIApp, receive: Any, path: str = "/echo") -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope(path), receive, send), timeout=5)
    return sent


async def test_a_dribbled_body_is_a_408_at_the_deadline() -> None:
    calls: list[str] = []

    async def dribble() -> Message:
        await asyncio.sleep(DEADLINE / 6)
        return {"type": "http.request", "body": b" ", "more_body": True}

    started = time.monotonic()
    sent = await exchange(service(calls), dribble)
    took = time.monotonic() - started
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert (error["code"], error["status"]) == (408, "DEADLINE_EXCEEDED")
    assert len(sent) == 2
    assert calls == []  # the endpoint never ran
    assert DEADLINE <= took < DEADLINE * 2


async def test_an_endpoint_reading_the_body_itself_gets_a_408_not_a_500() -> None:
    async def dribble() -> Message:
        await asyncio.sleep(DEADLINE / 6)
        return {"type": "http.request", "body": b" ", "more_body": True}

    sent = await exchange(service([]), dribble, "/raw")
    assert [m.get("status") for m in sent[:1]] == [408]
    assert len(sent) == 2


async def test_a_body_that_never_comes_is_a_408() -> None:
    async def silent() -> Message:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    sent = await exchange(service([]), silent)
    assert sent[0]["status"] == 408


async def test_a_body_in_time_and_a_wait_after_it_are_untouched() -> None:
    calls: list[str] = []
    body = b'{"hello": "world"}'
    given: list[bool] = []

    async def receive() -> Message:
        if not given:
            given.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(60)  # the client stays
        raise AssertionError("unreachable")

    sent = await exchange(service(calls), receive)
    assert sent[0]["status"] == 200
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:])) == {"hello": "world"}
    given.clear()
    streamed = await exchange(service(calls), receive, "/watch")  # outlives the deadline
    assert streamed[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in streamed[1:]).count(b"data:") == 4


async def test_the_servers_cancellation_still_cancels() -> None:
    app = service([])

    async def silent() -> Message:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    task = asyncio.create_task(app(scope(), silent, send))
    await asyncio.sleep(DEADLINE / 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_slow_clients_over_a_socket_get_408_and_others_are_served(http: str) -> None:
    """Under uvicorn: headers, then a byte now and then; a normal client meanwhile."""
    calls: list[str] = []
    with serve(service(calls), http=http) as live:
        slow = [socket.create_connection((live.host, live.port), timeout=5) for _ in range(3)]
        try:
            for conn in slow:
                conn.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                             b"\r\nContent-Length: 100\r\n\r\n{")
            body = b'{"n": 1}'
            with socket.create_connection((live.host, live.port), timeout=5) as fast:
                fast.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                             b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
                assert b" 200 " in _read_all(fast).split(b"\r\n", 1)[0] + b" "
            deadline = time.monotonic() + DEADLINE * 3
            for conn in slow:
                while time.monotonic() < deadline:
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break
                    time.sleep(DEADLINE / 10)
                answer = _read_all(conn)
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
                assert b"DEADLINE_EXCEEDED" in answer
        finally:
            for conn in slow:
                conn.close()
    assert calls == ["echo"]


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    conn.settimeout(5)
    while True:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk
