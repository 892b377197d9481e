"""One store contract over every backend: ``memory``, ``redis`` (the machine's) and ``cluster``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from gemini_scale.stores import MemoryStore, RedisStore, Store
from tests.clock import FakeClock

T = TypeVar("T")




@dataclass
class StoreKit:
    """A store under test plus what the contract needs to drive its backend."""

    backend: str
    make: Callable[[str], Store]
    """Another store with the given prefix on the same backend (tracked for cleanup)."""
    advance: Callable[[float], Awaitable[None]]
    """Let ``seconds`` pass: moves the fake clock, or really sleeps for Redis."""
    now: Callable[[], float]
    """The wall-clock time the backend's store sees."""
    prefix: str
    stores: list[Store] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.stores[0]

    def other(self, suffix: str) -> Store:
        return self.make(f"{self.prefix}-{suffix}")


BACKENDS = [
    pytest.param("memory"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster, pytest.mark.slow]),
]


def unique_prefix() -> str:
    return f"gs-test-{uuid.uuid4().hex[:12]}"


async def delete_prefixed(store: RedisStore) -> None:
    """Delete this store's keys only (``SCAN MATCH prefix:*``): the machine's Redis is shared."""
    keys = [key async for key in store.client.scan_iter(match=f"{store.prefix}:*", count=500)]
    for start in range(0, len(keys), 500):
        await store.client.delete(*keys[start : start + 500])


@pytest.fixture(params=BACKENDS)
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[StoreKit]:
    backend: str = request.param
    prefix = unique_prefix()
    made: list[Store] = []
    if backend == "memory":
        clock = FakeClock(1_700_000_000.0)

        def make(p: str) -> Store:
            made.append(MemoryStore(prefix=p, clock=clock))
            return made[-1]

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        now = clock.time
    else:
        if backend == "redis":
            url: str = request.getfixturevalue("machine_redis_url")
        else:
            url = request.getfixturevalue("redis_cluster").url

        def make(p: str) -> Store:
            # Generous timeouts: the contract is about semantics, and a loaded CI machine may
            # take more than the default 0.25 s to open 64 connections at once. Timeouts are
            # covered in test_redis_specific.py.
            made.append(RedisStore.from_url(url, prefix=p, socket_timeout=2, connect_timeout=2))
            return made[-1]

        async def advance(seconds: float) -> None:
            await asyncio.sleep(seconds)

        now = time.time
    kit = StoreKit(backend, make, advance, now, prefix, made)
    make(prefix)
    try:
        yield kit
    finally:
        for store in made:
            try:
                if isinstance(store, RedisStore):
                    await delete_prefixed(store)
            finally:
                await store.aclose()


async def gather_all(*awaitables: Awaitable[T]) -> list[T]:
    """Run concurrently; on a failure cancel the rest and wait for them (unlike gather)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_wrap(awaitable)) for awaitable in awaitables]
    return [task.result() for task in tasks]


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable
