"""Canonical cache keys: who an entry belongs to, the request's canonical parts, and tags.

A key is a SHA-256 digest over length-framed parts (so no part can forge another's
boundary), stable across processes and restarts:

1. a schema version;
2. the owner: the verified principal (issuer, tenant, subject) by default, the tenant, or
   ``*`` for shared entries; a request without a principal has no owner under a
   non-shared policy and is never cached (research/security.md C01-C03);
3. the method (``HEAD`` looks up the ``GET`` entry), and the path the router matched
   (after the version layer rewrote it to the head version: DESIGN.md §3);
4. the query parameters that matter, sorted (see :func:`canonical_query`);
5. a digest of the canonical JSON body (see :func:`canonical_json`); a body that repeats
   a member name is not keyed (see :func:`_repeats_member`);
6. the authority (the ``Host`` header as received, in lower case; none: empty), so
   virtual hosts never share entries (RFC 9111 §2), and the values of the allow-listed
   ``Vary`` request headers;
7. the request's tags (``*``, the owner, the model, the policy's tags) and the current
   generation of each (appended by the engine): bumping a tag's generation makes every key
   that included it unreachable (O(1) invalidation).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from gemini_scale import fastjson
from gemini_scale.caching.request import is_deterministic
from gemini_scale.gemini_json import OPAQUE_MEMBERS, camel_name
from gemini_scale.memo import remember
from gemini_scale.policies import CacheScope
from gemini_scale.principal import Principal

KEY_SCHEMA: Final = b"gemini-scale:cache:v3"

#: Query parameters that are part of the key by default: those the Gemini surface reads
#: (``alt`` switches SSE and JSON; paging). A request with any other parameter, apart
#: from the ignored ones, is not cached: busters cannot grow the key space (C11).
DEFAULT_QUERY_PARAMS: Final = frozenset({"alt", "pageSize", "pageToken"})
#: Query parameters never keyed, stored or shown: ``key`` is a credential (C11).
IGNORED_QUERY_PARAMS: Final = frozenset({"key"})
_IGNORED: Final = frozenset(name.encode() for name in IGNORED_QUERY_PARAMS)

_INT_LIMIT: Final = 2**53
_MEMO_SIZE: Final = 4096


class _AmbiguousError(Exception):
    """Both spellings of one member are present: the body is keyed as written."""


_LENGTHS: dict[int, struct.Struct] = {}


def frame(parts: Sequence[bytes]) -> bytes:
    """The parts' lengths, then the parts: no part can spill into the next."""
    count = len(parts)
    lengths = _LENGTHS.get(count)
    if lengths is None:
        lengths = _LENGTHS.setdefault(count, struct.Struct(f"!{count}I"))
    return lengths.pack(*map(len, parts)) + b"".join(parts)


def text(value: str) -> bytes:
    """A string's bytes for a key (lone surrogates from JSON or paths survive)."""
    return value.encode("utf-8", "surrogatepass")


# -- owners and tags ----------------------------------------------------------------------


_JSON: Final = json.JSONEncoder(separators=(",", ":"))
_SORTED_JSON: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _encode(*values: str | None) -> str:
    return _JSON.encode(values)


def principal_tag(principal: Principal) -> str:
    """The tag of every entry owned by ``principal`` (issuer, tenant and subject)."""
    return "principal:" + _encode(principal.issuer, principal.tenant or None, principal.subject)


def tenant_tag(issuer: str, tenant: str) -> str:
    """The tag of every entry owned by ``tenant`` as ``issuer`` asserts it (policies with
    ``scope="tenant"``): two issuers' tenants of one name are two owners, as their subjects
    are (one issuer cannot speak for another's tenant)."""
    return "tenant:" + _encode(issuer, tenant)


def model_tag(model: str) -> str:
    """The tag of every entry of a route whose ``{model}`` parameter is ``model``."""
    return "model:" + model.removeprefix("models/").lower()


#: The tag every entry carries: invalidating it empties the whole cache.
ALL_TAG: Final = "*"


def owner_tag(scope: CacheScope, principal: Principal | None) -> str | None:
    """Who an entry belongs to, as a tag; ``None``: nobody may own it (do not cache).

    ``shared`` entries belong to everyone (``*``); ``tenant`` entries to the principal's
    tenant under its issuer, or to the principal alone when it has none (never one entry for
    every tenant-less caller); ``principal`` entries to the verified principal.
    """
    if scope == "shared":
        return ALL_TAG
    if principal is None:
        return None
    if scope == "tenant" and principal.tenant:
        return tenant_tag(principal.issuer, principal.tenant)
    return principal_tag(principal)


# -- query --------------------------------------------------------------------------------


def _name(part: bytes) -> bytes:
    return part.partition(b"=")[0]


def canonical_query(query_string: bytes, allowed: Collection[bytes] | None) -> bytes | None:
    """The keyed query: its parameters ordered by name (the order of one name's values is
    kept: it is meaningful), ``key`` dropped. ``None`` when a parameter outside
    ``allowed`` (names as the app decodes them, Latin-1 bytes) is present: the request is
    not cached. ``allowed=None`` keys every parameter. Values stay as sent: two spellings
    of one value are two keys, never one key for two values."""
    if not query_string:
        return b""
    kept: list[bytes] = []
    for part in query_string.split(b"&"):
        if not part:
            continue  # parse_qsl skips empty members too
        name = _name(part)
        if name.find(b"%") >= 0 or name.find(b"+") >= 0:
            return _decoded_query(query_string, allowed)
        if name in _IGNORED:
            continue
        if allowed is not None and name not in allowed:
            return None
        kept.append(part)
    if len(kept) > 1:
        kept.sort(key=_name)
    return b"&".join(kept)


def _decoded_query(query_string: bytes, allowed: Collection[bytes] | None) -> bytes | None:
    """:func:`canonical_query` for escaped names: decoded as Starlette does (``parse_qsl``)."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    kept = []
    for name, value in pairs:
        raw = name.encode("utf-8", "surrogatepass")
        if name in IGNORED_QUERY_PARAMS:
            continue
        if allowed is not None and name.encode("latin-1", "replace") not in allowed:
            return None
        kept.append((raw, value))
    kept.sort(key=lambda pair: pair[0])
    return b"\x00" + urlencode(kept).encode("ascii")  # its own domain: never a raw query


# -- body ---------------------------------------------------------------------------------

def _canonical(value: Any, opaque: bool) -> Any:
    kind = type(value)
    if kind is dict:
        out: dict[str, Any] = {}
        for name, item in value.items():
            key = name if opaque else camel_name(name)
            if key in out:
                raise _AmbiguousError
            out[key] = _canonical(item, opaque or key in OPAQUE_MEMBERS)
        return out
    if kind is list:
        return [_canonical(item, opaque) for item in value]
    if kind is float and value.is_integer() and abs(value) < _INT_LIMIT:
        return int(value)  # proto3 JSON reads 20 and 20.0 alike (gemini-api.md §1.9)
    return value


def canonical_json(body: Any) -> bytes:
    """A JSON body in canonical form: members sorted, compact, ASCII; snake_case proto field
    names spelled camelCase (proto3 JSON accepts both, DESIGN.md §4; other names with ``_``
    are kept: see :func:`~gemini_scale.gemini_json.camel_name`) except below
    :data:`OPAQUE_MEMBERS`; integral numbers as integers. A body that spells one member
    both ways is kept as written, under another domain, so it cannot collide."""
    domain = b"c"
    try:
        value = _canonical(body, False)
    except _AmbiguousError:
        domain, value = b"r", _canonical(body, True)
    return domain + _SORTED_JSON.encode(value).encode()


def _pairs_unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook``: the object, unless it repeats a member name."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("a repeated member name")
    return value


def _repeats_member(raw: bytes, canonical: bytes) -> bool:
    """Whether the JSON text ``raw`` repeats a member name in some object. ``canonical``:
    :func:`canonical_json` of its value (which keeps one of each name).

    Parsers disagree on such a body (Python keeps the last, protobuf refuses it), so the
    upstream may read another request than the key holds. Unless ``raw`` may escape a
    colon (``\\u003a``) or is UTF-16/32 (has a NUL byte), each of its ``:`` bytes is a
    member or a colon in a string, and ``canonical`` has the same colons in strings and one
    per member kept: equal counts rule repeats out without a second parse."""
    if raw.find(b"\x00") < 0 and raw.find(b"\\u003a") < 0 and raw.find(b"\\u003A") < 0:
        return raw.count(b":") != canonical.count(b":")
    try:
        json.loads(raw, object_pairs_hook=_pairs_unique)
    except ValueError:
        return True
    return False


#: A JSON body's canonical digest and whether it asks for a deterministic generation.
BodyFacts = tuple[bytes, bool]
_EMPTY_BODY: Final[BodyFacts] = (b"", False)
#: ``parsed`` of :meth:`BodyDigests.facts` when the caller has not parsed the body.
UNPARSED: Final[Any] = object()


#: Bodies up to this size are remembered by their bytes (a dict lookup costs less than a
#: SHA-256 and its digest object); longer ones by their SHA-256 (the memo holds at most
#: ``size`` of each, so at most ``size`` times this many bytes of raw bodies).
_RAW_MEMO_BYTES: Final = 1024
_DIGEST_BYTES: Final = 32


class BodyDigests:
    """Canonical body digests, remembered by the raw body (a pure function of the bytes):
    small bodies by their bytes, larger ones by their SHA-256, so a repeated body costs a
    lookup (and one hash when large) instead of a parse and a canonical re-encoding."""

    __slots__ = ("_memo", "_size")

    def __init__(self, size: int = _MEMO_SIZE) -> None:
        self._memo: dict[bytes, BodyFacts] = {}
        self._size = size

    def facts(self, raw: bytes, parsed: Any = UNPARSED) -> BodyFacts | None:
        """The canonical digest of the JSON body ``raw`` and whether it is deterministic
        (:func:`~gemini_scale.caching.request.is_deterministic`). ``parsed``: the JSON of
        ``raw`` if the caller has it; else ``raw`` is parsed here, and ``None`` is returned
        when it is not a JSON object. ``None`` too when it is nested too deep, or repeats a
        member name in an object (:func:`_repeats_member`)."""
        if not raw:
            return _EMPTY_BODY
        # A 32-byte body goes by its digest too: no body can be taken for another's digest.
        size = len(raw)
        memo_key = (
            raw if size <= _RAW_MEMO_BYTES and size != _DIGEST_BYTES and type(raw) is bytes
            else hashlib.sha256(raw).digest()
        )
        found = self._memo.get(memo_key)
        if found is None:
            found = _body_facts(raw, parsed)
            if found is None:
                return None
            remember(self._memo, memo_key, found, self._size)
        return found

    def digest(self, raw: bytes, parsed: Any) -> bytes | None:
        """The digest of ``parsed`` (the JSON of ``raw``); ``None`` if it is too deep."""
        found = self.facts(raw, parsed)
        return None if found is None else found[0]


def _body_facts(raw: bytes, parsed: Any) -> BodyFacts | None:
    """:meth:`BodyDigests.facts` of a body not yet remembered."""
    try:
        if parsed is UNPARSED:
            parsed = fastjson.loads(raw)
            if type(parsed) is not dict:
                return None
        canonical = canonical_json(parsed)
        if _repeats_member(raw, canonical):
            return None
        return hashlib.sha256(canonical).digest(), is_deterministic(parsed)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or too deep
        return None


def entry_key(material: bytes) -> str:
    """An entry key: 128 bits of the SHA-256 of ``material`` (framed parts, then ``\\x00``
    and the tags' generations), in hex."""
    return hashlib.sha256(material).hexdigest()[:32]
