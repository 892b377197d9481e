"""Built-in scripts: each a Lua file in ``lua/`` plus its Python twin for memory stores."""

from __future__ import annotations

from typing import Any

from gemini_scale.errors import StoreError
from gemini_scale.stores.base import LocalState, Script, encode_arg


def counter_value(value: Any) -> int:
    """A stored counter as an ``int``; raises :class:`StoreError` like Redis ``INCR`` would."""
    if isinstance(value, bytes):
        try:
            return int(value)
        except ValueError:
            pass
        raise StoreError("value is not an integer or out of range")
    raise StoreError("WRONGTYPE Operation against a key holding the wrong kind of value")


def _compare_and_delete(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    if state.get(keys[0]) == encode_arg(args[0]):
        return int(state.delete(keys[0]))
    return 0


def _incr_with_ttl(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    key = keys[0]
    current = state.get(key)
    value = (0 if current is None else counter_value(current)) + int(args[0])
    expires_at = state.expires_at(key) if current is not None else None
    if expires_at is None:
        expires_at = now + int(args[1]) / 1000
    state.put(key, str(value).encode(), expires_at)
    return value


def _add_to_set(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    key = keys[0]
    current = state.get(key)
    if current is not None and not isinstance(current, set):
        raise StoreError("WRONGTYPE Operation against a key holding the wrong kind of value")
    members: set[str] = set() if current is None else current
    members.update(encode_arg(member).decode() for member in args[1:])
    wanted = now + int(args[0]) / 1000
    expires_at = state.expires_at(key) if current is not None else None
    state.put(key, members, wanted if expires_at is None else max(expires_at, wanted))
    return 0


def _server_time(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    return int(now * 1_000_000)


COMPARE_AND_DELETE = Script.from_package("compare_and_delete", _compare_and_delete)
"""``KEYS[1]``, ``ARGV[1]``: delete the key only if its value equals ``ARGV[1]``; 1 or 0.

Releases a lock only for the holder that took it (single flight)."""

INCR_WITH_TTL = Script.from_package("incr_with_ttl", _incr_with_ttl)
"""``KEYS[1]``, ``ARGV[1]`` amount, ``ARGV[2]`` TTL in ms: the new counter value.

The TTL is set only when the key has none, i.e. when this call created it."""

ADD_TO_SET = Script.from_package("add_to_set", _add_to_set)
"""``KEYS[1]``, ``ARGV[1]`` TTL in ms, ``ARGV[2:]`` members: add them and make the TTL
``max(remaining, ARGV[1])``; returns 0."""

SERVER_TIME = Script.from_package("server_time", _server_time)
"""No keys or arguments: the store's current time in integer microseconds (Redis ``TIME``)."""
