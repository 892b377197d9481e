"""Backends for the cache tests: memory (with a fake clock), the machine's Redis, and a
Redis Cluster. Redis tests use a unique key prefix and delete only their own keys (never
``FLUSHALL``); Redis time is real, so TTL boundaries are tested on memory only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.backends import Backend, provide
from tests.clock import FakeClock

__all__ = ["Backend"]


def _url(request: pytest.FixtureRequest, name: str) -> str | None:
    if name == "memory":
        return None
    if name == "redis":
        url: str = request.getfixturevalue("machine_redis_url")
        return url
    cluster = request.getfixturevalue("redis_cluster")
    return str(cluster.url)


async def _provide(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Backend]:
    # Engines run on the fake clock on every backend; memory stores expire on it too.
    async for made in provide(name, _url(request, name), FakeClock(), "cache"):
        yield made


REDIS = pytest.param("redis", marks=pytest.mark.redis)
CLUSTER = pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster, pytest.mark.slow])


@pytest.fixture(params=["memory", REDIS])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Memory and the machine's Redis (the HTTP-level tests)."""
    async for made in _provide(request, request.param):
        yield made


@pytest.fixture(params=["memory", REDIS, CLUSTER])
async def any_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Memory, Redis and a Redis Cluster (the store-level tests)."""
    async for made in _provide(request, request.param):
        yield made


@pytest.fixture(params=[REDIS, CLUSTER])
async def shared_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Redis and a Redis Cluster (what only a shared store shows: TTLs, key layout)."""
    async for made in _provide(request, request.param):
        yield made


@pytest.fixture
async def memory(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Memory only: its keys expire on the fake clock (Redis keeps real time)."""
    async for made in _provide(request, "memory"):
        yield made


@pytest.fixture
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The machine's Redis only."""
    async for made in _provide(request, "redis"):
        yield made
