"""A bounded LRU of verified access tokens, so a token seen before costs a hash and a lookup.

Entries are keyed by the SHA-256 of the whole token (the token itself is never kept) and hold
the verified :class:`~gemini_scale.principal.Principal` with the instant it stops being valid.
Only tokens that passed every check are stored; the validator re-checks time on every hit
(security.md A34) and drops entries whose signing key set changed since.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

from gemini_scale.errors import ConfigurationError
from gemini_scale.principal import Principal

if TYPE_CHECKING:
    from gemini_scale.auth.jwks import JWKSCache

__all__ = [
    "BoundedLRU",
    "CachedToken",
    "TokenCache",
    "token_digest",
    "token_digest_of_bytes",
]

K = TypeVar("K")
V = TypeVar("V")


def token_digest(token: str) -> bytes:
    """The cache key of ``token``: its SHA-256 digest."""
    return hashlib.sha256(token.encode()).digest()


def token_digest_of_bytes(token: bytes) -> bytes:
    """:func:`token_digest` of a token already encoded (``token_digest(t) ==
    token_digest_of_bytes(t.encode())``)."""
    return hashlib.sha256(token).digest()


class CachedToken(NamedTuple):
    """One verified token (a tuple: the hit path reads it, so it must be cheap to build)."""

    principal: Principal
    """What :meth:`JWTValidator.verify` returned for it."""
    valid_until: float
    """Wall-clock second from which the token is refused (``exp`` or max age, plus leeway)."""
    issuer: str
    """The issuer whose configuration accepted it."""
    keys: JWKSCache
    """That issuer's key cache."""
    key_generation: int
    """``keys.generation`` at verification; once the key set changes the token is verified
    again, so a key the IdP withdrew stops working for cached tokens too."""


class BoundedLRU(Generic[K, V]):
    """A least-recently-used map holding at most ``maxsize`` entries (``0``: holds nothing).

    Not thread-safe: one instance belongs to one event loop. Shared by the verified-token
    cache and the introspection caches.
    """

    __slots__ = ("_entries", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ConfigurationError("cache_size must be >= 0")
        self.maxsize = maxsize
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The entry for ``key`` (now the most recently used), or ``None``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: K, entry: V) -> None:
        """Store ``entry``, evicting the least recently used one when full."""
        if self.maxsize == 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        """Forget ``key`` if present."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()


TokenCache = BoundedLRU[bytes, CachedToken]
"""The verified-token cache: ``token_digest -> CachedToken``."""
