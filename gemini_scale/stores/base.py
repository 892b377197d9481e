"""The store protocol every backend implements, and server-side scripts.

A store holds short-lived shared state (rate-limit counters, cache entries, locks) under
*relative* keys; the store prepends its namespace ``prefix + ":"``. Values are bytes, TTLs are
float seconds and every key has one, so a store's cardinality stays bounded (DESIGN.md §5).

Atomic read-modify-write logic lives in a :class:`Script`: Lua for Redis, plus a synchronous
Python twin with the same semantics that :class:`~gemini_scale.stores.MemoryStore` runs without
yielding to the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, runtime_checkable

from gemini_scale.errors import ConfigurationError

#: The namespace every store uses unless told otherwise.
DEFAULT_PREFIX = "gemini-scale"

#: What script arguments may be: Redis receives each one as a string.
ScriptArg = str | int | float | bytes


class LocalState(Protocol):
    """The in-process key space a script's Python implementation works on.

    Keys are already prefixed. Values are ``bytes`` (strings and counters) or ``set[str]``
    (sets); expiry times are absolute wall-clock seconds, ``None`` meaning no expiry. Expired
    keys read as absent.
    """

    def get(self, key: str) -> Any | None:
        """The live value of ``key``, or ``None``."""
        ...

    def put(self, key: str, value: Any, expires_at: float | None) -> None:
        """Store ``value`` under ``key``, replacing any previous value and expiry."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether a live key was removed."""
        ...

    def expires_at(self, key: str) -> float | None:
        """When the live ``key`` expires, or ``None`` (absent, or no expiry)."""
        ...

    def set_expiry(self, key: str, expires_at: float | None) -> None:
        """Change the expiry of the live ``key``; no effect when it is absent."""
        ...


LocalScript = Callable[[LocalState, list[str], list[Any], float], Any]
"""``local(state, keys, args, now)``: keys prefixed, args as passed, ``now`` in wall seconds.
It must not change ``keys`` or ``args``: a ``MemoryStore`` passes them without copies (its
remembered prefixed keys, the caller's arguments, which may be a tuple)."""


@dataclass(frozen=True, slots=True)
class Script:
    """An atomic operation with a Lua body for Redis and a Python twin for memory stores.

    The Lua body must take the time from Redis ``TIME`` (never from an argument) so replica
    clock skew does not matter, and must keep all its keys in one hash slot (``{tag}``) to run
    on Redis Cluster. Lua sees every argument as a string (``7`` as ``"7"``, ``1.5`` as
    ``"1.5"``); the Python twin gets the arguments as passed, and :func:`encode_arg` gives the
    string Lua sees. Both must return the same value: results come back, from either backend,
    as ``int``, ``bytes``, ``None`` or lists of those (see :func:`normalize_result`).
    """

    name: str
    """A short identifier, also the Lua file name for :meth:`from_package`."""
    lua: str
    """The Lua source."""
    local: LocalScript
    """The synchronous Python implementation: ``local(state, keys, args, now)``."""
    exact: bool = False
    """The twin already returns what Redis would (an ``int`` or a list of ``int``): memory
    stores skip :func:`normalize_result` (it shows on a rate limiter's hot path)."""

    @classmethod
    def from_package(cls, name: str, local: LocalScript) -> Script:
        """Load ``gemini_scale/stores/lua/<name>.lua`` (package data) as a script."""
        source = resources.files("gemini_scale.stores").joinpath("lua", f"{name}.lua")
        return cls(name=name, lua=source.read_text(encoding="utf-8"), local=local)


@runtime_checkable
class Store(Protocol):
    """A namespaced key-value store with TTLs, counters, sets and atomic scripts.

    Every method raises :class:`~gemini_scale.errors.StoreUnavailableError` when the backend
    cannot be reached and :class:`~gemini_scale.errors.StoreError` for other failures; after
    either, the outcome of a write is unknown (it may have been applied).
    """

    prefix: str

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""
        ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float) -> bool:
        """Store ``value`` only if ``key`` is absent (``SET NX PX``); whether it was stored."""
        ...

    async def delete(self, *keys: str) -> int:
        """Remove ``keys``; how many existed."""
        ...

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """Add ``amount`` to the counter atomically; the TTL is set only when it is created."""
        ...

    async def add_to_set(self, key: str, *members: str, ttl: float) -> None:
        """Add ``members`` to a set; its TTL becomes ``max(remaining TTL, ttl)``."""
        ...

    async def set_members(self, key: str) -> frozenset[str]:
        """The members of a set (empty when absent)."""
        ...

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` atomically on the relative ``keys`` with ``args``."""
        ...

    async def ping(self) -> None:
        """Check the backend; raises ``StoreUnavailableError`` when it is unreachable."""
        ...

    async def aclose(self) -> None:
        """Release what the store owns."""
        ...


def check_prefix(prefix: str) -> str:
    """Validate a namespace prefix: non-empty, and no hash-tag braces."""
    if not prefix:
        raise ConfigurationError("A store prefix must not be empty.")
    if "{" in prefix or "}" in prefix:
        # Redis Cluster hashes the first {...} of a key; tags must come from the relative key.
        raise ConfigurationError(
            f"A store prefix must not contain '{{' or '}}' (got {prefix!r}): hash tags belong "
            "in the relative key, e.g. 'rl:{alice}:minute'."
        )
    return prefix


def ttl_ms(ttl: float) -> int:
    """A TTL in whole milliseconds (at least 1); ``ttl`` must be a finite number > 0."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, not {type(ttl).__name__}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
    return max(1, round(ttl * 1000))


def value_bytes(value: object) -> bytes:
    """A store value as ``bytes``; ``bytearray`` and ``memoryview`` are copied, ``str`` refused."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"store values are bytes, not {type(value).__name__}")


def check_amount(amount: int) -> int:
    """An ``incr`` amount: an ``int`` (``bool`` refused)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"incr amount must be an int, not {type(amount).__name__}")
    return amount


def encode_arg(value: object) -> bytes:
    """A script argument as Redis receives it (redis-py's encoding), for Python twins."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("bool is not a valid script argument; pass 0 or 1")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"invalid script argument type {type(value).__name__}")


_INT_ONLY = {int}


def normalize_result(value: Any) -> Any:
    """Convert a script result the way Redis converts a Lua value.

    Numbers become ``int`` (truncated), strings ``bytes``, ``True`` is 1, ``False`` and
    ``None`` are ``None``. Sequences become lists that end at the first ``None`` (a Lua array
    ends at its first nil) while a ``False`` item becomes a ``None`` item, as in Redis.
    """
    if type(value) is list and {*map(type, value)} == _INT_ONLY:
        return value.copy()  # already what Redis would answer (the common case)
    return _normalize(value)


def _normalize(value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, int | bytes):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for item in value:
            if item is None:
                break
            items.append(_normalize(item))
        return items
    raise TypeError(f"a script cannot return {type(value).__name__}")
