"""Migrating answers as they pass: one JSON document, SSE events, or a streamed JSON array.

Each migrator takes the body chunk by chunk and returns what to send now. An SSE event or
an element of a streamed JSON array goes out as soon as its last byte has arrived: nothing
waits for the end of the stream. Only a plain JSON document is held whole (it has to be
parsed whole). Anything that does not parse passes through unchanged, and so does anything
larger than :data:`MAX_HELD_BYTES` (relayed as it comes, unmigrated, rather than held).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from gemini_scale import fastjson
from gemini_scale.gemini_json import (
    EVENT_END,
    LINE_END,
    NonFiniteNumberError,
    dump_json,
    sse_payload,
)

__all__ = [
    "MAX_HELD_BYTES",
    "ArrayMigrator",
    "DocumentMigrator",
    "EventStreamMigrator",
    "Migrate",
]

Migrate = Callable[[Any], Any]

#: The most a migrator holds of one document, event or array element; beyond it the rest
#: is relayed unmigrated.
MAX_HELD_BYTES: Final = 32 * 1024 * 1024


def _loads(raw: bytes | bytearray) -> tuple[bool, Any]:
    try:
        return True, fastjson.loads(raw)
    except (ValueError, RecursionError):
        return False, None


def _encoded(value: Any, raw: bytes, *, pretty: bool = False) -> bytes:
    """``value`` (migrated from ``raw``) as JSON, or ``raw`` as it came when ``value`` holds
    a number JSON cannot write (``1e400`` parses into an infinity): relayed, not corrupted."""
    try:
        return dump_json(value, pretty=pretty)
    except NonFiniteNumberError:
        return raw


class DocumentMigrator:
    """A whole JSON document: held until complete, migrated, re-encoded."""

    __slots__ = ("_buffer", "_migrate", "_overflow")

    def __init__(self, migrate: Migrate) -> None:
        self._migrate = migrate
        self._buffer = bytearray()
        self._overflow = False

    @property
    def holding(self) -> bool:
        """Whether the answer is held (False once it grew past the limit)."""
        return not self._overflow

    def feed(self, chunk: bytes) -> bytes:
        if self._overflow:
            return chunk
        self._buffer += chunk
        if len(self._buffer) > MAX_HELD_BYTES:
            self._overflow = True
            held, self._buffer = bytes(self._buffer), bytearray()
            return held
        return b""

    def finish(self) -> bytes:
        if self._overflow:
            return b""
        raw, self._buffer = bytes(self._buffer), bytearray()
        ok, value = _loads(raw)
        if not ok:
            return raw
        return _encoded(self._migrate(value), raw, pretty=raw[:2] in (b"{\n", b"[\n"))




class EventStreamMigrator:
    """Server-sent events: the ``data:`` lines of each complete event are joined, migrated
    when they hold JSON and written back on one ``data:`` line; the event's other lines
    (``id:``, ``event:``, ``retry:``, comments) and its terminator are kept."""

    __slots__ = ("_buffer", "_migrate", "_oversized", "_scanned")

    def __init__(self, migrate: Migrate) -> None:
        self._migrate = migrate
        self._buffer = bytearray()
        self._scanned = 0  # where the search for the next terminator resumes
        self._oversized = False  # relaying an event too large to hold, up to its end

    def feed(self, chunk: bytes) -> bytes:
        buffer = self._buffer
        buffer += chunk
        out = bytearray()
        pos = 0
        while True:
            end = EVENT_END.search(buffer, self._scanned)
            if end is None:
                break
            event = bytes(buffer[pos : end.start()])
            if self._oversized:
                out += event + end.group()
                self._oversized = False
            else:
                out += self._event(event, end.group())
            pos = self._scanned = end.end()
        del buffer[:pos]
        self._scanned = max(0, len(buffer) - 3)  # a terminator may straddle chunks
        if len(buffer) > MAX_HELD_BYTES:  # relay it as it comes, unmigrated
            out += buffer
            del buffer[:]
            self._scanned = 0
            self._oversized = True
        return bytes(out)

    def finish(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer = bytearray()
        return rest

    def _event(self, event: bytes, terminator: bytes) -> bytes:
        lines = LINE_END.split(event)
        payload = sse_payload(lines)
        if payload is None:
            return event + terminator
        ok, value = _loads(payload)
        if not ok:
            return event + terminator
        # The data goes where its first line was; the other lines keep their order.
        first = next(i for i, line in enumerate(lines) if line.startswith(b"data:"))
        others = [line for line in lines if not line.startswith(b"data:")]
        try:
            migrated = b"data: " + dump_json(self._migrate(value))
        except NonFiniteNumberError:
            return event + terminator
        newline = terminator[: len(terminator) // 2]
        return newline.join([*others[:first], migrated, *others[first:]]) + terminator


_STRUCTURE: Final = re.compile(rb'[{}\[\]"]')
_STRING_END: Final = re.compile(rb'["\\]')


class ArrayMigrator:
    """A JSON array streamed element by element (Gemini's ``streamGenerateContent`` without
    ``alt=sse``): each top-level element is migrated as soon as it is complete; the
    brackets, commas and whitespace between elements pass unchanged."""

    __slots__ = (
        "_depth", "_element", "_escaped", "_in_string", "_migrate", "_oversized", "_started",
    )

    def __init__(self, migrate: Migrate) -> None:
        self._migrate = migrate
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._element = bytearray()
        self._started = False  # inside a top-level element
        self._oversized = False  # relaying an element too large to hold, up to its end

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        pos, end = 0, len(chunk)
        while pos < end:
            if self._in_string:
                pos = self._string(chunk, pos, end, out)
                continue
            found = _STRUCTURE.search(chunk, pos)
            if found is None:
                self._emit(out, chunk[pos:])
                break
            at = found.start()
            byte = chunk[at]
            if byte == 0x22:  # '"'
                self._emit(out, chunk[pos : at + 1])
                self._in_string = True
                pos = at + 1
                continue
            if byte in (0x7B, 0x5B):  # '{' '['
                if self._depth == 1 and not self._started:
                    out += chunk[pos:at]
                    self._started = True
                    pos = at
                self._depth += 1
                self._emit(out, chunk[pos : at + 1])
                pos = at + 1
                continue
            self._depth -= 1  # '}' ']'
            self._emit(out, chunk[pos : at + 1])
            pos = at + 1
            if self._started and self._depth == 1:
                out += self._element_done()
        if len(self._element) > MAX_HELD_BYTES:  # relay it as it comes, unmigrated
            out += self._element
            self._element = bytearray()
            self._oversized = True
        return bytes(out)

    def finish(self) -> bytes:
        rest, self._element = bytes(self._element), bytearray()
        return rest

    def _emit(self, out: bytearray, data: bytes) -> None:
        if self._started and not self._oversized:
            self._element += data
        else:
            out += data

    def _string(self, chunk: bytes, pos: int, end: int, out: bytearray) -> int:
        if self._escaped:
            self._escaped = False
            self._emit(out, chunk[pos : pos + 1])
            return pos + 1
        found = _STRING_END.search(chunk, pos)
        if found is None:
            self._emit(out, chunk[pos:end])
            return end
        at = found.start()
        self._emit(out, chunk[pos : at + 1])
        if chunk[at] == 0x5C:  # backslash: the next byte is escaped, perhaps in the next chunk
            self._escaped = True
        else:
            self._in_string = False
        return at + 1

    def _element_done(self) -> bytes:
        self._started = False
        if self._oversized:
            self._oversized = False
            return b""
        raw, self._element = bytes(self._element), bytearray()
        ok, value = _loads(raw)
        if not ok:
            return raw
        return _encoded(self._migrate(value), raw, pretty=raw.find(b"\n") >= 0)
