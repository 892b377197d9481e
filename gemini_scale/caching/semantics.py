"""HTTP caching semantics the cache decides on: request and response ``Cache-Control``,
``Vary``, which stored header fields replay, strong ``ETag`` validators and RFC 9211
``Cache-Status`` values.

What is never stored (RFC 9111 §3, research/security.md C04-C07, C12): a status other than
200; ``no-store``, ``private`` or ``no-cache`` in the response's ``Cache-Control``;
``Set-Cookie``; ``Vary: *`` or a ``Vary`` naming a request header outside the allow-list;
``max-age=0`` / ``s-maxage=0``; without either, an ``Expires`` that is past or invalid.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b as _blake2b

from gemini_scale.header_values import bounded_decimal, http_date

Header = tuple[bytes, bytes]

#: The cache's name in ``Cache-Status`` (RFC 9211 §2).
CACHE_NAME = b"gemini-scale"
HIT = CACHE_NAME + b"; hit"
MISS = CACHE_NAME + b"; fwd=miss"
COLLAPSED = CACHE_NAME + b"; fwd=miss; collapsed"
BYPASS = CACHE_NAME + b"; fwd=bypass"
#: Forwarded because the request said so (``Cache-Control: no-cache`` / ``no-store``).
REQUESTED = CACHE_NAME + b"; fwd=request"
#: Not in the cache, and not forwarded either (``only-if-cached``): no ``fwd`` parameter, which
#: says the request went forward (RFC 9211 §2.2); ``detail`` names why (§2.8).
ONLY_IF_CACHED = CACHE_NAME + b"; detail=only-if-cached"
STORED = b"; stored"

#: Hop-by-hop fields (RFC 9110 §7.6.1) and fields that describe one exchange, not the
#: content: never replayed from an entry (RFC 9111 §3.1; research/security.md C20).
#: ``content-length`` and ``etag`` are recomputed from the stored body.
UNSTORED_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
        b"content-length",
        b"etag",
        b"age",
        b"date",
        b"cache-status",
        b"server-timing",
        b"x-request-id",
        b"ratelimit",
        b"ratelimit-policy",
        b"retry-after",
    }
)

_NOT_STORABLE = frozenset({b"no-store", b"private", b"no-cache"})
_NOT_MODIFIED = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary", b"age", b"cache-status"}
)


def _split_list(value: bytes) -> Iterable[bytes]:
    """Members of an RFC 9110 §5.6.1 list, stripped; empty members dropped."""
    for member in value.split(b","):
        stripped = member.strip(b" \t")
        if stripped:
            yield stripped


def parse_cache_control(value: bytes) -> dict[bytes, bytes | None]:
    """``Cache-Control`` directives: lower-case names, unquoted values (RFC 9111 §5.2)."""
    directives: dict[bytes, bytes | None] = {}
    for member in _split_list(value):
        name, eq, argument = member.partition(b"=")
        key = name.strip(b" \t").lower()
        if key not in directives:  # RFC 9111 §4.2.1: the first of duplicates wins
            directives[key] = argument.strip(b" \t").strip(b'"') if eq else None
    return directives


#: RFC 9111 §1.2.2: a delta-seconds greater than this is taken as this.
_MAX_DELTA_SECONDS = 2**31


def _seconds(value: bytes | None) -> int | None:
    """A delta-seconds argument (RFC 9111 §1.2.2), or ``None`` when it is not one."""
    return None if value is None else bounded_decimal(value, _MAX_DELTA_SECONDS)


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """What the client's ``Cache-Control`` asks of the cache (RFC 9111 §5.2.1)."""

    no_cache: bool = False
    """Do not answer from cache; the fresh answer may be stored."""
    no_store: bool = False
    """Do not answer from cache and do not store the answer."""
    only_if_cached: bool = False
    """Answer from cache or with 504."""
    max_age: int | None = None
    """Accept an entry only up to this age (``max-age=0`` is ``no-cache``)."""

    @classmethod
    def parse(cls, value: bytes | None) -> RequestDirectives:
        """Directives from a request ``Cache-Control`` value (``None``: none sent)."""
        if not value:
            return NO_DIRECTIVES
        found = parse_cache_control(value)
        max_age = _seconds(found.get(b"max-age")) if b"max-age" in found else None
        return cls(
            no_cache=b"no-cache" in found or max_age == 0,
            no_store=b"no-store" in found,
            only_if_cached=b"only-if-cached" in found,
            max_age=max_age,
        )


#: A request without ``Cache-Control``: no directives.
NO_DIRECTIVES = RequestDirectives()


def response_facts(
    status: int, headers: Sequence[Header], vary_allowed: Collection[bytes], now: float
) -> tuple[float, bytes, bool, bool, bytes | None, int]:
    """One pass over a response's fields: how long it may be stored (``0``: it must not
    be; else the cap of its own ``s-maxage`` / ``max-age``, or without them of its
    ``Expires``, ``inf`` when it sets none), its ``Content-Type``, whether it has a
    ``Cache-Control`` and whether an ``ETag``, its (first) ``Content-Length``, and its age
    when received (its ``Age``, else ``0``). ``now``: when it was received."""
    cap = math.inf if status == 200 else 0.0
    content_type = b""
    control = tagged = False
    length = None
    age: int | None = None
    expires: bytes | None = None
    date: bytes | None = None
    for name, value in headers:
        if name == b"age":
            age = _age(value) if age is None else age
        elif name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value if length is None else length
        elif name == b"etag":
            tagged = True
        elif name == b"set-cookie":
            cap = 0.0
        elif name == b"vary":
            cap = cap if _vary_storable(value, vary_allowed) else 0.0
        elif name == b"cache-control":
            control = True
            cap = min(cap, _control_cap(value))
        elif name == b"expires":  # fields that disagree are invalid: already expired
            expires = value if expires is None or expires == value else b"0"
        elif name == b"date":
            date = value if date is None else date
    age = age or 0
    return _lifetime(cap, expires, date, age, now), content_type, control, tagged, length, age


def _vary_storable(value: bytes, vary_allowed: Collection[bytes]) -> bool:
    """Whether a ``Vary`` names only allowed request headers (and not ``*``)."""
    return all(
        member != b"*" and member.lower() in vary_allowed for member in _split_list(value)
    )


def _lifetime(
    cap: float, expires: bytes | None, date: bytes | None, age: int, now: float
) -> float:
    """``cap``, or without an ``s-maxage`` / ``max-age`` the ``Expires`` one (RFC 9111
    §5.3), less the age the answer already had (§4.2.3)."""
    if expires is not None and cap == math.inf:
        cap = _expires_cap(expires, date, now)
    if age and cap != math.inf:
        cap = max(cap - age, 0.0)
    return cap


def _expires_cap(expires: bytes, date: bytes | None, now: float) -> float:
    """The lifetime an ``Expires`` field gives (RFC 9111 §4.2.1): from the ``Date`` (else
    ``now``) to it; ``0`` when it is past or invalid (``0`` included: already expired)."""
    until = http_date(expires)
    if until is None:
        return 0.0
    since = None if date is None else http_date(date)
    return max(until - (now if since is None else since), 0.0)


def _age(value: bytes) -> int:
    """An ``Age`` field's seconds (RFC 9111 §5.1: the first member of a list; an invalid
    value is ignored, ``0``)."""
    return _seconds(value.partition(b",")[0].strip(b" \t")) or 0


def _control_cap(value: bytes) -> float:
    """The longest a response's ``Cache-Control`` lets a shared cache keep it (``0``: not
    at all; ``inf``: it says nothing about it)."""
    directives = parse_cache_control(value)
    if not _NOT_STORABLE.isdisjoint(directives):
        return 0.0
    for directive in (b"s-maxage", b"max-age"):
        seconds = _seconds(directives.get(directive))
        if seconds is not None:
            return seconds
    return math.inf


def private_headers(headers: Sequence[Header], value: bytes = b"private") -> list[Header]:
    """``headers`` marked for private caches only (research/security.md C23): the
    ``Cache-Control`` becomes ``value`` unless it already says ``no-store``."""
    kept: list[Header] = []
    for name, field in headers:
        if name == b"cache-control":
            if b"no-store" in parse_cache_control(field):
                return list(headers)
            continue
        kept.append((name, field))
    kept.append((b"cache-control", value))
    return kept


def replayable(headers: Sequence[Header]) -> list[Header]:
    """The fields of a response that a hit replays: without hop-by-hop fields, the fields
    its ``Connection`` names, and per-exchange fields (see :data:`UNSTORED_HEADERS`)."""
    kept = [(name, value) for name, value in headers if name not in UNSTORED_HEADERS]
    named = [value for name, value in headers if name == b"connection"]
    if named:
        listed = {member.lower() for value in named for member in _split_list(value)}
        kept = [(name, value) for name, value in kept if name not in listed]
    return kept


def not_modified_headers(headers: Iterable[Header]) -> list[Header]:
    """The fields a 304 carries (RFC 9110 §15.4.5): validators and caching fields (and
    the cache's own ``Age`` and ``Cache-Status``)."""
    return [(name, value) for name, value in headers if name in _NOT_MODIFIED]


def etag_of(body: bytes) -> bytes:
    """A strong entity tag from the content (BLAKE2b, 128 bits): the same bytes give the same
    tag in every process (never Python's salted ``hash``)."""
    return b'"' + _blake2b(body, digest_size=16).hexdigest().encode() + b'"'


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Whether an ``If-None-Match`` value matches ``etag`` (RFC 9110 §13.1.2: ``*``, or
    weak comparison with any listed tag)."""
    etag = etag.removeprefix(b"W/")  # an app's own weak tag may be kept
    for member in _split_list(if_none_match):
        if member == b"*" or member.removeprefix(b"W/") == etag:
            return True
    return False
