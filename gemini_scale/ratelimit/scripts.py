"""The limiter's two atomic operations: Lua for Redis, and their Python twins for memory."""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from gemini_scale.stores.base import LocalState, Script

# A window's state in memory: (window index, count in that window, count in the one before).
_Window = tuple[int, int, int]


def _load(name: str) -> str:
    return (
        resources.files("gemini_scale.ratelimit")
        .joinpath("lua", f"{name}.lua")
        .read_text(encoding="utf-8")
    )


def _window(state: LocalState, key: str) -> _Window | None:
    value = state.get(key)
    return value if isinstance(value, tuple) else None


def _acquire(state: LocalState, keys: list[str], args: list[Any], now: float) -> list[int]:
    now_ms = math.floor(now * 1000)
    out = [1, now_ms]
    get = state.get
    j = 0
    for key in keys:
        limit, window, cost = int(args[j]), int(args[j + 1]), int(args[j + 2])
        j += 3
        index = now_ms // window
        stored = get(key)
        cur = prev = 0
        if isinstance(stored, tuple):
            if stored[0] == index:
                cur, prev = stored[1], stored[2]
            elif stored[0] == index - 1:
                prev = stored[1]
        if prev * (window - (now_ms - index * window)) / window + cur + cost > limit:
            out[0] = 0
        out += (index, cur, prev)
    if out[0]:
        for position, key in enumerate(keys):
            cost = int(args[3 * position + 2])
            if cost > 0:
                at = 3 * position + 2
                index, charged, prev = out[at], out[at + 1] + cost, out[at + 2]
                out[at + 1] = charged
                state.put(key, (index, charged, prev), now + 2 * int(args[3 * position + 1]) / 1000)
    return out


def _settle(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    for i, key in enumerate(keys):
        index, delta = int(args[2 * i]), int(args[2 * i + 1])
        stored = _window(state, key)
        if stored is None:
            continue
        w, cur, prev = stored
        if w == index:
            cur = max(0, cur + delta)
        elif w == index + 1:
            prev = max(0, prev + delta)
        else:
            continue
        state.put(key, (w, cur, prev), state.expires_at(key))
    return len(keys)


ACQUIRE = Script(name="rl_acquire", lua=_load("rl_acquire"), local=_acquire, exact=True)
"""Check every limit of a request and, only if all fit, charge them all (one round trip)."""

SETTLE = Script(name="rl_settle", lua=_load("rl_settle"), local=_settle, exact=True)
"""Move earlier reservations by a delta: settle to real usage, or refund."""
