"""``remember``: how every bounded memo on a hot path here stores an entry."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, limit: int) -> V:
    """Store ``value`` under ``key`` in ``memo``, first emptying it when it holds ``limit``
    entries; return ``value``.

    For memos of pure computations: reads stay plain ``dict`` lookups (a ``dict`` subclass
    would double their cost), and emptying is O(1) amortised where evicting the oldest entry
    would not be. A flood of distinct keys costs recomputation, never memory.
    """
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
