"""An httpx transport that runs an ASGI app in-process *and streams its response*.

``httpx.ASGITransport`` collects the whole body before returning (encode/httpx#2186), so it
can neither test nor serve Server-Sent Events. :class:`StreamingASGITransport` runs the app in
its own task and hands each ``http.response.body`` chunk to the reader as soon as the app
sends it. Closing the response early (the reader went away) tells the app
``http.disconnect`` and cancels its task, exactly what a real server does when the socket
closes.

It is asyncio-only (the app task outlives :meth:`handle_async_request`, which a structured
anyio task group cannot express) and, like ``httpx.ASGITransport``, it does not run the app's
lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from gemini_scale.types import ASGIApp, Message

__all__ = ["StreamingASGITransport"]

logger = logging.getLogger("gemini_scale.upstream.asgi_transport")


@dataclass(frozen=True, slots=True)
class _AppFailed:
    """Queued when the app raised; the reader re-raises it as a transport error."""

    exc: BaseException


@dataclass(frozen=True, slots=True)
class _AppReturned:
    """Queued when the app returned (normally after its last body message)."""


_Item = Message | _AppFailed | _AppReturned


def _read_timeout(request: httpx.Request) -> float | None:
    """The read timeout httpx attached to the request (``None``: wait forever)."""
    timeout = request.extensions.get("timeout", {})
    value = timeout.get("read") if isinstance(timeout, dict) else None
    return float(value) if value is not None else None


class _Exchange:
    """One request/response exchange with the app: the task, its queue and the disconnect flag."""

    def __init__(self, request: httpx.Request, queue_size: int) -> None:
        self.request = request
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        #: Set when the reader closed the response or the app completed it; from then on
        #: ``receive()`` answers ``http.disconnect``.
        self.disconnected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.response_complete = False

    async def next_item(self, wait: float | None) -> _Item:
        """The next message from the app, waiting at most ``wait`` seconds."""
        try:
            async with asyncio.timeout(wait):
                return await self.queue.get()
        except TimeoutError:
            raise httpx.ReadTimeout(
                "The in-process ASGI app sent nothing in time.", request=self.request
            ) from None

    async def shutdown(self, grace: float, disconnect_grace: float) -> None:
        """Tell the app the client is gone, then make sure its task has ended.

        A finished response gets ``grace`` seconds for background work, an unfinished one
        ``disconnect_grace`` seconds to notice ``http.disconnect`` and stop by itself; then
        the task is cancelled.
        """
        self.disconnected.set()
        task = self.task
        if task is None:
            return
        if not task.done():
            await asyncio.wait(
                {task}, timeout=grace if self.response_complete else disconnect_grace
            )
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            # Already reported to the reader; retrieving it here keeps asyncio quiet.
            logger.debug("in-process ASGI app ended with %r", task.exception())


class _StreamingBody(httpx.AsyncByteStream):
    """The response body: yields the app's chunks as they arrive."""

    def __init__(
        self, exchange: _Exchange, *, grace: float, disconnect_grace: float, head: bool
    ) -> None:
        self._exchange = exchange
        self._grace = grace
        self._disconnect_grace = disconnect_grace
        self._head = head
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        timeout = _read_timeout(exchange.request)
        while not exchange.response_complete:
            item = await exchange.next_item(timeout)
            if isinstance(item, _AppFailed):
                raise httpx.ReadError(
                    "The in-process ASGI app raised while sending the body.",
                    request=exchange.request,
                ) from item.exc
            if isinstance(item, _AppReturned):
                raise httpx.RemoteProtocolError(
                    "The in-process ASGI app returned without completing the response body.",
                    request=exchange.request,
                )
            if item.get("type") != "http.response.body":
                continue
            if not item.get("more_body", False):
                exchange.response_complete = True
            body = bytes(item.get("body", b""))
            if body and not self._head:
                yield body

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._exchange.shutdown(self._grace, self._disconnect_grace)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that calls an ASGI app in-process with real streaming.

    Each request runs the app in a new task. The returned response's body yields every
    ``http.response.body`` chunk the moment the app sends it; at most ``queue_size`` chunks
    wait unread (the app's ``send`` blocks beyond that, as on a real socket). Closing the
    response before the end sends ``http.disconnect`` to the app, gives it
    ``disconnect_grace`` seconds to stop, then cancels its task; after a complete response
    the task gets ``shutdown_grace`` seconds (background tasks) before it is cancelled.
    An app that raises, or returns, before ``http.response.start`` becomes an
    ``httpx.RemoteProtocolError`` (never a fabricated 500); one that fails mid-body becomes
    an ``httpx.ReadError`` on the reader. The client's read timeout applies to the wait for
    the response start and for each chunk (``httpx.ReadTimeout``). :meth:`aclose` cancels
    any app task still running.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        root_path: str = "",
        client: tuple[str, int] = ("127.0.0.1", 123),
        queue_size: int = 16,
        shutdown_grace: float = 5.0,
        disconnect_grace: float = 0.1,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.app = app
        self.root_path = root_path
        self.client = client
        self._queue_size = queue_size
        self._grace = shutdown_grace
        self._disconnect_grace = disconnect_grace
        self._tasks: set[asyncio.Task[None]] = set()

    def _scope(self, request: httpx.Request) -> dict[str, Any]:
        url = request.url
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "server": (url.host, url.port),
            "client": self.client,
            "root_path": self.root_path,
            "state": {},
            "extensions": {},
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Start the app for ``request`` and return as soon as it has sent the response start."""
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("StreamingASGITransport needs an async request body")
        exchange = _Exchange(request, self._queue_size)
        body_chunks = request.stream.__aiter__()
        request_complete = False
        response_started = False

        async def receive() -> Message:
            nonlocal request_complete
            if request_complete or exchange.disconnected.is_set():
                await exchange.disconnected.wait()
                return {"type": "http.disconnect"}
            try:
                chunk = await body_chunks.__anext__()
            except StopAsyncIteration:
                request_complete = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: Message) -> None:
            nonlocal response_started
            kind = message.get("type")
            if kind == "http.response.start":
                if response_started:
                    raise RuntimeError("http.response.start sent twice")
                response_started = True
            elif kind == "http.response.body" and not response_started:
                raise RuntimeError("http.response.body sent before http.response.start")
            await exchange.queue.put(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                # Like a server: once the response is complete, receive() reports disconnect.
                exchange.disconnected.set()

        async def run_app() -> None:
            try:
                await self.app(self._scope(request), receive, send)
            except Exception as exc:
                await exchange.queue.put(_AppFailed(exc))
            else:
                await exchange.queue.put(_AppReturned())

        task = asyncio.get_running_loop().create_task(run_app(), name="asgi-app")
        exchange.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        try:
            start = await self._await_start(exchange)
        except BaseException:
            # Shielded: an anyio cancel scope (the caller gave up) would interrupt the
            # shutdown at its first await and leave the app task running.
            with anyio.CancelScope(shield=True):
                await exchange.shutdown(self._grace, 0.0)
            raise
        body = _StreamingBody(
            exchange,
            grace=self._grace,
            disconnect_grace=self._disconnect_grace,
            head=request.method == "HEAD",
        )
        return httpx.Response(
            status_code=int(start["status"]),
            headers=[(bytes(k), bytes(v)) for k, v in start.get("headers", [])],
            stream=body,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _await_start(self, exchange: _Exchange) -> Message:
        timeout = _read_timeout(exchange.request)
        while True:
            item = await exchange.next_item(timeout)
            if isinstance(item, _AppFailed):
                logger.warning(
                    "in-process ASGI app raised before starting a response: %s",
                    type(item.exc).__name__,
                )
                raise httpx.RemoteProtocolError(
                    "The in-process ASGI app raised before starting a response.",
                    request=exchange.request,
                ) from item.exc
            if isinstance(item, _AppReturned):
                raise httpx.RemoteProtocolError(
                    "The in-process ASGI app returned without sending a response.",
                    request=exchange.request,
                )
            if item.get("type") == "http.response.start":
                return item

    async def aclose(self) -> None:
        """Cancel every app task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                with contextlib.suppress(Exception):
                    task.exception()
