"""Stores: where rate-limit counters, cache entries and locks live, shared or in-process."""

from __future__ import annotations

import typing as _typing

from gemini_scale.stores.base import LocalState, Script, Store
from gemini_scale.stores.factory import store_from_url
from gemini_scale.stores.memory import MemoryStore

if _typing.TYPE_CHECKING:
    from gemini_scale.stores.redis import RedisStore

__all__ = [
    "LocalState",
    "MemoryStore",
    "RedisStore",
    "Script",
    "Store",
    "store_from_url",
]


def __getattr__(name: str) -> _typing.Any:
    # redis-py is imported only by services that use Redis.
    if name == "RedisStore":
        from gemini_scale.stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'gemini_scale.stores' has no attribute {name!r}")
