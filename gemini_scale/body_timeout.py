"""``BodyTimeoutMiddleware``: a request body must arrive within a deadline, else 408.

uvicorn (and the ASGI servers like it) wait for a request body as long as the client keeps
the connection open, so a client that sends one byte a second holds a task, a socket and a
slot of every limit for as long as it likes (security.md D06). This layer gives the body a
deadline, counted from the first time a layer inside asks for it; a body still incomplete
then is answered ``408 Request Timeout`` in Google's envelope, and the layers inside see the
client as gone (``http.disconnect``).

A timer per request would cost more than the rest of a limiter (``asyncio.timeout`` takes
about 4 µs on uvloop). Instead the readers waiting for a body are noted in a dict, and one
timer per event loop, armed only while some reader waits, sweeps it a few times per
deadline and cancels the late readers' wait (the cancellation is taken back at once).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from gemini_scale.errors import error_body, error_headers
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyTimeoutMiddleware"]

_MESSAGE: Final = "The request body was not received in time."
#: How many sweeps a deadline spans (a late reader is stopped within 1/_SWEEPS of it).
_SWEEPS: Final = 8


class _Watch:
    """One event loop's readers waiting for a body, and the timer that sweeps them."""

    __slots__ = ("expired", "interval", "loop", "readers", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.readers: dict[asyncio.Task[object], float] = {}
        self.expired: set[asyncio.Task[object]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def wait(self, task: asyncio.Task[object], deadline: float) -> None:
        self.readers[task] = deadline
        if self.timer is None:
            self.timer = self.loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self.timer = None
        now = time.monotonic()
        late = [task for task, deadline in self.readers.items() if deadline <= now]
        for task in late:
            del self.readers[task]
            self.expired.add(task)
            task.cancel()
        if self.readers:
            self.timer = self.loop.call_later(self.interval, self._sweep)


class BodyTimeoutMiddleware:
    """Answer ``408`` when a request body has not fully arrived ``seconds`` after a layer
    inside first asked for it (pure ASGI; asyncio only, other event loops pass through).

    Put it outside every layer that reads bodies (inside ``MetricsMiddleware``, which then
    records the 408). Waiting for a disconnect after the body (a streamed answer watching
    its client) has no deadline, and an HTTP/1 request that declares no body (no
    ``Content-Length`` but 0, no ``Transfer-Encoding``) passes untouched.

    Options:
        seconds: the deadline (default 30: 20 MiB, the default body cap, at 0.7 MB/s).
    """

    def __init__(self, app: ASGIApp, *, seconds: float = 30.0) -> None:
        if not seconds > 0:
            raise ValueError("seconds must be positive")
        self.app = app
        self.seconds = seconds
        self._watch: _Watch | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _may_have_body(scope):
            await self.app(scope, receive, send)
            return
        await _Request(self, receive, send).run(self.app, scope)

    def watch(self, loop: asyncio.AbstractEventLoop) -> _Watch:
        """The readers of ``loop`` (one server, one loop: a new loop takes over)."""
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = _Watch(loop, self.seconds / _SWEEPS)
        return watch


def _may_have_body(scope: Scope) -> bool:
    """Whether the request may send a body: over HTTP/1 only one that declares it can."""
    if not scope.get("http_version", "1.1").startswith("1"):
        return True
    for name, value in scope["headers"]:
        if (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
            return True
    return False


class _Request:
    """One request's body deadline: its ``receive`` and ``send`` as the app sees them."""

    __slots__ = ("answered", "deadline", "done", "layer", "receive", "send", "started",
                 "timed_out")

    def __init__(self, layer: BodyTimeoutMiddleware, receive: Receive, send: Send) -> None:
        self.layer = layer
        self.receive = receive
        self.send = send
        self.deadline = 0.0  # set when the body is first asked for
        self.done = False  # the whole body arrived (or the client left)
        self.timed_out = False
        self.started = False  # the app's answer began (before the deadline)
        self.answered = False  # the 408 went out

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive_in_time, self.send_unless_late)
        except Exception:
            # What the app made of the "disconnect" (Starlette's ClientDisconnect, say) is
            # not the answer: the 408 is.
            if not self.timed_out or self.started:
                raise
        if self.timed_out and not self.started and not self.answered:
            await self._answer_late()

    async def receive_in_time(self) -> Message:
        if self.done:
            return await self.receive()
        if self.timed_out:
            return {"type": "http.disconnect"}
        try:
            task = asyncio.current_task()  # whichever task waits is the one to stop
        except RuntimeError:  # not asyncio (trio): no deadline
            task = None
        if task is None:
            return await self.receive()
        watch = self.layer.watch(task.get_loop())
        if not self.deadline:
            self.deadline = time.monotonic() + self.layer.seconds
        watch.wait(task, self.deadline)
        try:
            message = await self.receive()
        except asyncio.CancelledError:
            if task not in watch.expired:
                raise
            watch.expired.discard(task)
            task.uncancel()  # our cancellation, not the server's
            self.timed_out = True
            return {"type": "http.disconnect"}
        finally:
            watch.readers.pop(task, None)
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message

    async def send_unless_late(self, message: Message) -> None:
        if self.timed_out and not self.started:
            if not self.answered and message["type"] == "http.response.start":
                await self._answer_late()  # instead of what the app makes of a "disconnect"
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)

    async def _answer_late(self) -> None:
        self.answered = True
        body = error_body(408, _MESSAGE)
        await self.send({"type": "http.response.start", "status": 408,
                         "headers": [*error_headers(body), (b"connection", b"close")]})
        await self.send({"type": "http.response.body", "body": body})
