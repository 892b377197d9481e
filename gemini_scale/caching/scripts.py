"""The cache's atomic store operations: Lua for Redis, and their Python twins for memory.

Each script's keys are one entry and its lock, which share the entry's hash tag, so they run
on Redis Cluster too.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from gemini_scale.stores.base import LocalState, Script, encode_arg

#: :data:`POLL` answers: the entry is there / the leader still holds its lock / neither.
FOUND, WAITING, GONE = 1, 0, 2
#: :data:`LOCK` answers: the entry is there (``FOUND``) / the lock is ours / it is taken.
LOCKED, TAKEN = 0, 2


def _load(name: str) -> str:
    return (
        resources.files("gemini_scale.caching")
        .joinpath("lua", f"{name}.lua")
        .read_text(encoding="utf-8")
    )


def _entry(state: LocalState, key: str) -> bytes | None:
    """The entry ``key`` as Redis would return it: bytes (an engine without a distributed
    lock holds entries in a ``MemoryStore`` as objects)."""
    entry = state.get(key)
    return entry if entry is None or type(entry) is bytes else entry.encode()


def _poll(state: LocalState, keys: list[str], args: list[Any], now: float) -> list[Any]:
    entry = _entry(state, keys[0])
    if entry is not None:
        return [FOUND, entry]
    if state.get(keys[1]) is not None:
        return [WAITING]
    return [GONE]


def _lock(state: LocalState, keys: list[str], args: list[Any], now: float) -> list[Any]:
    entry = _entry(state, keys[0])
    if entry is not None:
        return [FOUND, entry]
    if state.get(keys[1]) is not None:
        return [TAKEN]
    state.put(keys[1], encode_arg(args[0]), now + int(args[1]) / 1000)
    return [LOCKED]


def _store(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    state.put(keys[0], encode_arg(args[0]), now + int(args[1]) / 1000)
    if state.get(keys[1]) == encode_arg(args[2]):
        state.delete(keys[1])
    return 1


POLL = Script(name="cache_poll", lua=_load("cache_poll"), local=_poll)
"""``KEYS[1]`` entry, ``KEYS[2]`` lock: ``[FOUND, entry]``, ``[WAITING]`` or ``[GONE]``."""

LOCK = Script(name="cache_lock", lua=_load("cache_lock"), local=_lock)
"""``KEYS[1]`` entry, ``KEYS[2]`` lock, ``ARGV`` token and lock TTL (ms): ``[FOUND,
entry]``, ``[LOCKED]`` (the caller leads) or ``[TAKEN]``."""

STORE = Script(name="cache_store", lua=_load("cache_store"), local=_store)
"""``KEYS[1]`` entry, ``KEYS[2]`` lock, ``ARGV`` entry, TTL (ms) and token: store the entry
and release the lock if it is still the caller's."""
