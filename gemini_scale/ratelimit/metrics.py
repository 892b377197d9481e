"""Prometheus signals of a degraded rate limiter (created on first use: a healthy service
pays no import for them)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge


@functools.cache
def _metrics() -> tuple[Counter, Gauge]:
    from prometheus_client import Counter, Gauge

    decisions = Counter(
        "gemini_scale_ratelimit_degraded_decisions",
        "Rate-limit decisions made without the shared store, by on_store_error mode.",
        ["mode"],
    )
    degraded = Gauge(
        "gemini_scale_ratelimit_store_degraded",
        "1 while the rate-limit store is failing (circuit open), else 0.",
        multiprocess_mode="livemax",  # several workers: 1 while any living one is degraded
    )
    return decisions, degraded


def record_degraded(mode: str) -> None:
    """One decision made locally, skipped (open) or refused (closed) for lack of the store."""
    decisions, degraded = _metrics()
    decisions.labels(mode=mode).inc()
    degraded.set(1)


def record_recovered() -> None:
    """The store answers again."""
    _metrics()[1].set(0)
