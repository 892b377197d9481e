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
    n = len(args) - 2 * len(keys)  # limit keys; the rest are settlements (rl_refunds.lua)
    if n < len(keys):
        _apply_settlements(state, keys, args, n)
    now_ms = math.floor(now * 1000)
    out = [1, now_ms]
    get = state.get
    j = 0
    for key in keys[:n] if n < len(keys) else keys:
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
        weight = (window - (now_ms - index * window)) / window  # as the Lua rounds it
        if prev * weight + cur + cost > limit:
            out[0] = 0
        out += (index, cur, prev)
    if out[0]:
        for position in range(n):
            cost = int(args[3 * position + 2])
            if cost > 0:
                at = 3 * position + 2
                index, charged, prev = out[at], out[at + 1] + cost, out[at + 2]
                out[at + 1] = charged
                state.put(
                    keys[position],
                    (index, charged, prev),
                    now + 2 * int(args[3 * position + 1]) / 1000,
                )
    return out


def _apply_settlements(state: LocalState, keys: list[str], args: list[Any], n: int) -> None:
    """Move the reservations named after the first ``n`` keys (see rl_refunds.lua)."""
    for j in range(n, len(keys)):
        at = 3 * n + 2 * (j - n)
        key, index, delta = keys[j], int(args[at]), int(args[at + 1])
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


def _settle(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
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
