"""Store backends for feature tests: memory (on a fake clock), the machine's Redis, and a
Redis Cluster. Redis tests use a unique key prefix and delete only their own keys (never
``FLUSHALL``: the machine's Redis is shared)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gemini_scale.stores import MemoryStore, RedisStore, Store
from tests.clock import FakeClock


def unique_prefix(label: str) -> str:
    return f"gs-{label}-test-{uuid.uuid4().hex[:12]}"


@dataclass
class Backend:
    name: str
    clock: FakeClock | None
    """The clock the memory store (and, where a test passes it, the engine) runs on."""
    url: str | None
    """``None``: memory."""
    prefix: str
    stores: list[Store] = field(default_factory=list)

    @property
    def redis(self) -> bool:
        return self.url is not None

    def store(self, **options: object) -> Store:
        """A store on this backend; every store of one test shares the key space."""
        made: Store
        if self.url is None:
            assert self.clock is not None
            if self.stores:
                return self.stores[0]
            made = MemoryStore(prefix=self.prefix, clock=self.clock, **options)  # type: ignore[arg-type]
        else:
            # Generous timeouts: these tests are about semantics under concurrency, not
            # timeouts, and a loaded 2-core machine may be slow to open 64 connections.
            made = RedisStore.from_url(
                self.url, prefix=self.prefix, socket_timeout=3, connect_timeout=3,
                pool_timeout=5,
            )
        self.stores.append(made)
        return made

    def _redis_store(self) -> RedisStore:
        return next(s for s in self.stores if isinstance(s, RedisStore))

    async def keys(self) -> list[bytes]:
        """Every key of this test (Redis only)."""
        client = self._redis_store().client
        return [k async for k in client.scan_iter(match=f"{self.prefix}:*", count=500)]

    async def ttls(self) -> dict[bytes, int]:
        """Every key of this test with its TTL in ms (Redis only)."""
        client = self._redis_store().client
        return {key: await client.pttl(key) for key in await self.keys()}


async def provide(
    name: str, url: str | None, clock: FakeClock | None, label: str
) -> AsyncIterator[Backend]:
    """A backend for one test; its Redis keys are deleted and its stores closed after."""
    backend = Backend(name, clock, url, unique_prefix(label))
    try:
        yield backend
    finally:
        for store in backend.stores:
            try:
                if isinstance(store, RedisStore):
                    keys = [k async for k in store.client.scan_iter(match=f"{store.prefix}:*")]
                    for key in keys:  # one key per call: a cluster refuses a DEL across slots
                        await store.client.delete(key)
            finally:
                await store.aclose()
