"""Several ``RateLimiter`` engines ("replicas", each with its own Redis client) sharing one
real Redis: clock skew (B06), Cluster hash tags (B07), stalls (B16, B17), script cache
flushes (B18), and the per-replica local fallback with its recovery (B15, B20).

The engines are driven directly, so a test can give each one its own clock and a short
circuit-breaker cool-down; the gateway-level faults are in ``test_gateway_faults.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from gemini_scale.keys import Identity
from gemini_scale.ratelimit.engine import (
    Decision,
    Limit,
    RateLimiter,
    StoreErrorMode,
    StoreFailureError,
)
from gemini_scale.ratelimit.scripts import ACQUIRE
from gemini_scale.stores import RedisStore
from gemini_scale.stores.base import Script
from tests.redis_harness import (
    HOST,
    RedisClusterProcesses,
    RedisProcess,
    RedisProcesses,
    free_port,
)

from .support import commandstats, ensure_window_room, read_window, restart_redis

pytestmark = [pytest.mark.slow, pytest.mark.redis]

HOUR = 3600
ACQUIRE_SHA = hashlib.sha1(ACQUIRE.lua.encode()).hexdigest()


class SkewedClock:
    """Wall time off by ``skew`` seconds; monotonic time real (as with
    ``FAKETIME_DONT_FAKE_MONOTONIC=1``, research/security.md §2.5)."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def monotonic(self) -> float:
        return time.monotonic()


class CountingStore(RedisStore):
    """A RedisStore that counts the operations the engine sends it."""

    calls = 0

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.calls += 1
        return await super().run(script, keys, args)


def _prefix() -> str:
    return f"gs-dist-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def engines(
    url: str,
    count: int,
    *,
    prefix: str | None = None,
    clocks: Sequence[Any] | None = None,
    **options: Any,
) -> AsyncIterator[list[RateLimiter]]:
    """``count`` engines, each on its own client (like replicas), sharing one namespace."""
    prefix = prefix or _prefix()
    stores = []
    try:
        made = []
        for i in range(count):
            stores.append(CountingStore.from_url(url, prefix=prefix))
            if clocks is not None:
                options["clock"] = clocks[i]
            made.append(RateLimiter(stores[-1], **options))
        yield made
    finally:
        for store in stores:
            await store.aclose()


def _allowed(decisions: Sequence[Decision]) -> int:
    return sum(d.allowed for d in decisions)


def _full_key(engine: RateLimiter, tag: str, limit: Limit) -> str:
    return f"{engine.store.prefix}:{engine.keys(tag, [limit])[0]}"


# -- B06 ------------------------------------------------------------------------------------


async def test_clock_skew_between_replicas_does_not_matter(
    redis_servers: RedisProcesses,
) -> None:
    """B06: replicas whose clocks are 30 s ahead and 30 s behind share one limit exactly,
    and agree on the window, because the script reads Redis ``TIME``."""
    server = redis_servers.server()
    limit = Limit("requests", 20, 60)
    clocks = [SkewedClock(+30), SkewedClock(-30)]
    with server.client() as admin:
        async with engines(server.url, 2, clocks=clocks, on_store_error="closed") as (a, b):
            ensure_window_room(admin, 60, need=5)
            # In turn: each replica admits 10 of the 20.
            sequential = [await (a, b)[i % 2].acquire("skew", [limit], [1]) for i in range(60)]
            # At once, on another bucket.
            burst = await asyncio.gather(
                *((a, b)[i % 2].acquire("skew-burst", [limit], [1]) for i in range(100))
            )
            seconds, micros = admin.time()
            redis_now = seconds + micros / 1e6
        key = _full_key(a, "skew", limit)
        stored = read_window(admin, key)

    assert _allowed(sequential) == 20
    assert _allowed(sequential[0::2]) == _allowed(sequential[1::2]) == 10
    assert _allowed(burst) == 20
    # One window for both: its end, as each replica computed it, is Redis' (not 30 s off).
    window_end = (int(redis_now) // 60 + 1) * 60
    for decision in sequential[-2:]:
        assert abs(redis_now + decision.states[0].reset_after - window_end) < 1.0
    assert stored["w"] == int(redis_now) // 60
    assert stored["c"] == 20


async def test_clock_skew_control_caller_time_breaks(redis_servers: RedisProcesses) -> None:
    """B06 control: the same script fed the caller's clock instead of Redis ``TIME`` lets
    skewed replicas overwrite each other's windows; the limit no longer holds."""
    line = "local t = redis.call('TIME')"
    count = "local n = #ARGV - 2 * #KEYS"
    assert line in ACQUIRE.lua
    assert count in ACQUIRE.lua
    caller_time = Script(
        name="rl_acquire_caller_time",
        lua=ACQUIRE.lua.replace(line, "local t = {ARGV[#ARGV], '0'}").replace(
            count, "local n = #ARGV - 1 - 2 * #KEYS"  # the last argument is the time
        ),
        local=ACQUIRE.local,
    )
    server = redis_servers.server()
    clocks = [SkewedClock(+30), SkewedClock(-30)]
    prefix = _prefix()
    stores = [RedisStore.from_url(server.url, prefix=prefix) for _ in clocks]
    try:
        admitted = 0
        for i in range(60):
            store, clock = stores[i % 2], clocks[i % 2]
            raw = await store.run(
                caller_time, ["rl:{control}:requests-60s"], [20, 60_000, 1, int(clock.time())]
            )
            admitted += int(raw[0])
    finally:
        for store in stores:
            await store.aclose()
    assert admitted > 20  # 60 of 60 in practice: each write resets the other's window


# -- B07 ------------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_cluster_keys_share_a_slot_and_limits_stay_exact(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """B07: principals whose raw keys would fall in different slots (and on different
    masters), hostile subjects included: no CROSSSLOT, every request's keys in one slot,
    exact limits on request and token budgets, and settlements land."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, node.port) for node in redis_cluster.nodes],
        socket_timeout=2.0,
    )
    limits = [Limit("requests", 10, HOUR), Limit("tokens", 300, HOUR)]
    subjects = ["alice", "bob", "alice}{bob", "a:b:c", "{}", "x" * 2000, "é\n*"]
    subjects += [f"user-{i}" for i in range(30)]
    tags = {s: Identity((("principal", s),)).tag for s in subjects}
    try:
        async with engines(redis_cluster.url, 2, on_store_error="closed") as (a, b):
            full = {s: [f"{a.store.prefix}:{k}" for k in a.keys(tags[s], limits)] for s in subjects}
            # Static: one slot per request, and the server agrees with our CRC16.
            for keys in full.values():
                slots = {key_slot(k.encode()) for k in keys}
                assert len(slots) == 1
                assert client.cluster_keyslot(keys[0]) == slots.pop()
            # Untagged, the same raw ids would be cross-slot for most subjects.
            raw_cross = [
                s
                for s in subjects
                if key_slot(f"rl:{s}:requests-{HOUR}s".encode())
                != key_slot(f"rl:{s}:tokens-{HOUR}s".encode())
            ]
            assert len(raw_cross) >= len(subjects) // 2
            # The buckets are spread over every master.
            nodes = {client.get_node_from_key(keys[0]).name for keys in full.values()}
            assert len(nodes) == len(redis_cluster.nodes)

            ensure_window_room(client, HOUR, need=10)
            chosen = subjects[:7] + subjects[7::6]
            decisions: dict[str, list[Decision]] = {}
            for subject in chosen:  # 30 concurrent attempts per principal, both replicas
                decisions[subject] = list(
                    await asyncio.gather(
                        *((a, b)[i % 2].acquire(tags[subject], limits, [1, 20]) for i in range(30))
                    )
                )
            # Settle every admitted reservation: 20 reserved, 13 used.
            for subject in chosen:
                for i, decision in enumerate(decisions[subject]):
                    if decision.allowed:
                        await (a, b)[i % 2].settle(decision.reservation, [0, -7])
            for replica in (a, b):  # refunds wait for the bucket's next acquire: send them
                await replica.flush_refunds()
            for subject in chosen:
                assert _allowed(decisions[subject]) == 10  # requests bind (300 // 20 = 15)
                requests_key, tokens_key = full[subject]
                assert read_window(client, requests_key)["c"] == 10
                assert read_window(client, tokens_key)["c"] == 10 * 13
    finally:
        client.close()


# -- B15, B20: the local fallback, and recovery ----------------------------------------------


async def test_local_fallback_per_replica_and_recovery(redis_servers: RedisProcesses) -> None:
    """B20 with ``on_store_error="local"``: Redis dies mid-window; each of 3 replicas then
    admits at most the limit on its own (its local store starts empty), so one window
    admits at most ``shared-before + replicas x limit`` (here 5 + 3 x 10 = 35; the
    design enforces the full limit per replica, not ``limit / replicas``). Once the
    breaker is open a dead Redis is not called at all. Redis comes back (empty, on the same
    port): within the cool-down plus a second every replica is shared again, the limit is
    exact across replicas, and settling the local reservations never touches Redis."""
    server = redis_servers.server()
    limits = [Limit("requests", 10, HOUR), Limit("tokens", 1000, HOUR)]
    cooldown = 1.0
    async with engines(
        server.url, 3, on_store_error="local", breaker_cooldown=cooldown
    ) as replicas:
        stores = [r.store for r in replicas]
        assert all(isinstance(s, CountingStore) for s in stores)
        with server.client() as admin:
            ensure_window_room(admin, HOUR, need=10)
        before = await asyncio.gather(
            *(replicas[i % 3].acquire("p", limits, [1, 10]) for i in range(5))
        )
        assert _allowed(before) == 5
        assert not any(d.degraded for d in before)

        server.kill()
        down: list[list[Decision]] = []
        for replica in replicas:
            started = time.monotonic()
            down.append(
                list(
                    await asyncio.gather(
                        *(replica.acquire("p", limits, [1, 10]) for _ in range(30))
                    )
                )
            )
            assert time.monotonic() - started < 1.0  # refused connections fail fast
        assert [_allowed(d) for d in down] == [10, 10, 10]
        assert _allowed(before) + sum(_allowed(d) for d in down) == 35
        assert all(d.degraded for ds in down for d in ds)
        assert all(d.reservation.local for ds in down for d in ds if d.reservation)
        # The breakers are open: 20 more decisions per replica, not one store call.
        calls = [s.calls for s in stores]
        for replica in replicas:
            extra = [await replica.acquire("p", limits, [1, 10]) for _ in range(20)]
            assert _allowed(extra) == 0
            assert all(d.degraded for d in extra)
        assert [s.calls for s in stores] == calls

        restarted = restart_redis(redis_servers, server)
        back_at = time.monotonic()
        shared = [False, False, False]
        while not all(shared) and time.monotonic() - back_at < cooldown + 3.0:
            for i, replica in enumerate(replicas):
                if not shared[i]:
                    probe = await replica.acquire("probe", [Limit("requests", 1000, HOUR)], [1])
                    shared[i] = not probe.degraded
            await asyncio.sleep(0.05)
        recovered_in = time.monotonic() - back_at
        assert all(shared), "the replicas did not go back to the shared store"
        assert recovered_in <= cooldown + 1.0

        # Shared again and exact: Redis came back empty, 10 of 45 attempts pass in all.
        after = await asyncio.gather(
            *(replicas[i % 3].acquire("p", limits, [1, 10]) for i in range(45))
        )
        assert _allowed(after) == 10
        assert not any(d.degraded for d in after)
        key_requests, key_tokens = (_full_key(replicas[0], "p", limit) for limit in limits)
        with restarted.client() as admin:
            assert read_window(admin, key_requests)["c"] == 10
            tokens_before = read_window(admin, key_tokens)["c"]
            # Settling the outage's local reservations adjusts the local stores only.
            for replica, decisions in zip(replicas, down, strict=True):
                for decision in decisions:
                    if decision.allowed:
                        await replica.settle(decision.reservation, [0, -10])
            assert read_window(admin, key_requests)["c"] == 10
            assert read_window(admin, key_tokens)["c"] == tokens_before == 100


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_dead_redis_open_and_closed(mode: StoreErrorMode) -> None:
    """B15 at engine level: with Redis refused, ``open`` admits without limit states and
    ``closed`` refuses (``StoreFailureError``, the gateway's 503); both fail fast."""
    port = free_port()  # nothing listens there
    limits = [Limit("requests", 2, HOUR)]
    async with engines(f"redis://{HOST}:{port}/0", 1, on_store_error=mode) as (engine,):
        started = time.monotonic()
        for _ in range(10):
            if mode == "open":
                decision = await engine.acquire("p", limits, [1])
                assert decision.allowed
                assert decision.degraded
                assert decision.states == ()
            else:
                with pytest.raises(StoreFailureError):
                    await engine.acquire("p", limits, [1])
        assert time.monotonic() - started < 1.0
        assert engine.store.calls == 3  # then the breaker


# -- B16, B17: a stalled Redis ----------------------------------------------------------------


def _debug_sleep(server: RedisProcess, seconds: float) -> threading.Thread:
    def sleep() -> None:
        with server.client(timeout=seconds + 5) as client:
            client.execute_command("DEBUG", "SLEEP", seconds)

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    return thread


async def _during_a_stall(
    server: RedisProcess, engine: RateLimiter, limit: Limit, concurrent: int
) -> list[tuple[Decision, float]]:
    """``concurrent`` decisions on bucket ``p`` while Redis sleeps for a second (each with
    its latency); returns once Redis is awake again."""
    sleeper = _debug_sleep(server, 1.0)
    await asyncio.sleep(0.1)

    async def timed() -> tuple[Decision, float]:
        started = time.monotonic()
        decision = await engine.acquire("p", [limit], [1])
        return decision, time.monotonic() - started

    stalled = await asyncio.gather(*(timed() for _ in range(concurrent)))
    sleeper.join(5.0)
    return stalled


async def test_stalled_redis_bounded_latency_no_double_count(
    redis_servers: RedisProcesses,
) -> None:
    """B16/B17: Redis hangs (``DEBUG SLEEP 1``) under 12 concurrent decisions. Each one
    gives up at the store timeout (0.25 s) plus a margin, never retried; Redis runs the
    timed-out scripts when it wakes, so the counter may include them (a timeout means
    "unknown"), but each at most once: the drift is bounded by the number of timeouts."""
    server = redis_servers.server("--enable-debug-command", "local")
    limit = Limit("requests", 1000, HOUR)
    concurrent = 12
    async with engines(server.url, 1, on_store_error="open", breaker_threshold=1000) as (engine,):
        with server.client() as admin:
            ensure_window_room(admin, HOUR, need=10)
            # Warm: the script is cached and the pool holds a connection per caller.
            await engine.acquire("p", [limit], [0])
            warm = await asyncio.gather(
                *(engine.acquire("p", [limit], [1]) for _ in range(concurrent))
            )
            assert _allowed(warm) == concurrent
            assert not any(d.degraded for d in warm)
            key = _full_key(engine, "p", limit)
            admin.config_resetstat()

            stalled = await _during_a_stall(server, engine, limit, concurrent)
            await asyncio.sleep(0.2)
            after_stall = read_window(admin, key)["c"]

            fresh = await asyncio.gather(
                *(engine.acquire("p", [limit], [1]) for _ in range(concurrent))
            )
            final = read_window(admin, key)["c"]
            stats = commandstats(admin)

    assert all(d.degraded and d.allowed for d, _ in stalled)  # "open": let through
    assert max(latency for _, latency in stalled) <= 0.25 + 0.25
    timed_out = concurrent
    assert concurrent <= after_stall <= concurrent + timed_out  # never counted twice
    assert not any(d.degraded for d in fresh)
    assert final == after_stall + concurrent
    # No retries: Redis ran one EVALSHA per decision at most (the stalled ones that it ran
    # late, then the fresh ones), and each one it ran charged exactly once.
    ran_late = after_stall - concurrent
    assert stats["evalsha"] == ran_late + concurrent


async def test_decisions_queued_behind_a_stalled_redis_do_not_wait_their_turn(
    redis_servers: RedisProcesses,
) -> None:
    """B16/E04: Redis hangs while 30 decisions queue for 3 connections (the breaker kept
    out of it). The 3 in flight time out at the store timeout; the 27 waiting behind them
    then fail over at once, without sending: every decision takes one timeout, not a turn
    in a queue of timeouts, and Redis receives at most 3 scripts."""
    server = redis_servers.server("--enable-debug-command", "local")
    limit = Limit("requests", 1000, HOUR)
    store = RedisStore.from_url(server.url, prefix=_prefix(), max_connections=3, pool_timeout=5.0)
    engine = RateLimiter(store, on_store_error="open", breaker_threshold=1000)
    try:
        with server.client() as admin:
            ensure_window_room(admin, HOUR, need=10)
            await engine.acquire("p", [limit], [0])  # warm: the script is loaded
            admin.config_resetstat()
            stalled = await _during_a_stall(server, engine, limit, 30)
            await asyncio.sleep(0.2)
            stats = commandstats(admin)
    finally:
        await store.aclose()
    assert all(d.degraded and d.allowed for d, _ in stalled)  # "open": let through
    assert max(latency for _, latency in stalled) <= 0.25 + 0.25
    assert stats.get("evalsha", 0) <= 3  # (a connection still opening sends none)


async def test_one_reset_connection_fails_only_its_own_decision(
    redis_servers: RedisProcesses,
) -> None:
    """Among 40 decisions queued for 3 connections, one meets a connection Redis reset
    (``CLIENT KILL`` of that connection, on a healthy server): that one alone fails over
    (``closed``: refused with StoreFailureError); the others wait their turn and are decided
    by Redis, which receives each of them."""
    import redis.asyncio

    server = redis_servers.server()
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=2.0)
    store = RedisStore(client, prefix=_prefix(), max_concurrency=3)
    engine = RateLimiter(store, on_store_error="closed", breaker_threshold=1000)
    limit = Limit("requests", 1000, HOUR)
    real_evalsha = client.evalsha
    calls: list[int] = []

    async def evalsha_once_reset(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:  # the server closes the client's connections, just once
            with server.client() as admin:
                admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        return await real_evalsha(*args, **kwargs)

    client.evalsha = evalsha_once_reset  # type: ignore[method-assign]
    try:
        await engine.acquire("warm", [limit], [0])
        with server.client() as admin:
            admin.config_resetstat()
            outcomes = await asyncio.gather(
                *(engine.acquire("p", [limit], [1]) for _ in range(40)), return_exceptions=True
            )
            stats = commandstats(admin)
    finally:
        await client.aclose()
    failed = [o for o in outcomes if isinstance(o, StoreFailureError)]
    assert 1 <= len(failed) <= 3  # those on the connections the kill closed, nothing more
    assert all(isinstance(o, Decision) and o.allowed for o in outcomes if o not in failed)
    assert stats.get("evalsha", 0) >= 40 - len(failed)


# -- B18: the script cache flushed ---------------------------------------------------------


async def test_script_flush_mid_load_reloads_transparently(redis_servers: RedisProcesses) -> None:
    """B18: ``SCRIPT FLUSH`` twice during a load of 300 decisions from two replicas: the
    scripts are reloaded on the next call (``NOSCRIPT`` means "not run", so no decision is
    lost or counted twice), no store error surfaces, and exactly the limit is admitted."""
    server = redis_servers.server()
    limit = Limit("requests", 100, HOUR)
    async with engines(server.url, 2, on_store_error="closed") as (a, b):
        with server.client() as admin:
            ensure_window_room(admin, HOUR, need=10)
            decisions: list[Decision] = []
            loads_before = 0
            for batch in range(30):
                if batch in (10, 20):
                    assert admin.script_exists(ACQUIRE_SHA) == [True]
                    loads_before = commandstats(admin).get("script|load", 0)
                    admin.script_flush()
                    assert admin.script_exists(ACQUIRE_SHA) == [False]
                decisions += await asyncio.gather(
                    *((a, b)[i % 2].acquire("flush", [limit], [1]) for i in range(10))
                )
                if batch in (10, 20):  # the batch right after the flush reloaded it
                    assert commandstats(admin).get("script|load", 0) > loads_before
            stored = read_window(admin, _full_key(a, "flush", limit))["c"]
    assert _allowed(decisions) == 100
    assert not any(d.degraded for d in decisions)
    assert stored == 100
