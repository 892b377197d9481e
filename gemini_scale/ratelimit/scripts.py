"""The limiter's two atomic operations: Lua for Redis, and their Python twins for memory."""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from gemini_scale.stores.base import Script
from gemini_scale.stores.memory import MemoryState

# A window's state in memory: [window index, count in that window, count in the one before].
# A list, changed in place while its window lasts: a steady caller's charge writes nothing
# else (its expiry, the end of the window after it, only moves when a new window starts).
_Window = list[int]


def _load(name: str) -> str:
    return (
        resources.files("gemini_scale.ratelimit")
        .joinpath("lua", f"{name}.lua")
        .read_text(encoding="utf-8")
    )


# Concrete types (a memory store's state, lists of ints: what RateLimiter and MemoryStore
# pass): compiled with mypyc, the calls, the indexing and the arithmetic below are direct.
def _acquire(state: MemoryState, keys: list[str], args: list[int], now: float) -> list[int]:
    n = len(args) - 2 * len(keys)  # limit keys; the rest are settlements (rl_refunds.lua)
    if n < len(keys):
        _apply_settlements(state, keys, args, n)
    now_ms = math.floor(now * 1000)
    out = [1, now_ms]
    found: list[_Window | None] = []
    j = 0
    for i in range(n):
        limit, window, cost = args[j], args[j + 1], args[j + 2]
        j += 3
        index = now_ms // window
        stored = _window(state, keys[i])
        cur = prev = 0
        if stored is not None:
            if stored[0] == index:
                cur, prev = stored[1], stored[2]
            elif stored[0] == index - 1:
                prev = stored[1]
            else:
                stored = None
        found.append(stored)
        weight = (window - (now_ms - index * window)) / window  # as the Lua rounds it
        if prev * weight + cur + cost > limit:
            out[0] = 0
        out.append(index)  # (appended one by one: compiled, no tuple per limit)
        out.append(cur)
        out.append(prev)
    if out[0]:
        _charge(state, keys, args, out, found)
    return out


def _charge(
    state: MemoryState, keys: list[str], args: list[int], out: list[int],
    found: list[_Window | None],
) -> None:
    """Add each limit's cost to its window (and to ``out``, the reply)."""
    for i, stored in enumerate(found):
        cost = args[3 * i + 2]
        if cost > 0:
            at = 3 * i + 2
            index, charged, prev = out[at], out[at + 1] + cost, out[at + 2]
            out[at + 1] = charged
            if stored is not None and stored[0] == index:
                stored[1] = charged  # this window's counts, in place
            else:  # a new window: kept until the end of the one after it
                window = args[3 * i + 1]
                state.put(keys[i], [index, charged, prev], (index + 2) * window / 1000)


def _apply_settlements(
    state: MemoryState, keys: list[str], args: list[int], n: int
) -> None:
    """Move the reservations named after the first ``n`` keys (see rl_refunds.lua)."""
    for j in range(n, len(keys)):
        at = 3 * n + 2 * (j - n)
        stored = _window(state, keys[j])
        if stored is None:
            continue
        index = args[at]
        if stored[0] == index:
            stored[1] = max(0, stored[1] + args[at + 1])
        elif stored[0] == index + 1:
            stored[2] = max(0, stored[2] + args[at + 1])


def _window(state: MemoryState, key: str) -> _Window | None:
    """The window state held at ``key``, if any (typed: compiled, its counts are read and
    compared directly; only this module's twins write the limiter's keys)."""
    stored = state.get(key)
    return stored if type(stored) is list else None


def _settle(state: MemoryState, keys: list[str], args: list[int], now: float) -> int:
    n = len(args) - 2 * len(keys)
    _apply_settlements(state, keys, args, n)
    return len(keys) - n


def _script(name: str, body: str, local: Any) -> Script:
    """A limiter script: the shared settlement prelude, then ``body``."""
    return Script(name=name, lua=_load("rl_refunds") + "\n" + _load(body), local=local, exact=True)


ACQUIRE = _script("rl_acquire", "rl_acquire", _acquire)
"""Apply settlements carried along, then check every limit of a request and, only if all fit,
charge them all (one round trip)."""

SETTLE = _script("rl_settle", "rl_settle", _settle)
"""Move earlier reservations by a delta: settle to real usage, or refund."""
