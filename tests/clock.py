"""A clock tests move by hand (``gemini_scale.types.Clock``)."""

from __future__ import annotations


class FakeClock:
    """Wall and monotonic time that only move when ``advance`` says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
