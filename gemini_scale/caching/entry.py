"""A stored response: the replay headers, prebuilt, and the body, in one byte string.

Layout (network byte order): ``b"GSC1"``, created and expires (wall-clock seconds, doubles),
the lengths of the entity tag, the header block and the body (``H I I``), then the tag, the
header block (names and values separated by NUL, which no header field may contain) and
the body. An answer that was already old when received (an upstream ``Age``) is written as
``b"GSC2"``: the same with its initial age (a double) after expires; any other entry keeps
the ``GSC1`` layout.
Decoding is a ``struct`` unpack and one ``split``; a truncated entry, another format version
or a malformed block is refused with :class:`CorruptEntryError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import chain

from gemini_scale.caching.semantics import HIT, Header, etag_of, replayable
from gemini_scale.errors import GeminiScaleError

MAGIC = b"GSC1"
MAGIC_AGED = b"GSC2"
_HEAD = struct.Struct("!4sddHII")
_HEAD_AGED = struct.Struct("!4sdddHII")
# What an entry held as an object takes beyond its content, measured with tracemalloc on
# CPython 3.11 (64-bit), rounded up: the object, its header tuple, floats and bytes
# objects; per header a 2-tuple, two bytes objects and its slot in the header tuple.
_OBJECT_BYTES = 250
_HEADER_BYTES = 90
_HIT_FIELD = (b"cache-status", HIT)
_HIT_LENGTH = len(b"cache-status") + len(HIT)


class CorruptEntryError(GeminiScaleError):
    """A stored entry cannot be decoded (truncated, another format, or not ours)."""


class StoredResponse:
    """A complete 200 answer, ready to replay (immutable by convention: it is shared)."""

    __slots__ = ("body", "created", "etag", "expires", "hit_headers", "initial_age")

    def __init__(
        self,
        headers: tuple[Header, ...],
        body: bytes,
        etag: bytes,
        created: float,
        expires: float,
        *,
        initial_age: float = 0.0,
    ) -> None:
        self.hit_headers = (*headers, _HIT_FIELD)
        """:attr:`headers` plus ``Cache-Status: gemini-scale; hit``, built once (the one
        tuple an entry holds its headers in)."""
        self.body = body
        """The body exactly as the first client received it (SSE framing included)."""
        self.etag = etag
        """The strong entity tag of :attr:`body`, quoted."""
        self.created = created
        """When it was recorded (wall-clock seconds): its time in the cache counts from here."""
        self.expires = expires
        """When it stops being fresh (wall-clock seconds)."""
        self.initial_age = initial_age
        """How old the answer already was when received (its upstream ``Age``, seconds)."""

    def age(self, now: float) -> float:
        """Its age at ``now`` (RFC 9111 §4.2.3): the age it was received with plus the
        time since its request."""
        return self.initial_age + max(0.0, now - self.created)

    @property
    def headers(self) -> tuple[Header, ...]:
        """Replay headers: the answer's own (sanitised), its ``etag`` and ``content-length``."""
        return self.hit_headers[:-1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredResponse):
            return NotImplemented
        return (
            self.headers, self.body, self.etag, self.created, self.expires, self.initial_age
        ) == (
            other.headers, other.body, other.etag, other.created, other.expires,
            other.initial_age,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StoredResponse(etag={self.etag!r}, bytes={len(self.body)})"

    @classmethod
    def build(
        cls,
        headers: Sequence[Header],
        body: bytes,
        *,
        created: float,
        ttl: float,
        etag: bytes | None = None,
        initial_age: float = 0.0,
    ) -> StoredResponse:
        """An entry from a recorded answer: headers sanitised, ETag (unless given) and
        length computed."""
        etag = etag or etag_of(body)
        kept = (
            *replayable(headers),
            (b"etag", etag),
            (b"content-length", str(len(body)).encode()),
        )
        return cls(kept, body, etag, created, created + ttl, initial_age=initial_age)

    @property
    def size(self) -> int:
        """The length of :meth:`encode`'s bytes, without encoding: what the entry counts
        against a ``MemoryStore``'s ``max_bytes`` when it is held as this object."""
        headers = self.headers
        block = sum(map(len, chain.from_iterable(headers))) + 2 * len(headers) - 1
        head = _HEAD_AGED if self.initial_age else _HEAD
        return head.size + len(self.etag) + max(block, 0) + len(self.body)

    @property
    def held_bytes(self) -> int:
        """About what the entry takes in memory as this object (the objects holding its
        headers included): what it counts against a ``MemoryStore``'s ``max_bytes``."""
        headers = self.hit_headers  # its own headers, and the shared Cache-Status field
        content = sum([len(name) + len(value) for name, value in headers]) - _HIT_LENGTH
        return (
            _OBJECT_BYTES + len(self.etag) + len(self.body) + content
            + _HEADER_BYTES * (len(headers) - 1)
        )

    def encode(self) -> bytes:
        """The entry as one byte string (see the module docstring). ``ValueError`` when a
        header field holds a NUL byte (RFC 9110 §5.5 forbids it; the block could not be
        decoded to the same fields)."""
        headers = self.headers
        block = b"\x00".join(chain.from_iterable(headers))
        if block.count(b"\x00") != max(2 * len(headers) - 1, 0):
            raise ValueError("a header field holds a NUL byte: the entry cannot be stored")
        lengths = (len(self.etag), len(block), len(self.body))
        if self.initial_age:
            head = _HEAD_AGED.pack(
                MAGIC_AGED, self.created, self.expires, self.initial_age, *lengths
            )
        else:
            head = _HEAD.pack(MAGIC, self.created, self.expires, *lengths)
        return b"".join((head, self.etag, block, self.body))

    @classmethod
    def decode(cls, raw: bytes) -> StoredResponse:
        """The entry :meth:`encode` wrote; :class:`CorruptEntryError` for anything else."""
        created, expires, initial_age, start, tag_len, block_len, body_len = _unpack_head(raw)
        body_at = start + tag_len + block_len
        if len(raw) != body_at + body_len:
            raise CorruptEntryError("the entry has another format or was truncated")
        parts = raw[start + tag_len : body_at].split(b"\x00") if block_len else []
        if len(parts) % 2:
            raise CorruptEntryError("the entry's header block is malformed")
        headers = tuple(zip(parts[::2], parts[1::2], strict=True))
        return cls(
            headers, raw[body_at:], raw[start : start + tag_len], created, expires,
            initial_age=initial_age,
        )


def _unpack_head(raw: bytes) -> tuple[float, float, float, int, int, int, int]:
    """An entry's head: created, expires, initial age, where the tag starts and the
    lengths of the tag, the header block and the body."""
    magic = raw[:4]
    try:
        if magic == MAGIC:
            _, created, expires, tag, block, body = _HEAD.unpack_from(raw)
            return created, expires, 0.0, _HEAD.size, tag, block, body
        if magic == MAGIC_AGED:
            _, created, expires, age, tag, block, body = _HEAD_AGED.unpack_from(raw)
            if 0 <= age < math.inf:  # not negative, not NaN, not infinite
                return created, expires, age, _HEAD_AGED.size, tag, block, body
    except struct.error:
        raise CorruptEntryError("the entry is shorter than its header") from None
    raise CorruptEntryError("the entry has another format")
