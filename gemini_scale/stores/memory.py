"""An in-process store: one dict, lazy expiry, bounded size."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from mypy_extensions import mypyc_attr

from gemini_scale.errors import ConfigurationError, StoreError
from gemini_scale.memo import remember
from gemini_scale.stores.base import (
    DEFAULT_PREFIX,
    Script,
    ScriptArg,
    check_prefix,
    normalize_result,
    ttl_ms,
    value_bytes,
)
from gemini_scale.stores.scripted import ScriptedOperations
from gemini_scale.types import SYSTEM_CLOCK, Clock

_Entry = tuple[Any, float | None, int]  # value, expiry, approximate size

_FULL_KEYS_CACHE_SIZE = 10_000
_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class MemoryState:
    """The :class:`~gemini_scale.stores.base.LocalState` view scripts run against."""

    __slots__ = ("_touch", "bytes", "data", "earliest", "now", "writes")

    def __init__(self) -> None:
        # Insertion order is recency order: every read or write of a key moves it to the end,
        # so the first key is the least recently used one. An OrderedDict finds its first
        # key in O(1); a plain dict would scan the slots its evictions left at the front
        # (tens of microseconds per write once ``max_keys`` is reached).
        self.data: OrderedDict[str, _Entry] = OrderedDict()
        # Bound once (compiled, looking the method up per read costs a third of the call).
        self._touch: Callable[[str], None] = self.data.move_to_end
        self.now = 0.0
        self.writes = 0
        self.bytes = 0
        """The approximate size of what is held (keys, values and a per-entry overhead)."""
        self.earliest = math.inf
        """No held key expires before this (a lower bound: a sweep before it finds nothing)."""

    def _live(self, key: str) -> _Entry | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        expires_at = entry[1]
        if expires_at is not None and expires_at <= self.now:
            self.remove(key)
            return None
        return entry

    def get(self, key: str) -> Any | None:
        data = self.data
        entry = data.get(key)
        if entry is None:
            return None
        expires_at = entry[1]
        if expires_at is not None and expires_at <= self.now:
            del data[key]
            self.bytes -= entry[2]
            return None
        self._touch(key)  # now the most recently used
        return entry[0]

    def put(
        self, key: str, value: Any, expires_at: float | None, size: int | None = None
    ) -> None:
        data = self.data
        old = data.get(key)
        size = len(key) + (_size_of(value) if size is None else size + _ENTRY_OVERHEAD)
        data[key] = (value, expires_at, size)
        if expires_at is not None and expires_at < self.earliest:
            self.earliest = expires_at
        if old is not None:
            data.move_to_end(key)
            size -= old[2]
        self.bytes += size
        self.writes += 1

    def remove(self, key: str) -> None:
        """Drop ``key`` (present) and its share of :attr:`bytes`."""
        self.bytes -= self.data.pop(key)[2]

    def delete(self, key: str) -> bool:
        existed = self._live(key) is not None
        if existed:
            self.remove(key)
        return existed

    def expires_at(self, key: str) -> float | None:
        entry = self._live(key)
        return None if entry is None else entry[1]

    def set_expiry(self, key: str, expires_at: float | None) -> None:
        entry = self._live(key)
        if entry is not None:
            self.data[key] = (entry[0], expires_at, entry[2])
            self.writes += 1
            if expires_at is not None and expires_at < self.earliest:
                self.earliest = expires_at


#: What one entry costs beyond its key and value (the dict slot, the entry tuple, the float).
_ENTRY_OVERHEAD = 120


def _size_of(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value) + _ENTRY_OVERHEAD
    if isinstance(value, set | frozenset):
        return sum(len(member) + 60 for member in value) + _ENTRY_OVERHEAD + 200
    return _ENTRY_OVERHEAD + 64  # small fixed-size values: counters, rate-limit windows


@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryStore(ScriptedOperations):
    """A :class:`~gemini_scale.stores.Store` in one process's memory.

    Behaves like :class:`~gemini_scale.stores.RedisStore` for one process: same keys, TTLs,
    errors and script results. No method awaits anything, so each one is atomic with respect
    to other coroutines.

    Expired keys read as absent and are removed on access, and by a sweep of the whole dict
    every ``max(1024, max_keys // 8)`` writes. Past ``max_keys`` keys, or past ``max_bytes``,
    a write first sweeps expired keys (at most once every ``max_keys // 16`` writes, to keep
    writes cheap), then evicts the least recently used keys (reads and writes both count as
    use) until both bounds hold.

    :param prefix: namespace prepended to every key as ``prefix + ":"``.
    :param clock: wall-clock source for expiry and for scripts' ``now``; tests inject a fake.
    :param max_keys: bound on the number of keys held.
    :param max_bytes: bound on the approximate bytes held (keys, values and about 120 bytes
        of bookkeeping per key; ``None``: only ``max_keys``). A response cache wants it.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Clock = SYSTEM_CLOCK,
        max_keys: int = 100_000,
        max_bytes: int | None = None,
    ) -> None:
        if max_keys < 1:
            raise ConfigurationError(f"max_keys must be at least 1, got {max_keys}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 1):
            raise ConfigurationError(f"max_bytes must be at least 1, got {max_bytes}")
        self.prefix = check_prefix(prefix)
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._clock = clock
        # The system clock read directly: a call through the Clock object costs more than
        # reading the time (every rate-limited request reads it twice).
        self._system_time = clock is SYSTEM_CLOCK
        self._head = prefix + ":"
        self._state = MemoryState()
        self._sweep_every = max(1024, max_keys // 8)
        self._min_sweep_gap = max(1, max_keys // 16)
        self._writes_at_sweep = 0
        self._full_keys: dict[tuple[str, ...], list[str]] = {}

    def __len__(self) -> int:
        """Keys held, including expired ones not yet removed."""
        return len(self._state.data)

    @property
    def size(self) -> int:
        """Approximate bytes held (what ``max_bytes`` bounds)."""
        return self._state.bytes

    def __bool__(self) -> bool:
        # An empty store is still a store: keep `store or default` from replacing it.
        return True

    def __repr__(self) -> str:
        return (
            f"MemoryStore(prefix={self.prefix!r}, max_keys={self.max_keys}, "
            f"max_bytes={self.max_bytes})"
        )

    def _begin(self) -> MemoryState:
        state = self._state
        # (time.time looked up per call, not bound once: a test's clock patch, freezegun's
        # say, reaches it, compiled or not)
        state.now = time.time() if self._system_time else self._clock.time()
        return state

    def _end(self, state: MemoryState) -> None:
        since_sweep = state.writes - self._writes_at_sweep
        max_bytes = self.max_bytes
        over = len(state.data) > self.max_keys or (
            max_bytes is not None and state.bytes > max_bytes
        )
        if not over and since_sweep < self._sweep_every:
            return  # the usual case: within bounds, no sweep due
        if since_sweep >= self._sweep_every or (over and since_sweep >= self._min_sweep_gap):
            self._sweep(state)
        data = state.data
        while len(data) > self.max_keys:
            state.bytes -= data.popitem(last=False)[1][2]  # the least recently used
        if max_bytes is not None:
            while state.bytes > max_bytes and data:
                state.bytes -= data.popitem(last=False)[1][2]

    def _sweep(self, state: MemoryState) -> None:
        now = state.now
        self._writes_at_sweep = state.writes
        if now < state.earliest:
            return  # nothing held can have expired: no need to read every key
        expired = []
        earliest = math.inf
        for key, (_, expires_at, _) in state.data.items():
            if expires_at is not None:
                if expires_at <= now:
                    expired.append(key)
                elif expires_at < earliest:
                    earliest = expires_at
        for key in expired:
            state.remove(key)
        state.earliest = earliest

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` when absent or expired."""
        return self.get_now(key)

    def get_now(self, key: str) -> bytes | None:
        """:meth:`get`, synchronously (nothing here ever awaits)."""
        value = self._begin().get(self._head + key)
        if value is None or isinstance(value, bytes):
            return value
        raise StoreError(_WRONGTYPE)

    async def set(
        self, key: str, value: bytes | bytearray | memoryview, *, ttl: float
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""
        data, ms = value_bytes(value), ttl_ms(ttl)
        state = self._begin()
        state.put(self._head + key, data, state.now + ms / 1000)
        self._end(state)

    def get_object(self, key: str) -> object | None:
        """The value of ``key`` whatever its type (an object :meth:`set_object` put there,
        or bytes), or ``None`` when absent or expired. Counts as a use for LRU eviction."""
        return self._begin().get(self._head + key)

    def set_object(self, key: str, value: object, *, ttl: float, size: int) -> None:
        """Hold an in-process object under ``key`` for ``ttl`` seconds (> 0), counted as
        ``size`` bytes against ``max_bytes``: for callers in this process that would
        otherwise encode it to bytes and decode it again (the response cache). Read it with
        :meth:`get_object`; :meth:`get` refuses it (``WRONGTYPE``), as Redis would refuse a
        value of another kind."""
        state = self._begin()
        state.put(self._head + key, value, state.now + ttl, size)
        self._end(state)

    async def set_if_absent(
        self, key: str, value: bytes | bytearray | memoryview, *, ttl: float
    ) -> bool:
        """Store ``value`` only if ``key`` is absent; whether it was stored."""
        data, ms = value_bytes(value), ttl_ms(ttl)
        state = self._begin()
        full = self._head + key
        if state.get(full) is not None:
            return False
        state.put(full, data, state.now + ms / 1000)
        self._end(state)
        return True

    async def delete(self, *keys: str) -> int:
        """Remove ``keys``; how many existed."""
        state = self._begin()
        return sum(state.delete(self._head + key) for key in keys)

    async def set_members(self, key: str) -> frozenset[str]:
        """The members of a set (empty when absent)."""
        value = self._begin().get(self._head + key)
        if value is None:
            return frozenset()
        if isinstance(value, set):
            return frozenset(value)
        raise StoreError(_WRONGTYPE)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script.local`` on the prefixed ``keys``, without yielding."""
        return self.run_now(script, keys, args)

    def run_now(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """:meth:`run`, synchronously (nothing here ever awaits)."""
        state = self._begin()
        now = state.now
        full = self._full_keys.get(keys) if type(keys) is tuple else None
        if full is None:
            head = self._head
            full = [head + key for key in keys]
            if type(keys) is tuple:  # a caller's constant tuple: remember its prefixed form
                remember(self._full_keys, keys, full, _FULL_KEYS_CACHE_SIZE)
        if type(args) is not list:  # the twins read lists (compiled, a tuple is refused)
            args = list(args)
        try:
            # Twins only read their keys and args (no copies: this is every limited request).
            result = script.local(state, full, args, now)
        finally:
            self._end(state)
        return result if script.exact else normalize_result(result)

    async def ping(self) -> None:
        """Always reachable."""

    async def aclose(self) -> None:
        """Nothing to release; the data stays until the store is dropped."""

