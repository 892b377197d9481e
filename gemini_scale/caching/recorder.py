"""Recording a forwarded answer as it passes: every message goes on at once, unchanged
except for the cache's headers, and a copy of a storable 200 is kept up to a size cap.

A storable non-streamed answer that declares a ``Content-Length`` within the size cap has its
``http.response.start`` held until its body is complete (a relayed JSON answer arrives in a
few chunks, at once): it then gets its ``ETag`` and ``stored`` in ``Cache-Status``, and a
matching ``If-None-Match`` gets 304. Any other answer's messages go on as they come. A
stream (``text/event-stream``, or a ``streamGenerateContent`` answer in the JSON-array form)
is never held; it is watched by a :class:`~gemini_scale.ratelimit.usage.UsageObserver` and
kept only if it ended on a clean event boundary without an ``{"error": ...}`` frame
(research/security.md C13-C16).
"""

from __future__ import annotations

from gemini_scale.caching.entry import StoredResponse
from gemini_scale.caching.semantics import (
    STORED,
    Header,
    etag_matches,
    etag_of,
    not_modified_headers,
    private_headers,
    response_facts,
)
from gemini_scale.caching.signature import Plan
from gemini_scale.ratelimit.usage import UsageObserver
from gemini_scale.types import Message, Send


class Recorder:
    """A ``send`` wrapper for one forwarded request (see the module docstring).

    After the app returned, :meth:`response` is the entry to store, or ``None``.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_etag",
        "_headers",
        "_held",
        "_if_none_match",
        "_limit",
        "_observer",
        "_pending",
        "_private",
        "_send",
        "_size",
        "_stream",
        "_streams",
        "_tagged",
        "_vary",
        "detail",
        "label",
        "max_age",
    )

    def __init__(
        self,
        send: Send,
        plan: Plan,
        label: bytes,
        *,
        detail: bytes = b"",
        store: bool,
        stream: bool = False,
        if_none_match: bytes | None = None,
    ) -> None:
        self._send = send
        self.label = label
        self.detail = detail
        """Parameters that follow ``stored`` in ``Cache-Status`` (the debug ``key``)."""
        self._limit = plan.max_bytes
        self._vary = plan.vary_set
        self._private = plan.private
        self._stream = stream
        self._streams = plan.streams
        self._if_none_match = if_none_match
        self._chunks: list[bytes] | None = [] if store else None
        self._size = 0
        self._headers: list[Header] = []
        self._pending: Message | None = None
        self._held: list[bytes] = []
        """Body chunks that arrived while the start was held."""
        self._observer: UsageObserver | None = None
        self._etag: bytes | None = None
        self._complete = False
        self._tagged = False
        self.max_age = 0.0
        """The answer's own cap on its lifetime (``0``: it must not be stored)."""

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            await self._body(message)
        elif kind == "http.response.start":
            await self._start(message)
        else:  # trailers, pathsend...: not recorded, so not stored
            self._chunks = None
            if self._pending is not None:
                await self._give_up_holding()
            await self._send(message)

    async def _start(self, message: Message) -> None:
        headers = message.get("headers") or []
        self.max_age, content_type, control, self._tagged, length = response_facts(
            message["status"], headers, self._vary
        )
        private = self._private
        if private is not None:
            headers = (
                private_headers(headers, private) if control
                else [*headers, (b"cache-control", private)]
            )
        self._headers = headers
        if self._chunks is not None:
            stream = self._stream or content_type.startswith(b"text/event-stream")
            if self.max_age <= 0 or (stream and not self._streams):
                self._chunks = None
            elif stream:
                self._observer = UsageObserver("auto")
                self._observer.start(200, content_type.decode("latin-1"))
            elif length is not None and length.isdigit() and int(length) <= self._limit:
                self._pending = message  # until the body is complete: ETag, 304
                return
        message["headers"] = [*headers, (b"cache-status", self.label + self.detail)]
        await self._send(message)

    async def _body(self, message: Message) -> None:
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if self._pending is not None:
            if more:
                self._held.append(body)
                if sum(map(len, self._held)) > self._limit:  # longer than declared
                    await self._give_up_holding()
                return
            if self._held:
                body = b"".join([*self._held, body])
                self._held = []
                message = {"type": "http.response.body", "body": body, "more_body": False}
            start = self._release_start(body, more)
            await self._send(start)
            if start["status"] == 304:  # the client holds it already: no body
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                if self._chunks is not None:
                    self._chunks.append(body)
                    self._complete = True
                return
        chunks = self._chunks
        if chunks is not None:
            self._size += len(body)
            if self._size > self._limit:
                self._chunks = None  # too big: stop keeping a copy (C16)
            else:
                chunks.append(body)
                if self._observer is not None:
                    self._observer.feed(body)
        await self._send(message)
        if not more:
            self._complete = True
            if self._observer is not None:
                self._observer.finish()

    def _release_start(self, body: bytes, more: bool) -> Message:
        """The held start to send now (with an ``ETag`` when ``body`` is all of it, and a
        304 instead when the client's ``If-None-Match`` matches it)."""
        start, self._pending = self._pending, None
        assert start is not None
        headers = self._headers
        etag = None
        if not more and len(body) <= self._limit:
            self._etag = etag = etag_of(body)
            if self._tagged:  # the app's own tag gives way to the content's
                headers = [h for h in headers if h[0] != b"etag"]
            headers = [*headers, (b"etag", etag)]
        label = self.label + (b"" if etag is None else STORED) + self.detail
        match = self._if_none_match
        if etag is not None and match is not None and etag_matches(match, etag):
            headers = not_modified_headers(headers)
            headers.append((b"cache-status", label))
            return {"type": "http.response.start", "status": 304, "headers": headers}
        start["headers"] = [*headers, (b"cache-status", label)]
        return start

    @property
    def holding(self) -> bool:
        """Whether the answer's start is still held (then :meth:`returned` has work)."""
        return self._pending is not None

    async def returned(self) -> None:
        """The app returned: an answer still held never completed its body (a broken
        upstream), so it goes out as the app left it, unfinished (the server then ends
        the connection: the client never sees a clean short answer)."""
        if self._pending is not None:
            await self._give_up_holding()

    async def _give_up_holding(self) -> None:
        """Send the held start without an ``ETag``, then what was held of the body; the
        answer is no longer kept."""
        self._chunks = None
        await self._send(self._release_start(b"", True))
        held, self._held = self._held, []
        if held:
            await self._send({"type": "http.response.body", "body": b"".join(held),
                              "more_body": True})

    def response(self, *, created: float, ttl: float) -> StoredResponse | None:
        """The answer to store: a complete, storable 200 within the size cap (and, for a
        stream, one that ended cleanly without an error frame); else ``None``."""
        chunks = self._chunks
        if chunks is None or not self._complete:
            return None
        observer = self._observer
        if observer is not None and (observer.error_seen or not observer.complete):
            return None
        body = b"".join(chunks)
        return StoredResponse.build(
            self._headers, body, created=created, ttl=min(ttl, self.max_age), etag=self._etag
        )
