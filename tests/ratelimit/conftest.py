"""Backends for the rate-limit tests: memory (with a fake clock) and the machine's Redis.

Redis tests use a unique key prefix and delete only their own keys (``SCAN MATCH``); the
machine's Redis is shared, so never ``FLUSHALL``. Redis time is real: tests on Redis use
long windows and assert only within-window behaviour.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gemini_scale.stores import MemoryStore, RedisStore, Store
from tests.clock import FakeClock
from tests.ratelimit.helpers import WINDOW_START


@dataclass
class Backend:
    name: str
    clock: FakeClock | None
    """The memory store's clock; ``None`` on Redis (its own clock, real time)."""
    url: str | None
    prefix: str = field(default_factory=lambda: f"gs-rl-test-{uuid.uuid4().hex[:12]}")
    stores: list[Store] = field(default_factory=list)

    def store(self) -> Store:
        """A store on this backend (all of one test share the prefix, i.e. the counters)."""
        made: Store
        if self.url is None:
            assert self.clock is not None
            if self.stores:
                return self.stores[0]
            made = MemoryStore(prefix=self.prefix, clock=self.clock)
        else:
            # Generous timeouts: these tests are about semantics under concurrency, not
            # timeouts, and a loaded 2-core machine may be slow to open 64 connections.
            made = RedisStore.from_url(
                self.url, prefix=self.prefix, socket_timeout=3, connect_timeout=3,
                pool_timeout=5,
            )
        self.stores.append(made)
        return made

    async def keys(self) -> list[bytes]:
        """Every key of this test (Redis only)."""
        redis_store = next(s for s in self.stores if isinstance(s, RedisStore))
        return [k async for k in redis_store.client.scan_iter(match=f"{self.prefix}:*")]


async def delete_prefixed(store: RedisStore) -> None:
    keys = [k async for k in store.client.scan_iter(match=f"{store.prefix}:*", count=500)]
    for start in range(0, len(keys), 500):
        await store.client.delete(*keys[start : start + 500])


async def _backend(name: str, url: str | None) -> AsyncIterator[Backend]:
    backend = Backend(name, FakeClock(WINDOW_START) if url is None else None, url)
    try:
        yield backend
    finally:
        for store in backend.stores:
            try:
                if isinstance(store, RedisStore):
                    await delete_prefixed(store)
            finally:
                await store.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = None if request.param == "memory" else request.getfixturevalue("machine_redis_url")
    async for made in _backend(request.param, url):
        yield made


@pytest.fixture
async def redis_backend(machine_redis_url: str) -> AsyncIterator[Backend]:
    async for made in _backend("redis", machine_redis_url):
        yield made
