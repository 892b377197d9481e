"""The cache engine without ASGI, on memory, Redis and a Redis Cluster: entries, tag and key
invalidation, generations across processes, single flight and store failures."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import pytest

from gemini_scale.caching import CacheEngine, StoredResponse, model_tag
from gemini_scale.caching.keys import ALL_TAG
from gemini_scale.errors import ConfigurationError, StoreError, StoreUnavailableError
from gemini_scale.stores import MemoryStore, RedisStore
from tests.cache.conftest import Backend
from tests.cache.support import eventually
from tests.clock import FakeClock

MATERIAL = b"request-material"
#: sha256(b"m" + b"\x00" + b"0,0")[:32]: what CacheEngine.key gives in every process.
PINNED = "1a7deb16f923aabdda7b62ec6529402d"
TAGS = [ALL_TAG, "principal:alice", model_tag("gemini-2.5-flash")]


def response(body: bytes = b'{"ok": true}', *, created: float, ttl: float = 60) -> StoredResponse:
    return StoredResponse.build(
        [(b"content-type", b"application/json")], body, created=created, ttl=ttl
    )


def engine_on(backend: Backend, **options: object) -> CacheEngine:
    options.setdefault("tag_refresh", 0)
    return CacheEngine(backend.store(), clock=backend.clock, **options)  # type: ignore[arg-type]


async def test_put_then_get_round_trips(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    key = await engine.key_for(MATERIAL, TAGS)
    assert await engine.get(key) is None
    stored = response(created=any_backend.clock.time())
    assert await engine.put(key, stored)
    found = await engine.get(key)
    assert found is not None
    assert (found.body, found.etag, found.headers) == (stored.body, stored.etag, stored.headers)
    assert engine.stats.stored == 1


async def test_keys_are_stable_across_engines_and_distinct_per_material(
    any_backend: Backend,
) -> None:
    one, two = engine_on(any_backend), engine_on(any_backend)
    assert await one.key_for(MATERIAL, TAGS) == await two.key_for(MATERIAL, TAGS)
    assert await one.key_for(MATERIAL, TAGS) != await one.key_for(MATERIAL + b"x", TAGS)
    # A pinned value: keys survive restarts and upgrades of Python (no salted hash()).
    assert CacheEngine.key(b"m", ["0", "0"]) == PINNED


async def test_every_store_key_has_a_ttl(shared_backend: Backend) -> None:
    any_backend = shared_backend
    engine = engine_on(any_backend)
    key = await engine.key_for(MATERIAL, TAGS)
    await engine.put(key, response(created=any_backend.clock.time()))
    await engine.invalidate(tags=["principal:bob"])
    flight, found = await engine.join("another-key")
    assert flight is not None
    assert found is None
    ttls = await any_backend.ttls()
    assert len(ttls) == 3  # the entry, bob's generation, the lock
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    await engine.land(flight, None)


async def test_invalidating_a_tag_hides_its_entries_only(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    alice = await engine.key_for(MATERIAL, TAGS)
    bob = await engine.key_for(MATERIAL, [ALL_TAG, "principal:bob"])
    for key in (alice, bob):
        await engine.put(key, response(created=any_backend.clock.time()))
    assert await engine.invalidate(tags=[model_tag("Gemini-2.5-Flash")]) == 1
    renewed = await engine.key_for(MATERIAL, TAGS)
    assert renewed != alice
    assert await engine.get(renewed) is None
    assert await engine.key_for(MATERIAL, [ALL_TAG, "principal:bob"]) == bob
    assert await engine.get(bob) is not None


async def test_invalidation_reaches_other_engines_after_tag_refresh(any_backend: Backend) -> None:
    clock = any_backend.clock
    here = engine_on(any_backend, tag_refresh=5)
    there = engine_on(any_backend, tag_refresh=5)
    before = await there.key_for(MATERIAL, TAGS)
    await there.put(before, response(created=clock.time()))
    await here.invalidate(tags=["principal:alice"])
    assert await here.key_for(MATERIAL, TAGS) != before  # at once where it was made
    assert await there.key_for(MATERIAL, TAGS) == before  # remembered for tag_refresh
    clock.advance(5)
    assert await there.key_for(MATERIAL, TAGS) == await here.key_for(MATERIAL, TAGS)


async def test_invalidate_everything_with_the_all_tag(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    key = await engine.key_for(MATERIAL, TAGS)
    await engine.invalidate(tags=[ALL_TAG])
    assert await engine.key_for(MATERIAL, TAGS) != key


async def test_invalidate_by_key_deletes_the_entry(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    keys = [await engine.key_for(MATERIAL + bytes([i]), TAGS) for i in range(3)]
    for key in keys:
        await engine.put(key, response(created=any_backend.clock.time()))
    assert await engine.invalidate(keys=keys[:2]) == 2
    assert [await engine.get(key) is not None for key in keys] == [False, False, True]


async def test_an_entry_is_stale_after_its_ttl(backend: Backend) -> None:
    """Freshness is the engine's decision (its clock), whatever the store's own TTL."""
    engine = engine_on(backend)
    key = await engine.key_for(MATERIAL, TAGS)
    await engine.put(key, response(created=backend.clock.time(), ttl=2))
    backend.clock.advance(1.9)
    assert await engine.get(key) is not None
    backend.clock.advance(0.2)
    assert await engine.get(key) is None


async def test_corrupt_entries_are_misses_and_deleted(
    any_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_on(any_backend)
    store = any_backend.store()
    good = response(created=any_backend.clock.time()).encode()
    for corrupt in (good[:-3], b"GSC9" + good[4:], b"junk", good[:10]):
        key = await engine.key_for(corrupt, TAGS)
        await store.set(engine.entry_name(key), corrupt, ttl=60)
        with caplog.at_level(logging.WARNING, "gemini_scale.caching"):
            assert await engine.get(key) is None
        assert await store.get(engine.entry_name(key)) is None
    assert engine.stats.corrupt == 4


async def test_single_flight_in_one_process(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    key = await engine.key_for(MATERIAL, TAGS)
    leader, found = await engine.join(key)
    assert leader is not None
    assert found is None
    followers = [asyncio.create_task(engine.join(key)) for _ in range(5)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in followers)
    stored = response(created=any_backend.clock.time())
    await engine.put(key, stored)
    await engine.land(leader, stored)
    results = await asyncio.gather(*followers)
    assert all(flight is None and got is stored for flight, got in results)


async def test_followers_get_nothing_when_the_leader_has_no_answer(any_backend: Backend) -> None:
    engine = engine_on(any_backend)
    leader, _ = await engine.join("k")
    assert leader is not None
    follower = asyncio.create_task(engine.join("k"))
    await asyncio.sleep(0)
    await engine.land(leader, None)
    assert await follower == (None, None)
    again, _ = await engine.join("k")  # the flight is over: the next miss leads
    assert again is not None
    await engine.land(again, None)


async def test_a_follower_waits_at_most_wait_timeout(any_backend: Backend) -> None:
    engine = engine_on(any_backend, wait_timeout=0.05)
    leader, _ = await engine.join("k")
    assert leader is not None
    assert await engine.join("k") == (None, None)
    assert engine.stats.wait_timeouts == 1
    await engine.land(leader, None)


async def test_single_flight_across_engines_sharing_a_store(any_backend: Backend) -> None:
    """Two processes (engines) sharing the store: one leads, the other polls the store."""
    one = engine_on(any_backend, distributed_lock=True, poll_interval=0.001)
    two = engine_on(any_backend, distributed_lock=True, poll_interval=0.001)
    key = await one.key_for(MATERIAL, TAGS)
    leader, _ = await one.join(key)
    assert leader is not None
    follower = asyncio.create_task(two.join(key))
    await eventually(lambda: two.stats.waits == 1)
    assert not follower.done()
    stored = response(created=any_backend.clock.time())
    await one.put(key, stored)
    await one.land(leader, stored)
    flight, found = await asyncio.wait_for(follower, 5)
    assert flight is None
    assert found is not None
    assert found.body == stored.body


async def test_a_leaders_write_releases_its_lock(any_backend: Backend) -> None:
    engine = engine_on(any_backend, distributed_lock=True)
    store = any_backend.store()
    leader, _ = await engine.join("k")
    assert leader is not None
    assert leader.token is not None
    lock = f"{engine.namespace}:{{k}}:lock"
    assert await store.get(lock) == leader.token
    stored = response(created=any_backend.clock.time())
    assert await engine.put("k", stored, leader)  # one round trip: SET entry, DEL lock
    assert await store.get(lock) is None
    assert leader.token is None
    await engine.land(leader, stored)
    assert (await engine.get("k")) is not None


async def test_a_late_leader_finds_the_entry_stored_before_the_unlock(any_backend: Backend) -> None:
    one = engine_on(any_backend, distributed_lock=True)
    two = engine_on(any_backend, distributed_lock=True)
    key = await one.key_for(MATERIAL, TAGS)
    await one.put(key, response(created=any_backend.clock.time()))
    flight, found = await two.join(key)  # took the lock, then saw the entry: no upstream call
    assert flight is None
    assert found is not None


async def test_followers_elsewhere_go_upstream_when_the_leader_fails(any_backend: Backend) -> None:
    one = engine_on(any_backend, distributed_lock=True, poll_interval=0.001)
    two = engine_on(any_backend, distributed_lock=True, poll_interval=0.001)
    leader, _ = await one.join("k")
    assert leader is not None
    follower = asyncio.create_task(two.join("k"))
    await eventually(lambda: two.stats.waits == 1)
    await one.land(leader, None)  # released the lock without an entry
    assert await asyncio.wait_for(follower, 5) == (None, None)


async def test_a_dead_leaders_lock_expires(memory: Backend) -> None:
    backend = memory
    one = engine_on(backend, distributed_lock=True, lock_ttl=1)
    two = engine_on(backend, distributed_lock=True, lock_ttl=1)
    leader, _ = await one.join("k")  # and never lands: the process died
    assert leader is not None
    backend.clock.advance(1.5)
    flight, _ = await two.join("k")
    assert flight is not None  # the lock expired: the next miss leads
    await two.land(flight, None)


async def test_a_lock_is_released_only_by_its_holder(any_backend: Backend) -> None:
    one = engine_on(any_backend, distributed_lock=True, wait_timeout=0.05, poll_interval=0.01)
    leader, _ = await one.join("k")
    assert leader is not None
    assert leader.token is not None
    store = any_backend.store()
    lock = f"{one.namespace}:{{k}}:lock"
    await store.set(lock, b"someone-else", ttl=30)  # our lock expired and was taken
    await one.land(leader, None)
    assert await store.get(lock) == b"someone-else"


async def test_store_failure_steps_aside_and_backs_off(
    redis_servers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_servers.server()
    store = RedisStore.from_url(server.url, socket_timeout=0.2, connect_timeout=0.2)
    clock = FakeClock()
    engine = CacheEngine(store, clock=clock, retry_after=5, tag_refresh=0)
    try:
        key = await engine.key_for(MATERIAL, TAGS)
        server.stop()
        with caplog.at_level(logging.WARNING, "gemini_scale.caching"):
            with pytest.raises(StoreUnavailableError):
                await engine.get(key)
            assert not await engine.put(key, response(created=clock.time()))
            with pytest.raises(StoreError):
                await engine.key_for(MATERIAL, TAGS)
        assert engine.stats.store_errors == 1  # the put and key_for did not ask the store...
        warnings = [r for r in caplog.records if r.name == "gemini_scale.caching"]
        assert len(warnings) == 1  # ...and the failure was logged once
        flight, found = await engine.join(key)  # no coordination possible: lead alone
        assert flight is not None
        assert found is None
        await engine.land(flight, None)
    finally:
        await store.aclose()


async def test_store_timeout_bounds_a_stalled_store(redis_servers: Any) -> None:
    server = redis_servers.server()
    store = RedisStore.from_url(server.url, socket_timeout=5, connect_timeout=1)
    engine = CacheEngine(store, store_timeout=0.05, tag_refresh=0)
    try:
        await store.ping()
        server.process.send_signal(signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(StoreUnavailableError):
                await engine.get("k")
            assert loop.time() - started < 1.0
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        await store.aclose()


def test_options_are_validated() -> None:
    store = MemoryStore()
    for options in (
        {"lock_ttl": 0},
        {"wait_timeout": -1},
        {"namespace": "a{b}"},
        {"tag_refresh": float("nan")},
        {"max_ttl": True},
    ):
        with pytest.raises(ConfigurationError):
            CacheEngine(store, **options)  # type: ignore[arg-type]
    assert CacheEngine(store).distributed_lock is False
