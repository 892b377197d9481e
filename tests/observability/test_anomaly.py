"""The usage-anomaly detector (``UsageAnomalyDetector``): a principal's rates against its own
baseline, shared across replicas through the store, with bounded memory and a store failure
that never reaches the caller.

Time is a FakeClock placed on a window boundary, also on Redis: there the detectors trust
their own clock (``max_clock_skew=math.inf``; Redis' ``TIME`` cannot be moved by a test), so
every scenario is exact on every backend. What a replica with a stepped clock does to the
shared windows is tested against the store's own clock, Redis ``TIME`` included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gemini_scale.errors import ConfigurationError, StoreUnavailableError
from gemini_scale.observability.anomaly import FLUSH, Anomaly, UsageAnomalyDetector
from gemini_scale.observability.metrics import families
from gemini_scale.stores import MemoryStore, RedisStore, Script
from gemini_scale.stores.base import ScriptArg
from gemini_scale.types import SystemClock
from tests.backends import Backend, provide
from tests.clock import FakeClock

SYSTEM = SystemClock()

WINDOW = 60.0
START = 1_800_000_000.0 - 1_800_000_000.0 % WINDOW  # a window boundary
#: A credential the service saw with the traffic: it must never reach a log record.
BEARER = "ya29.a0-SECRET-bearer-token-never-logged"

BACKENDS = [
    pytest.param("memory"),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster, pytest.mark.slow]),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        url = None
    elif request.param == "redis":
        url = request.getfixturevalue("machine_redis_url")
    else:
        url = request.getfixturevalue("redis_cluster").url
    async for made in provide(request.param, url, FakeClock(START), "anomaly"):
        yield made


_REGISTRIES: list[CollectorRegistry] = []


def fresh_registry() -> CollectorRegistry:
    """A registry of one's own, kept alive for the session: metric families are cached per
    registry, and a registry freed mid-session could hand its address to a new one."""
    _REGISTRIES.append(CollectorRegistry())
    return _REGISTRIES[-1]


@pytest.fixture
async def redis_backend(machine_redis_url: str) -> AsyncIterator[Backend]:
    async for made in provide("redis", machine_redis_url, FakeClock(START), "anomaly"):
        yield made


class Hook:
    """An ``on_anomaly`` hook that records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[Anomaly] = []

    def __call__(self, anomaly: Anomaly) -> None:
        self.calls.append(anomaly)


def detector_on(
    backend: Backend, registry: CollectorRegistry, **options: Any
) -> UsageAnomalyDetector:
    """A detector (one replica) on the backend's store and fake clock; flushes are the
    test's (the background interval is a whole window, longer than any test)."""
    assert backend.clock is not None
    options.setdefault("flush_interval", WINDOW)
    if backend.redis:
        options.setdefault("max_clock_skew", math.inf)
    return UsageAnomalyDetector(
        store=backend.store(), clock=backend.clock, registry=registry, **options
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def anomalies(registry: CollectorRegistry, signal: str) -> float:
    return sample(registry, "gemini_scale_usage_anomalies_total", signal=signal)


def flagged_gauge(registry: CollectorRegistry, signal: str) -> float:
    return sample(registry, "gemini_scale_anomalous_principals", signal=signal)


Traffic = dict[str, tuple[int, int]]
"""principal -> (requests, tokens) in one window."""


async def run_window(
    clock: FakeClock, traffic: Traffic, *replicas: UsageAnomalyDetector
) -> list[Anomaly]:
    """One window of traffic, observed in two halves, each followed by a flush of every
    replica (as their background tasks would do); the clock ends on the next window."""
    start = clock.now
    assert start % WINDOW == 0
    found: list[Anomaly] = []
    for half, at in enumerate((10.0, 40.0)):
        clock.advance(start + at - clock.now)
        for principal, (requests, tokens) in traffic.items():
            r = requests // 2 if half == 0 else requests - requests // 2
            t = tokens // 2 if half == 0 else tokens - tokens // 2
            replicas[0].observe(principal, requests=r, tokens=t)
        for replica in replicas:
            found += await replica.flush()
    clock.advance(start + WINDOW - clock.now)
    return found


# 50 principals, each at its own steady rate (with +-25 % noise per window): a heavy user,
# ordinary ones, principals too small to ever be judged, and some active one window in three.
HEAVY = "https://issuer.example heavy-batch-job"
BURSTER = "https://issuer.example user-09"  # 60 requests in every window


def _steady_rates() -> dict[str, tuple[int, int, int]]:
    """principal -> (requests per window, tokens per request, active every n-th window)."""
    rates = {HEAVY: (3000, 2_000, 1)}
    for i in range(1, 50):
        requests = (2, 8, 35, 60, 150, 400)[i % 6]
        every = 3 if i % 7 == 0 else 1
        rates[f"https://issuer.example user-{i:02d}"] = (requests, 300 + 50 * i, every)
    return rates


STEADY_RATES = _steady_rates()


def steady(window: int, rng: random.Random) -> Traffic:
    traffic: Traffic = {}
    for principal, (requests, per_request, every) in STEADY_RATES.items():
        if window % every:
            continue
        n = max(1, round(requests * rng.uniform(0.75, 1.25)))
        traffic[principal] = (n, n * per_request)
    return traffic


def nobody_flagged(detector: UsageAnomalyDetector, *but: str) -> bool:
    return not any(detector.flagged(p) for p in STEADY_RATES if p not in but)


# -- 1. steady traffic from many is never flagged; one principal's burst is ------------------


async def test_a_burst_from_one_principal_is_flagged_and_steady_traffic_from_many_is_not(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gemini_scale.anomaly")
    registry, hook = fresh_registry(), Hook()
    detector = detector_on(backend, registry, on_anomaly=hook)
    assert backend.clock is not None
    clock, rng = backend.clock, random.Random(7)

    for window in range(30):
        assert await run_window(clock, steady(window, rng), detector) == []
    assert nobody_flagged(detector)
    assert anomalies(registry, "requests") == anomalies(registry, "tokens") == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    # One principal makes ten times its requests (tokens unchanged: cheap calls).
    rate, per_request, _ = STEADY_RATES[BURSTER]
    burst = {**steady(30, rng), BURSTER: (10 * rate, rate * per_request)}
    burst_start = clock.now
    found = await run_window(clock, burst, detector)

    assert [(a.principal, a.signal) for a in found] == [(BURSTER, "requests")]
    anomaly = found[0]
    assert anomaly.observed >= 5 * rate  # caught once past factor x a full window
    assert anomaly.baseline == pytest.approx(rate, rel=0.25)
    assert anomaly.factor == pytest.approx(anomaly.observed / anomaly.baseline)
    assert anomaly.factor > 5
    assert anomaly.window_start == burst_start
    assert hook.calls == [anomaly]
    assert detector.flagged(BURSTER) == {"requests"}
    assert nobody_flagged(detector, BURSTER)
    assert anomalies(registry, "requests") == 1
    assert anomalies(registry, "tokens") == 0
    assert flagged_gauge(registry, "requests") == 1

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    record = warnings[0]
    assert record.name == "gemini_scale.anomaly"
    assert record.principal == BURSTER  # type: ignore[attr-defined]
    message = record.getMessage()
    assert "requests" in message
    assert f"{anomaly.observed:.0f}" in message
    assert BURSTER not in message  # the principal travels in `extra` only
    assert BEARER not in repr(vars(record))

    # The burst window is still the window just closed: flagged, but no new anomaly.
    assert await run_window(clock, steady(31, rng), detector) == []
    assert detector.flagged(BURSTER) == {"requests"}
    # Once it has passed, the principal is back under its threshold.
    assert await run_window(clock, steady(32, rng), detector) == []
    assert detector.flagged(BURSTER) == frozenset()
    assert flagged_gauge(registry, "requests") == 0
    assert anomalies(registry, "requests") == 1
    assert len(hook.calls) == 1

    # The heavy user's calls suddenly burn ten times the tokens (same number of calls).
    for window in range(33, 40):
        assert await run_window(clock, steady(window, rng), detector) == []
    heavy_requests, heavy_per_request, _ = STEADY_RATES[HEAVY]
    heavy_tokens = 10 * heavy_requests * heavy_per_request
    tokens_burst = {**steady(40, rng), HEAVY: (heavy_requests, heavy_tokens)}
    found = await run_window(clock, tokens_burst, detector)
    assert [(a.principal, a.signal) for a in found] == [(HEAVY, "tokens")]
    assert detector.flagged(HEAVY) == {"tokens"}
    assert nobody_flagged(detector, HEAVY)
    assert anomalies(registry, "tokens") == 1
    assert flagged_gauge(registry, "tokens") == 1
    assert hook.calls[1:] == found
    await detector.aclose()


async def test_a_sustained_departure_is_one_anomaly_until_the_baseline_catches_up() -> None:
    """A burst joins the baseline capped at factor x baseline, so it cannot teach the
    baseline its own level in one window: ten times the rate stays flagged for three
    windows (uncapped, it would be two), then it is the principal's new normal."""
    clock, registry = FakeClock(START), fresh_registry()
    detector = UsageAnomalyDetector(clock=clock, registry=registry, flush_interval=WINDOW)
    principal = "iss ramped-up"
    for _ in range(12):
        assert await run_window(clock, {principal: (100, 0)}, detector) == []
    flagged_at_window_end = []
    for _ in range(6):
        await run_window(clock, {principal: (1000, 0)}, detector)
        flagged_at_window_end.append(bool(detector.flagged(principal)))
    assert flagged_at_window_end == [True, True, True, False, False, False]
    assert anomalies(registry, "requests") == 1
    await detector.aclose()


# -- 2. warm-up -------------------------------------------------------------------------------


async def test_a_new_principal_is_not_judged_before_its_warm_up() -> None:
    clock, registry, hook = FakeClock(START), fresh_registry(), Hook()
    detector = UsageAnomalyDetector(
        clock=clock, registry=registry, on_anomaly=hook, warmup_windows=5, flush_interval=WINDOW
    )
    newcomer, fresh_token = "iss newcomer", "iss brand-new-token"
    # Ten times its rate in its fourth window, and a fresh token that floods from the start.
    counts = [40, 40, 40, 400, 40, 40]
    for n in counts:
        traffic = {newcomer: (n, 0), fresh_token: (5000, 0)}
        assert await run_window(clock, traffic, detector) == []
        assert detector.flagged(newcomer) == detector.flagged(fresh_token) == frozenset()
    assert hook.calls == []

    # Past warm-up, the same departure from the same principal is flagged: the warm-up,
    # not the numbers, kept it quiet. (The flood became the fresh token's baseline: a new
    # token is the rate limiter's business, see docs/operations/anomalies.md.)
    for _ in range(10):
        assert await run_window(clock, {newcomer: (40, 0), fresh_token: (5000, 0)}, detector) == []
    found = await run_window(clock, {newcomer: (400, 0), fresh_token: (5000, 0)}, detector)
    assert [(a.principal, a.signal) for a in found] == [(newcomer, "requests")]
    await detector.aclose()


# -- 3. replicas agree through the store ------------------------------------------------------


async def test_a_burst_split_across_replicas_is_flagged_once_on_merged_counts(
    backend: Backend,
) -> None:
    registries = fresh_registry(), fresh_registry()
    hooks = Hook(), Hook()
    first, second = (
        detector_on(backend, registry, on_anomaly=hook)
        for registry, hook in zip(registries, hooks, strict=True)
    )
    assert backend.clock is not None
    clock, principal = backend.clock, "iss spread-over-replicas"

    # The baseline is built by the first replica alone: 40 requests a window.
    for _ in range(10):
        assert await run_window(clock, {principal: (40, 0)}, first, second) == []
    assert second.flagged(principal) == frozenset()

    # 240 in a window (6x), split: each replica sees 120 (3x, under the factor of 5).
    clock.advance(10)
    first.observe(principal, requests=120)
    second.observe(principal, requests=120)
    assert await first.flush() == []  # the store holds 120 so far: not a departure
    found = await second.flush()  # now 240: flagged, by the replica that saw the merge
    assert [(a.principal, a.signal, a.observed) for a in found] == [
        (principal, "requests", 240.0)
    ]
    # A baseline the second replica never observed itself: it lives in the store.
    assert found[0].baseline == pytest.approx(40)
    assert hooks[1].calls == found

    # The other replica gets the verdict with its next flush of that principal, and agrees
    # without announcing it a second time.
    first.observe(principal, requests=1)
    assert await first.flush() == []
    assert first.flagged(principal) == second.flagged(principal) == {"requests"}
    assert hooks[0].calls == []
    assert [anomalies(r, "requests") for r in registries] == [0, 1]
    assert [flagged_gauge(r, "requests") for r in registries] == [0, 1]
    for replica in (first, second):
        await replica.aclose()


@pytest.mark.redis
async def test_the_store_holds_no_principal_and_every_key_expires(
    redis_backend: Backend,
) -> None:
    backend = redis_backend
    detector = detector_on(backend, fresh_registry(), history_ttl=3600)
    assert backend.clock is not None
    rng = random.Random(3)
    for window in range(3):
        await run_window(backend.clock, steady(window, rng), detector)
    keys = await backend.keys()
    assert len(keys) == len(STEADY_RATES)
    client = next(s for s in backend.stores if isinstance(s, RedisStore)).client
    for key in keys:
        assert key.startswith(f"{backend.prefix}:anomaly:{{anomaly}}:".encode())
        value = await client.get(key)
        assert value is not None
        for principal in STEADY_RATES:
            subject = principal.split()[-1].encode()
            assert subject not in key
            assert subject not in value
    assert all(0 < ttl <= 3_600_000 for ttl in (await backend.ttls()).values())
    await detector.aclose()


@pytest.mark.redis
async def test_the_lua_script_and_its_python_twin_agree(redis_backend: Backend) -> None:
    """The same random flushes (counts, late counts, idle gaps, bursts; callers trusted,
    near the store's clock or far from it) give the same replies from Redis and from a
    memory store whose clock reads Redis' ``TIME``."""
    redis_store = redis_backend.store()
    assert isinstance(redis_store, RedisStore)
    seconds, micros = await redis_store.client.time()
    server = seconds + micros / 1e6
    # A window length that puts Redis' clock mid-window: no boundary is crossed meanwhile.
    window = server / (server // 3600 + 0.5)
    memory = MemoryStore(clock=FakeClock(server))
    rng = random.Random(11)
    keys = [f"anomaly:{{anomaly}}:twin:{i}" for i in range(12)]
    # factor, smoothing, warm-up, floors and TTL (ms) after the window index
    params: list[ScriptArg] = [3.0, 0.25, 2, 5, 100, 86_400_000]
    for now in range(100, 140):
        # trusted whatever its time; near the store's clock; a day away from it
        caller_time, skew = rng.choice(((0.0, -1.0), (server, 30.0), (server - 86_400, 30.0)))
        args: list[ScriptArg] = [now, *params, window, caller_time, skew]
        for _ in keys:
            late = now - rng.choice((1, 1, 2, 3))
            scale = rng.choice((0, 1, 1, 1, 8))
            args += [late, rng.randrange(3) * scale, rng.randrange(500) * scale]
            args += [now, rng.randrange(40) * scale, rng.randrange(9000) * scale]
        if rng.random() < 0.2:
            continue  # an idle window for everyone
        assert await redis_store.run(FLUSH, keys, args) == await memory.run(FLUSH, keys, args)


class SteppedClock:
    """Another replica's clock: ``offset`` seconds from ``base``."""

    def __init__(self, base: Any, offset: float) -> None:
        self.base, self.offset = base, offset

    def time(self) -> float:
        return float(self.base.time()) + self.offset

    def monotonic(self) -> float:
        return float(self.base.monotonic())


async def test_a_replica_with_a_stepped_clock_cannot_blind_the_others() -> None:
    """A replica whose clock jumped a day ahead (or one set a day behind) shares its counts
    in the store's windows: it neither rolls the shared windows forward, which would drop
    every other replica's counts as too late, nor loses its own."""
    clock = FakeClock(START)  # the store's clock, and the honest replica's
    store = MemoryStore(clock=clock, prefix="gs-anomaly-stepped")
    registry, hook = fresh_registry(), Hook()
    honest = UsageAnomalyDetector(
        store=store, clock=clock, registry=registry, flush_interval=WINDOW, on_anomaly=hook
    )
    ahead, behind = (
        UsageAnomalyDetector(
            store=store, clock=SteppedClock(clock, offset), registry=fresh_registry(),
            flush_interval=WINDOW,
        )
        for offset in (86_400.0, -86_400.0)
    )
    principal = "iss seen-by-three-replicas"
    for _ in range(8):
        ahead.observe(principal, requests=5)
        behind.observe(principal, requests=5)
        assert await run_window(clock, {principal: (30, 0)}, honest, ahead, behind) == []
    clock.advance(10)
    honest.observe(principal, requests=400)  # 10x the usual 40 a window
    found = await honest.flush()
    assert [(a.signal, a.observed) for a in found] == [("requests", 400.0)]
    assert found[0].baseline == pytest.approx(40)
    assert found[0].window_start == clock.now - 10
    assert hook.calls == found
    for replica in (honest, ahead, behind):
        await replica.aclose()


class LateStore:
    """A memory store whose scripts run ``delay`` seconds after they are sent (a pool
    wait, a paused Redis): its clock moves on meanwhile."""

    prefix = "gs-anomaly-late"

    def __init__(self, clock: FakeClock, delay: float) -> None:
        self.inner = MemoryStore(clock=clock, prefix=self.prefix)
        self.clock, self.delay = clock, delay

    async def run(self, script: Script, keys: list[str], args: Sequence[ScriptArg]) -> Any:
        self.clock.advance(self.delay)
        return await self.inner.run(script, keys, list(args))


async def test_a_slow_store_is_not_a_skewed_clock() -> None:
    """Counts flushed just before a window ends, to a store that answers a second and a
    half later (in the next window), stay in the window they were counted in."""
    clock = FakeClock(START)
    hook = Hook()
    detector = UsageAnomalyDetector(
        store=LateStore(clock, 1.5), clock=clock, registry=fresh_registry(),  # type: ignore[arg-type]
        flush_interval=WINDOW, on_anomaly=hook,
    )
    principal = "iss slow-store"
    for _ in range(8):
        assert await run_window(clock, {principal: (40, 0)}, detector) == []
    burst_window = clock.now
    clock.advance(59)
    detector.observe(principal, requests=400)
    found = await detector.flush()
    assert [(a.observed, a.window_start) for a in found] == [(400.0, burst_window)]
    await detector.aclose()


@pytest.mark.redis
async def test_on_redis_a_stepped_replica_counts_in_the_servers_window(
    redis_backend: Backend,
) -> None:
    """Redis' ``TIME`` decides the windows of a replica whose clock is a day off; replicas
    on time keep their own windows (as close to the server's as the clocks are)."""
    store = redis_backend.store()
    assert isinstance(store, RedisStore)
    wall = SteppedClock(SYSTEM, 0.0)
    replicas = [
        UsageAnomalyDetector(
            store=store, clock=SteppedClock(SYSTEM, offset), registry=fresh_registry(),
            max_clock_skew=5.0,
        )
        for offset in (0.0, 86_400.0, -86_400.0)
    ]
    principal = "iss stepped-on-redis"
    for requests, replica in zip((7, 11, 13), replicas, strict=True):
        replica.observe(principal, requests=requests)
        await replica.flush()
    [key] = await redis_backend.keys()
    raw = await store.client.get(key)
    assert raw is not None
    w, ar, _at, br, _bt, *_ = (float(v) for v in raw.split())
    seconds, _ = await store.client.time()
    assert int(seconds // WINDOW) - 1 <= w <= int(wall.time() // WINDOW) + 1
    assert ar + br == 7 + 11 + 13  # nothing dropped as too late, nothing in a far window
    for replica in replicas:
        await replica.aclose()


# -- 4. bounded memory ------------------------------------------------------------------------


def test_local_state_stays_within_max_principals() -> None:
    registry = fresh_registry()
    detector = UsageAnomalyDetector(
        clock=FakeClock(START), registry=registry, max_principals=1000
    )
    tracemalloc.start()
    try:
        for i in range(1000):
            detector.observe(f"iss user-{i}", tokens=10)
        baseline, _ = tracemalloc.get_traced_memory()
        for i in range(1000, 100_000):
            detector.observe(f"iss user-{i}", tokens=10)
            if i % 997 == 0:
                assert detector.tracked <= 1000
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert detector.tracked == 1000
    # 99,000 more principals held would take tens of megabytes.
    assert grown < 256 * 1024
    assert sample(registry, "gemini_scale_usage_anomaly_evictions_total") == 99_000
    # The least recently seen went first: the newest ones are still counted.
    assert detector.flagged("iss user-99999") == frozenset()
    assert detector.tracked == 1000


# -- 5. store failures ------------------------------------------------------------------------


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound (so no server started meanwhile takes it) but not listening."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        yield refusing.getsockname()[1]


async def test_a_dead_redis_never_reaches_the_caller(
    refusing_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gemini_scale.anomaly")
    store = RedisStore.from_url(
        f"redis://127.0.0.1:{refusing_port}/0", prefix="gs-anomaly-dead",
        socket_timeout=0.1, connect_timeout=0.1,
    )
    registry = fresh_registry()
    detector = UsageAnomalyDetector(
        store=store, clock=FakeClock(START), registry=registry, flush_interval=WINDOW
    )
    try:
        for attempt in (1, 2):
            detector.observe("iss someone", requests=3, tokens=900)
            started = time.perf_counter()
            assert await detector.flush() == []
            assert time.perf_counter() - started < 2.0
            errors = sample(registry, "gemini_scale_store_errors_total", area="anomaly")
            assert errors == attempt
        detector.observe("iss someone-else")  # still counting
        assert detector.tracked == 2
        store_warnings = [r for r in caplog.records if "store failed" in r.getMessage()]
        assert len(store_warnings) == 1  # at most once a minute
    finally:
        await detector.aclose()
        await store.aclose()


class FlakyStore:
    """A shared store (what the detector sees as Redis) that fails while ``down`` and yields
    to the event loop on every call, as a network store does."""

    prefix = "flaky"

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemoryStore(clock=clock, prefix=self.prefix)
        self.down = False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("Redis is unavailable (test)")
        return await self.inner.run(script, keys, args)


async def test_during_a_store_outage_counts_are_kept_and_judged_locally() -> None:
    clock, registry, hook = FakeClock(START), fresh_registry(), Hook()
    store = FlakyStore(clock)
    detector = UsageAnomalyDetector(
        store=store, clock=clock, registry=registry, on_anomaly=hook,  # type: ignore[arg-type]
        flush_interval=WINDOW,
    )
    principal = "iss during-outage"
    for _ in range(10):
        assert await run_window(clock, {principal: (40, 0)}, detector) == []

    store.down = True
    clock.advance(10)
    detector.observe(principal, requests=400)
    found = await detector.flush()  # judged here, against the last baseline it saw
    assert [(a.signal, a.observed) for a in found] == [("requests", 400.0)]
    assert detector.flagged(principal) == {"requests"}
    assert sample(registry, "gemini_scale_store_errors_total", area="anomaly") == 1

    store.down = False
    clock.advance(10)
    assert await detector.flush() == []  # the kept 400 reach the store: flagged there too
    assert detector.flagged(principal) == {"requests"}
    assert anomalies(registry, "requests") == 1  # announced once, not again on recovery
    assert len(hook.calls) == 1
    assert flagged_gauge(registry, "requests") == 1
    await detector.aclose()


# -- 6. hooks ---------------------------------------------------------------------------------


def quick(clock: FakeClock, registry: CollectorRegistry, **options: Any) -> UsageAnomalyDetector:
    """A detector that flags anyone above 2 requests in a window (no warm-up, no history)."""
    return UsageAnomalyDetector(
        clock=clock, registry=registry, factor=2, warmup_windows=0, min_requests=1,
        **options,
    )


def raising_sync(anomaly: Anomaly) -> None:
    raise RuntimeError("hook broke")


async def raising_async(anomaly: Anomaly) -> None:
    await asyncio.sleep(0)
    raise RuntimeError("hook broke")


@pytest.mark.parametrize("hook", [raising_sync, raising_async], ids=["sync", "async"])
async def test_a_failing_hook_is_logged_never_raised(
    hook: Callable[[Anomaly], object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gemini_scale.anomaly")
    registry = fresh_registry()
    detector = quick(FakeClock(START), registry, on_anomaly=hook, flush_interval=WINDOW)
    detector.observe("iss p", requests=5)
    found = await detector.flush()
    assert [a.principal for a in found] == ["iss p"]
    assert anomalies(registry, "requests") == 1
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "on_anomaly hook failed" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    await detector.aclose()


async def test_an_async_hook_is_awaited() -> None:
    seen: list[Anomaly] = []

    async def hook(anomaly: Anomaly) -> None:
        await asyncio.sleep(0)
        seen.append(anomaly)

    detector = quick(FakeClock(START), fresh_registry(), on_anomaly=hook, flush_interval=WINDOW)
    detector.observe("iss p", requests=5)
    assert await detector.flush() == seen
    assert len(seen) == 1
    await detector.aclose()


# -- background flushing ----------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def test_observing_on_a_running_loop_starts_background_flushes() -> None:
    hook = Hook()
    detector = quick(FakeClock(START), fresh_registry(), on_anomaly=hook, flush_interval=0.02)
    detector.observe("iss background", requests=5)
    await eventually(lambda: len(hook.calls) == 1)
    # aclose flushes once more: what was observed just before it is judged.
    detector.observe("iss last-moment", requests=5)
    await detector.aclose()
    assert [a.principal for a in hook.calls] == ["iss background", "iss last-moment"]


async def test_start_is_idempotent_and_aclose_stops_flushing() -> None:
    flushes: list[None] = []

    class Counting(UsageAnomalyDetector):
        async def flush(self) -> list[Anomaly]:
            flushes.append(None)
            return await super().flush()

    detector = Counting(clock=FakeClock(START), registry=fresh_registry(), flush_interval=0.01)
    detector.start()
    detector.start()
    await eventually(lambda: len(flushes) >= 3)
    await detector.aclose()
    after = len(flushes)
    await asyncio.sleep(0.05)
    assert len(flushes) == after


# -- configuration and metrics registration ---------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"factor": 1.0}, {"window": 0}, {"smoothing": 0}, {"max_principals": 0},
     {"min_requests": 0}, {"history_ttl": 60.0},
     {"window": 10, "flush_interval": 30}],  # windows would be dropped between flushes
)
def test_bad_configuration_is_refused_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        UsageAnomalyDetector(registry=fresh_registry(), **options)


async def test_detectors_share_their_registry_and_the_store_error_family() -> None:
    registry = fresh_registry()
    # The metrics middleware made its families first; another area counted an error.
    families(registry).store_errors.labels(area="cache").inc()
    clock = FakeClock(START)
    store = FlakyStore(clock)
    made = [
        quick(clock, registry, store=store, flush_interval=WINDOW)
        for _ in range(2)
    ]
    for i, detector in enumerate(made):
        detector.observe(f"iss {i}", requests=5)
        await detector.flush()
    assert anomalies(registry, "requests") == 2
    store.down = True
    for detector in made:
        detector.observe("iss again")
        await detector.flush()
    assert sample(registry, "gemini_scale_store_errors_total", area="anomaly") == 2
    assert sample(registry, "gemini_scale_store_errors_total", area="cache") == 1
    store.down = False
    for detector in made:
        await detector.aclose()


async def test_a_principal_evicted_while_flagged_is_counted_again_when_it_comes_back(
    backend: Backend,
) -> None:
    assert backend.clock is not None
    registry = fresh_registry()
    detector = detector_on(backend, registry, max_principals=3)
    principal = "iss evicted-while-flagged"
    for _ in range(8):
        await run_window(backend.clock, {principal: (40, 0)}, detector)
    detector.observe(principal, requests=1000)
    await detector.flush()
    assert flagged_gauge(registry, "requests") == 1
    for i in range(3):  # three other callers: its entry is evicted
        detector.observe(f"iss other-{i}")
    await detector.flush()
    assert flagged_gauge(registry, "requests") == 0  # it is no longer held here
    detector.observe(principal, requests=1000)  # the burst goes on, same window
    await detector.flush()
    assert detector.flagged(principal) == {"requests"}
    assert flagged_gauge(registry, "requests") == 1
    assert anomalies(registry, "requests") == 1  # the same anomaly, not a new one
    await detector.aclose()
