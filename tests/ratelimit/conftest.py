"""Backends for the rate-limit tests: memory (with a fake clock) and the machine's Redis.

Redis tests use a unique key prefix and delete only their own keys (``SCAN MATCH``); the
machine's Redis is shared, so never ``FLUSHALL``. Redis time is real: tests on Redis use
long windows and assert only within-window behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.backends import Backend, provide
from tests.clock import FakeClock
from tests.ratelimit.helpers import WINDOW_START

__all__ = ["Backend"]


async def _backend(name: str, url: str | None) -> AsyncIterator[Backend]:
    # Redis keeps its own (real) time: no fake clock there.
    async for made in provide(name, url, FakeClock(WINDOW_START) if url is None else None, "rl"):
        yield made


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = None if request.param == "memory" else request.getfixturevalue("machine_redis_url")
    async for made in _backend(request.param, url):
        yield made


@pytest.fixture
async def redis_backend(machine_redis_url: str) -> AsyncIterator[Backend]:
    async for made in _backend("redis", machine_redis_url):
        yield made
