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

The common answer (a held start, then its whole body in one message) is recorded in one
step: its entity tag, the start the client gets and the replay headers of its entry are
worked out once, when the body arrives, and nothing else is copied.
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
    replayable,
    response_facts,
)
from gemini_scale.caching.signature import Plan
from gemini_scale.gemini_json import stream_chunks
from gemini_scale.header_names import lowercased
from gemini_scale.header_values import bounded_decimal
from gemini_scale.ratelimit.usage import UsageObserver
from gemini_scale.types import Message, Send


def _body_bytes(message: Message) -> bytes:
    """A body message's body as ``bytes``: an app may send a ``bytearray`` or a
    ``memoryview`` (Starlette's streamed chunks), which compiled code refuses as ``bytes``."""
    body = message.get("body", b"")
    return body if type(body) is bytes else bytes(body)


class Recorder:
    """A ``send`` wrapper for one forwarded request (see the module docstring).

    After the app returned, :meth:`response` is the entry to store, or ``None``.
    """

    __slots__ = (
        "_age",
        "_chunks",
        "_complete",
        "_declared",
        "_etag",
        "_headers",
        "_held",
        "_if_none_match",
        "_kept",
        "_now",
        "_observer",
        "_pending",
        "_plan",
        "_send",
        "_size",
        "_stream",
        "_tagged",
        "_whole",
        "detail",
        "label",
        "max_age",
        "withheld",
    )

    def __init__(
        self,
        send: Send,
        plan: Plan,
        label: bytes,
        *,
        detail: bytes = b"",
        store: bool,
        now: float,
        stream: bool = False,
        if_none_match: bytes | None = None,
    ) -> None:
        self._send = send
        self._plan = plan
        self.label = label
        self.detail = detail
        """Parameters that follow ``stored`` in ``Cache-Status`` (the debug ``key``)."""
        self._now = now
        """When the answer is received (its request's start): its ``Expires`` counts from
        here when it has no ``Date``."""
        self._stream = stream
        self._if_none_match = if_none_match
        self._chunks: list[bytes] | None = [] if store else None
        """The body kept so far (``None``: the answer is not kept)."""
        self._pending: Message | None = None
        self._held: list[bytes] | None = None
        """Body chunks that arrived while the start was held (more than one message)."""
        self._kept: tuple[Header, ...] | None = None
        """The replay headers of an answer recorded in one step (:meth:`_release_start`)."""
        self._complete = False
        self.max_age = 0.0
        """The answer's own cap on its lifetime (``0``: it must not be stored)."""
        self._age = 0
        """How old the answer was when it arrived (its ``Age``)."""
        self._headers: list[Header] = []
        self._tagged = False
        self._observer: UsageObserver | None = None
        self._size = 0
        self._etag: bytes | None = None
        self._whole = b""
        """The body of an answer recorded in one step."""
        self._declared = -1
        """A held answer's ``Content-Length``."""
        self.withheld: bytes | None = None
        """The body of a forwarded answer the client got as a 304 instead."""

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self._pending is None:
                await self._body(message)
                return
            body = _body_bytes(message)
            if message.get("more_body", False) or self._held is not None:
                whole = await self._hold(body, message.get("more_body", False))
                if whole is None:
                    return
                body = whole
                message = {"type": "http.response.body", "body": body, "more_body": False}
            if len(body) != self._declared:  # not the body its start declared: not kept
                self._chunks = None
                await self._send(self._release_start(b"", True))
                await self._send(message)
                return
            # The held answer's whole body: the start goes out with its ETag, and the
            # answer is recorded as it is (nothing is copied).
            start = self._release_start(body, False)
            await self._send(start)
            if start["status"] == 304:  # the client holds it already: no body
                self.withheld = body
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await self._send(message)
            if self._kept is not None:
                self._whole = body
                self._complete = True
        elif kind == "http.response.start":
            if self._start(message):
                await self._send(message)
        else:  # trailers, pathsend...: not recorded, so not stored
            self._chunks = None
            if self._pending is not None:
                await self._give_up_holding()
            await self._send(message)

    def _start(self, message: Message) -> bool:
        """Note the answer's facts; whether its start goes on now (else it is held)."""
        plan = self._plan
        headers = lowercased(message.get("headers") or ())
        self.max_age, content_type, control, self._tagged, length, self._age = response_facts(
            message["status"], headers, plan.vary_set, self._now
        )
        private = plan.private
        if private is not None:
            headers = (
                private_headers(headers, private) if control
                else [*headers, (b"cache-control", private)]
            )
        self._headers = headers
        if self._chunks is not None:
            stream = self._stream or content_type.startswith(b"text/event-stream")
            if self.max_age <= 0 or (stream and not plan.streams):
                self._chunks = None
            elif stream:
                self._observer = UsageObserver("auto")
                self._observer.start(200, content_type.decode("latin-1"))
            elif (
                length is not None
                and (declared := bounded_decimal(length, plan.max_bytes + 1)) is not None
                and declared <= plan.max_bytes
            ):
                self._pending = message  # until the body is complete: ETag, 304
                self._declared = declared
                return False
            elif self._tagged:  # not held: the app's own tag went out, so the entry keeps it
                self._etag = next(bytes(v) for k, v in headers if k.lower() == b"etag")
        message["headers"] = [*headers, (b"cache-status", self.label + self.detail)]
        return True

    async def _hold(self, body: bytes, more: bool) -> bytes | None:
        """A held answer's body in more than one message: the whole body once it is
        complete; ``None`` until then (or when it is longer than the cap: then the start
        and what was held go on, and the answer is not kept)."""
        held = self._held
        if held is None:
            held = self._held = []
        if more:
            held.append(body)
            if sum(map(len, held)) > self._plan.max_bytes:  # longer than declared
                await self._give_up_holding()
            return None
        self._held = None
        return b"".join([*held, body])

    async def _body(self, message: Message) -> None:
        body = _body_bytes(message)
        more = message.get("more_body", False)
        chunks = self._chunks
        if chunks is not None:
            self._size += len(body)
            if self._size > self._plan.max_bytes:
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
        304 instead when the client's ``If-None-Match`` matches it). With the ``ETag``,
        the replay headers of the entry are worked out too (when it is kept)."""
        start, self._pending = self._pending, None
        assert start is not None
        headers = self._headers
        if not more and len(body) <= self._plan.max_bytes:
            self._etag = etag = etag_of(body)
            field = (b"etag", etag)
            if self._chunks is not None:
                self._kept = (
                    *replayable(headers), field, (b"content-length", str(len(body)).encode())
                )
            if self._tagged:  # the app's own tag gives way to the content's
                headers = [h for h in headers if h[0] != b"etag"]
            headers = [*headers, field, (b"cache-status", self.label + STORED + self.detail)]
            match = self._if_none_match
            if match is not None and etag_matches(match, etag):
                return {"type": "http.response.start", "status": 304,
                        "headers": not_modified_headers(headers)}
        else:
            headers = [*headers, (b"cache-status", self.label + self.detail)]
        start["headers"] = headers
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
        held, self._held = self._held, None
        if held:
            await self._send({"type": "http.response.body", "body": b"".join(held),
                              "more_body": True})

    def response(self, *, created: float, ttl: float) -> StoredResponse | None:
        """The answer to store: a complete, storable 200 within the size cap (and, for a
        stream, one that ended cleanly without an error frame); else ``None``."""
        chunks = self._chunks
        if chunks is None or not self._complete:
            return None
        ttl = min(ttl, self.max_age)
        kept = self._kept
        if kept is not None:  # recorded in one step
            assert self._etag is not None
            return StoredResponse(
                kept, self._whole, self._etag, created, created + ttl, initial_age=self._age
            )
        observer = self._observer
        if observer is not None and (observer.error_seen or not observer.complete):
            return None
        body = b"".join(chunks)
        if self._stream and not _reached_its_last_chunk(body):
            return None  # ended cleanly, but before its last chunk: cut short upstream
        return StoredResponse.build(
            self._headers, body, created=created, ttl=ttl, etag=self._etag,
            initial_age=self._age,
        )


def _reached_its_last_chunk(body: bytes) -> bool:
    """Whether a ``streamGenerateContent`` answer got to its end: every candidate it streamed
    said why it stopped (its ``finishReason``, in the chunk that ends it), or the prompt was
    blocked (``promptFeedback.blockReason``). Parsed only when the words are there at all
    (a stream cut short usually lacks them), and only to store the answer."""
    if body.rfind(b'"finishReason"') < 0 and body.rfind(b'"blockReason"') < 0:
        return False
    chunks = stream_chunks(body)
    if chunks is None:
        return False
    streamed: set[object] = set()
    finished: set[object] = set()
    for chunk in chunks:
        if type(chunk) is not dict:
            continue
        feedback = chunk.get("promptFeedback")
        if type(feedback) is dict and feedback.get("blockReason"):
            return True
        candidates = chunk.get("candidates")
        for candidate in candidates if type(candidates) is list else ():
            if type(candidate) is dict:
                index = candidate.get("index", 0)
                which = index if type(index) is int else repr(index)
                streamed.add(which)
                if candidate.get("finishReason"):
                    finished.add(which)
    return bool(streamed) and streamed <= finished
