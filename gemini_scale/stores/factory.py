"""Build a store from a URL: Redis when one is given, memory otherwise."""

from __future__ import annotations

from gemini_scale.stores.base import DEFAULT_PREFIX, Store
from gemini_scale.stores.memory import MemoryStore
from gemini_scale.types import SYSTEM_CLOCK, Clock


def store_from_url(
    url: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    clock: Clock = SYSTEM_CLOCK,
    max_keys: int = 100_000,
    max_bytes: int | None = None,
    socket_timeout: float = 0.25,
    connect_timeout: float = 1.0,
    max_connections: int = 64,
    pool_timeout: float = 1.0,
) -> Store:
    """A :class:`RedisStore` for ``url``, or a :class:`MemoryStore` when it is ``None`` or empty.

    ``clock``, ``max_keys`` and ``max_bytes`` apply to the memory store, the other options
    to Redis (see :meth:`RedisStore.from_url`). redis-py is imported only when a URL is
    given.
    """
    if not url:
        return MemoryStore(prefix=prefix, clock=clock, max_keys=max_keys, max_bytes=max_bytes)
    from gemini_scale.stores.redis import RedisStore

    return RedisStore.from_url(
        url,
        prefix=prefix,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
        pool_timeout=pool_timeout,
    )
