"""The limiter engine (``RateLimiter``): sliding-window counters, several limits in one
atomic step, settlement, the store-failure modes and the circuit breaker.

Memory runs on a FakeClock placed on a window boundary (``WINDOW_START``), so every
number below is exact; the same atomicity cases run on the machine's Redis (real time,
long windows, assertions within one window only).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gemini_scale import Limit, RateLimiter
from gemini_scale.errors import StoreUnavailableError
from gemini_scale.ratelimit import engine as engine_module
from gemini_scale.ratelimit.engine import StoreFailureError
from gemini_scale.stores import MemoryStore, RedisStore, Script
from gemini_scale.stores.base import ScriptArg
from tests.clock import FakeClock
from tests.ratelimit.conftest import Backend
from tests.ratelimit.helpers import WINDOW_START, probe

REQUESTS = Limit("requests", 10, 60)
TOKENS = Limit("tokens", 1000, 60)
# Tests that also run on Redis (real time) use hour windows, so a window boundary almost
# never falls inside a test, and compare weighted counts approximately.
HOURLY_REQUESTS = Limit("requests", 10, 3600)
HOURLY_TOKENS = Limit("tokens", 1000, 3600)


def about(**counts: float) -> dict[str, Any]:
    return {kind: pytest.approx(value, abs=0.01) for kind, value in counts.items()}


def limiter_on(backend: Backend, **options: Any) -> RateLimiter:
    clock = backend.clock or FakeClock()  # on Redis the clock only drives the breaker
    return RateLimiter(backend.store(), clock=clock, **options)


async def admitted(limiter: RateLimiter, tag: str, limits: Sequence[Limit], n: int) -> int:
    """How many of ``n`` sequential one-unit requests pass."""
    count = 0
    for _ in range(n):
        decision = await limiter.acquire(tag, limits, [1] * len(limits))
        count += decision.allowed
    return count


# -- B01: exact under in-process concurrency ------------------------------------------------


async def test_b01_exactly_the_limit_passes_under_concurrency(backend: Backend) -> None:
    """(10 per 60 s through HTTP is in test_catalogue.py; an hour here so the probe after
    the burst never straddles a window boundary on Redis.)"""
    limiter = limiter_on(backend, on_store_error="closed")
    decisions = await asyncio.gather(
        *(limiter.acquire("p", [HOURLY_REQUESTS], [1]) for _ in range(200))
    )
    assert sum(d.allowed for d in decisions) == 10
    assert all(not d.degraded for d in decisions)
    # Refused requests were charged nothing: the bucket holds exactly the 10 admitted.
    assert await probe(limiter, "p", [HOURLY_REQUESTS]) == about(requests=10)


# -- B03: no debt after a rejected burst -------------------------------------------------------


async def test_b03_rejected_attempts_are_not_charged() -> None:
    clock = FakeClock(WINDOW_START)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    control = "control"  # the same admitted traffic, without the rejected burst
    assert await admitted(limiter, "p", [REQUESTS], 10) == 10
    assert await admitted(limiter, control, [REQUESTS], 10) == 10
    assert await admitted(limiter, "p", [REQUESTS], 1000) == 0
    assert (await probe(limiter, "p", [REQUESTS]))["requests"] == 10  # not 1010

    # Half a window later the sliding window weighs the previous window at 1/2: 5 fit,
    # for the flooded bucket exactly as for the control.
    clock.advance(90)
    assert await admitted(limiter, "p", [REQUESTS], 20) == 5
    assert await admitted(limiter, control, [REQUESTS], 20) == 5
    # Two windows after the burst nothing of it is left: the whole limit is there again.
    clock.advance(90)
    assert await admitted(limiter, "p", [REQUESTS], 20) == 10


# -- B04 (engine part): Retry-After is truthful --------------------------------------------


@pytest.mark.parametrize("offset", [6.0, 30.0, 59.0])
async def test_b04_retry_after_is_truthful_and_within_the_window(offset: float) -> None:
    """A burst that exhausts the limit ``offset`` s into a window: the wait is what the
    sliding window needs (the previous window must decay to 9/10), at most one window
    here, and exact: one second earlier is still refused."""
    clock = FakeClock(WINDOW_START + offset)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    assert await admitted(limiter, "p", [REQUESTS], 10) == 10
    refused = await limiter.acquire("p", [REQUESTS], [1])
    assert not refused.allowed
    wait = refused.retry_after
    assert wait == math.ceil(60 - offset + 6)  # to the next window, plus 1/10 of it
    assert 1 <= wait <= 60
    clock.advance(wait - 1)
    assert not (await limiter.acquire("p", [REQUESTS], [1])).allowed
    clock.advance(1)
    assert (await limiter.acquire("p", [REQUESTS], [1])).allowed


async def test_b04_retry_after_after_a_burst_at_a_window_start_exceeds_the_window() -> None:
    """Pinned property of the sliding-window counter (not of a fixed window): a burst in
    the first tenth of a window counts almost fully in the next window too, so the
    truthful wait is longer than one window (here 66 s for 60 s), never two."""
    clock = FakeClock(WINDOW_START)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    assert await admitted(limiter, "p", [REQUESTS], 10) == 10
    wait = (await limiter.acquire("p", [REQUESTS], [1])).retry_after
    assert wait == 66
    assert 60 < wait < 120
    clock.advance(65)
    assert not (await limiter.acquire("p", [REQUESTS], [1])).allowed
    clock.advance(1)
    assert (await limiter.acquire("p", [REQUESTS], [1])).allowed


# -- B05: the window edge ---------------------------------------------------------------------


async def test_b05_sliding_window_counter_at_the_window_edge() -> None:
    """N = 10 per 60 s. 10 requests at t = 59.9 s, then 10 at t = 60.1 s.

    A fixed window would admit 2N = 20 across the edge. The sliding-window counter weighs
    the previous window by its unelapsed share: at 60.1 s that is 59.9/60, so
    10 * 0.99833 + 1 > 10 and nothing more passes (10 in total). At 66 s the weight is
    0.9 (one fits), at 90 s 0.5 (five fit in the window so far).
    """
    clock = FakeClock(WINDOW_START + 59.9)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    assert await admitted(limiter, "p", [REQUESTS], 10) == 10
    clock.advance(0.2)  # t = 60.1 s: the next fixed window
    assert await admitted(limiter, "p", [REQUESTS], 10) == 0
    clock.advance(5.9)  # t = 66 s
    assert await admitted(limiter, "p", [REQUESTS], 10) == 1
    clock.advance(24)  # t = 90 s: 10 * 0.5 + 1 already charged
    assert await admitted(limiter, "p", [REQUESTS], 10) == 4
    clock.advance(60)  # t = 150 s: only this window's 5 count, at weight 0.5
    assert await admitted(limiter, "p", [REQUESTS], 10) == 7


# -- B12: bounded memory ----------------------------------------------------------------------


async def test_b12_many_principals_stay_bounded_and_recent_ones_stay_exact() -> None:
    clock = FakeClock(WINDOW_START)
    store = MemoryStore(clock=clock, max_keys=1000)
    limiter = RateLimiter(store, clock=clock)
    limit = [Limit("requests", 3, 60)]
    for n in range(20_000):
        assert (await limiter.acquire(f"p{n}", limit, [1])).allowed
        assert len(store) <= 1000
    # The 500 most recent principals are still counted exactly: 2 more each, then refused.
    for n in range(19_500, 20_000):
        assert await admitted(limiter, f"p{n}", limit, 3) == 2
    assert len(store) <= 1000
    # Documented: an evicted key starts fresh (fails open for that key only).
    assert await admitted(limiter, "p0", limit, 5) == 3


# -- B21: cost-weighted limits ----------------------------------------------------------------


async def test_b21_a_cost_above_the_whole_limit_is_refused_and_charges_nothing(
    backend: Backend,
) -> None:
    limiter = limiter_on(backend, on_store_error="closed")
    limits = [HOURLY_REQUESTS, HOURLY_TOKENS]
    decision = await limiter.acquire("p", limits, [1, 1001])
    assert not decision.allowed
    assert decision.reservation is None
    assert [s.limit.kind for s in decision.violated] == ["tokens"]
    assert decision.retry_after == 3600  # never fits: the window, not infinity
    assert await probe(limiter, "p", limits) == about(requests=0, tokens=0)
    # All or nothing: the requests limit, which the request fitted, was not charged either.
    assert (await limiter.acquire("p", limits, [1, 1000])).allowed
    assert await probe(limiter, "p", limits) == about(requests=1, tokens=1000)


async def test_b21_of_two_concurrent_requests_over_what_remains_exactly_one_passes(
    backend: Backend,
) -> None:
    limiter = limiter_on(backend, on_store_error="closed")
    tokens = [Limit("tokens", 100, 3600)]
    assert (await limiter.acquire("p", tokens, [40])).allowed
    for _ in range(5):  # 60 remain; 40 + 40 do not fit together
        first, second = await asyncio.gather(
            limiter.acquire("p", tokens, [40]), limiter.acquire("p", tokens, [40])
        )
        assert first.allowed != second.allowed
        winner = first if first.allowed else second
        await limiter.settle(winner.reservation, [-40])  # refund: 60 remain again
    assert await probe(limiter, "p", tokens) == about(tokens=40)


async def test_all_limits_of_a_request_are_checked_and_charged_together(
    backend: Backend,
) -> None:
    limiter = limiter_on(backend, on_store_error="closed")
    limits = [HOURLY_REQUESTS, Limit("requests", 2, 600), HOURLY_TOKENS]
    keys = limiter.keys("p", limits)
    assert len(set(keys)) == 3  # one key per limit
    assert await admitted(limiter, "p", limits, 4) == 2  # the 2 per 600 s limit binds first
    refused = await limiter.acquire("p", limits, [1, 1, 1])
    assert [s.limit.window for s in refused.violated] == [600]
    assert await probe(limiter, "p", limits) == about(requests=2, tokens=2)


# -- settlement ---------------------------------------------------------------------------


async def test_settle_moves_a_reservation_to_the_real_usage_and_never_below_zero(
    backend: Backend,
) -> None:
    limiter = limiter_on(backend, on_store_error="closed")
    tokens = [HOURLY_TOKENS]
    decision = await limiter.acquire("p", tokens, [300])
    await limiter.settle(decision.reservation, [45 - 300])
    assert await probe(limiter, "p", tokens) == about(tokens=45)
    await limiter.settle(decision.reservation, [-1000])  # a refund larger than the count
    assert await probe(limiter, "p", tokens) == about(tokens=0)
    await limiter.settle(None, [5])  # a refused request has nothing to settle
    assert await probe(limiter, "p", tokens) == about(tokens=0)


async def test_costs_and_deltas_may_be_any_iterable(backend: Backend) -> None:
    """Generators are read once into a tuple: charged, reported and settled as lists are."""
    limiter = limiter_on(backend, on_store_error="closed")
    limits = [HOURLY_REQUESTS, HOURLY_TOKENS]
    decision = await limiter.acquire("g", limits, (cost for cost in (1, 300)))
    assert decision.allowed
    assert [state.used for state in decision.states] == [1, 300]
    await limiter.settle(decision.reservation, (delta for delta in (0, -255)))
    assert await probe(limiter, "g", limits) == about(requests=1, tokens=45)
    if limiter.synchronous:
        now = limiter.acquire_now("g", limits, iter([1, 5]))
        assert limiter.settle_now(now.reservation, iter([0, -5]))
        assert await probe(limiter, "g", limits) == about(requests=2, tokens=45)


async def test_a_reservation_settled_after_its_window_rolled_moves_the_previous_count() -> None:
    clock = FakeClock(WINDOW_START + 30)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    tokens = [Limit("tokens", 1000, 60)]
    long_call = await limiter.acquire("p", tokens, [800])
    clock.advance(45)  # t = 75 s: the reservation now sits in the previous window
    await limiter.acquire("p", tokens, [100])
    await limiter.settle(long_call.reservation, [200 - 800])
    # previous 200 weighted by 45/60, plus this window's 100
    assert (await probe(limiter, "p", tokens))["tokens"] == pytest.approx(200 * 0.75 + 100)
    clock.advance(60)  # two windows later the old reservation has left: settling is a no-op
    await limiter.settle(long_call.reservation, [-200])
    assert (await probe(limiter, "p", tokens))["tokens"] == pytest.approx(100 * 0.75)


async def test_a_settlement_after_its_windows_expired_counts_nowhere() -> None:
    """A settlement that comes after its windows expired finds nothing to move: the late
    usage counts nowhere, and the bucket's budget is whole again."""
    clock = FakeClock(WINDOW_START + 30)
    store = MemoryStore(clock=clock)
    limiter = RateLimiter(store, clock=clock)
    tokens = [Limit("tokens", 1000, 60)]
    call = limiter.acquire_now("p", tokens, [800])
    clock.advance(150)  # past the end of the window after it: the count has expired
    assert limiter.settle_now(call.reservation, [150])  # a late, larger real usage
    assert (await probe(limiter, "p", tokens))["tokens"] == 0
    assert limiter.acquire_now("p", tokens, [1000]).allowed


def test_the_store_key_memo_stays_bounded_and_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many buckets in two budgets (limits, scope): the memo of their store keys is emptied
    at its bound, and every bucket still counts in its own keys."""
    monkeypatch.setattr(engine_module, "_KEYS_CACHE_SIZE", 8)
    clock = FakeClock(WINDOW_START)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    limits = (Limit("requests", 5, 60),)
    routed = (Limit("requests", 4, 60),)
    for _ in range(3):
        for i in range(20):
            assert limiter.acquire_now(f"t{i}", limits, [1]).allowed
            assert limiter.acquire_now(f"t{i}", routed, [1], scope="r").allowed
    held = sum(len(by_tag) for _, by_tag in limiter._keys.values())
    assert 0 < held <= 8
    for i in range(20):  # 3 counted in each: 2 more fit the first, 1 the second
        assert limiter.acquire_now(f"t{i}", limits, [2]).allowed
        assert not limiter.acquire_now(f"t{i}", limits, [1]).allowed
        assert limiter.acquire_now(f"t{i}", routed, [1], scope="r").allowed
        assert not limiter.acquire_now(f"t{i}", routed, [1], scope="r").allowed


async def test_a_settlement_after_the_clock_stepped_back_moves_a_live_window() -> None:
    """The clock is read for every settlement: after the wall clock stepped back (NTP), a
    window that is live at the time now read is settled, never taken for expired."""
    clock = FakeClock(WINDOW_START + 30)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    tokens = [Limit("tokens", 1000, 60)]
    call = limiter.acquire_now("a", tokens, [800])  # kept until WINDOW_START + 120
    clock.now = WINDOW_START + 130
    limiter.acquire_now("b", tokens, [1])  # the store last read the clock at +130
    clock.now = WINDOW_START + 50  # stepped back
    assert limiter.settle_now(call.reservation, [-300])
    assert (await probe(limiter, "a", tokens))["tokens"] == 500


# -- store failures ---------------------------------------------------------------------------


class FlakyStore:
    """A shared store (what the limiter sees as Redis) that fails while ``down``, yields to
    the event loop on every call (as a network store does) and counts its calls."""

    prefix = "flaky"

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemoryStore(clock=clock, prefix=self.prefix)
        self.down = True
        self.calls = 0

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailableError("Redis is unavailable (test)")
        return await self.inner.run(script, keys, args)


def flaky_limiter(mode: str, clock: FakeClock) -> tuple[RateLimiter, FlakyStore]:
    store = FlakyStore(clock)
    limiter = RateLimiter(store, on_store_error=mode, clock=clock)  # type: ignore[arg-type]
    return limiter, store


def degraded_count(mode: str) -> float:
    value = REGISTRY.get_sample_value(
        "gemini_scale_ratelimit_degraded_decisions_total", {"mode": mode}
    )
    return value or 0.0


async def test_local_mode_enforces_the_same_limits_on_this_replica() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, _ = flaky_limiter("local", clock)
    before = degraded_count("local")
    decisions = [await limiter.acquire("p", [REQUESTS], [1]) for _ in range(15)]
    assert sum(d.allowed for d in decisions) == 10
    assert all(d.degraded for d in decisions)
    assert all(d.states for d in decisions)  # local decisions still report the limits
    assert degraded_count("local") == before + 15


async def test_open_mode_admits_everything_without_limit_states() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, _ = flaky_limiter("open", clock)
    decisions = [await limiter.acquire("p", [REQUESTS], [1]) for _ in range(15)]
    assert all(d.allowed and d.degraded and not d.states for d in decisions)


async def test_closed_mode_refuses_with_store_failure() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, _ = flaky_limiter("closed", clock)
    for _ in range(5):  # before and after the breaker opens
        with pytest.raises(StoreFailureError):
            await limiter.acquire("p", [REQUESTS], [1])


async def test_breaker_skips_a_failing_store_then_probes_once_and_recovers() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, store = flaky_limiter("local", clock)
    for _ in range(20):
        await limiter.acquire("p", [REQUESTS], [1])
    assert store.calls == 3  # the threshold; then the store is not called at all
    clock.advance(5.0)  # cooldown over: exactly one caller probes (half-open)
    await asyncio.gather(*(limiter.acquire("p", [REQUESTS], [1]) for _ in range(10)))
    assert store.calls == 4
    clock.advance(5.0)
    store.down = False  # the store is back: the probe succeeds and closes the breaker
    decision = await limiter.acquire("q", [REQUESTS], [1])
    assert not decision.degraded
    assert store.calls == 5
    assert not (await limiter.acquire("q", [REQUESTS], [1])).degraded
    assert store.calls == 6


async def test_a_failed_settlement_is_logged_never_raised() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, store = flaky_limiter("local", clock)
    store.down = False
    decision = await limiter.acquire("p", [TOKENS], [100])
    store.down = True
    await limiter.settle(decision.reservation, [-100])  # no exception: the charge stands


async def test_failed_settlements_open_the_breaker_as_failed_acquires_do() -> None:
    clock = FakeClock(WINDOW_START)
    limiter, store = flaky_limiter("local", clock)
    store.down = False
    decisions = [await limiter.acquire("p", [TOKENS], [100]) for _ in range(3)]
    store.down = True
    for decision in decisions:  # charges above the reservation: sent at once, and fail
        await limiter.settle(decision.reservation, [50])
    calls = store.calls
    assert (await limiter.acquire("p", [TOKENS], [1])).degraded
    assert store.calls == calls  # the breaker is open: the store is not called


async def test_a_settlement_skipped_while_the_breaker_is_open_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(WINDOW_START)
    limiter, store = flaky_limiter("local", clock)
    store.down = False
    decision = await limiter.acquire("p", [TOKENS], [100])
    store.down = True
    for _ in range(3):
        await limiter.acquire("q", [TOKENS], [1])  # the breaker opens
    calls = store.calls
    with caplog.at_level("WARNING", logger="gemini_scale.ratelimit"):
        await limiter.settle(decision.reservation, [400])
    assert store.calls == calls
    assert any("settlements are not sent" in r.getMessage() for r in caplog.records)


async def test_a_request_that_can_never_fit_is_told_the_longest_window() -> None:
    # Even when another of its limits is exceeded too: waiting that one out would only
    # bring the same refusal (docs/ratelimit.md, "The 429").
    clock = FakeClock(WINDOW_START)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    limits = [Limit("requests", 1, 60), Limit("tokens", 100, 3600)]
    assert (await limiter.acquire("p", limits, [1, 10])).allowed
    refused = await limiter.acquire("p", limits, [1, 500])
    assert not refused.allowed
    assert refused.retry_after == 3600


async def test_a_dead_redis_costs_almost_nothing_per_request_once_the_breaker_opens() -> None:
    """A Redis that accepts connections but never answers: each of the first calls waits
    for the socket timeout; once the breaker is open, requests no longer touch it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # never accepted, never answered
        port = silent.getsockname()[1]
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{port}/0", prefix="gs-rl-dead", socket_timeout=0.1,
            connect_timeout=0.1,
        )
        limiter = RateLimiter(store, on_store_error="local")
        try:
            for _ in range(3):  # the breaker threshold, each bounded by the timeout
                started = time.perf_counter()
                assert (await limiter.acquire("p", [REQUESTS], [1])).degraded
                assert time.perf_counter() - started < 2.0  # bounded by the 0.1 s timeout
            started = time.perf_counter()
            decisions = [await limiter.acquire("p", [REQUESTS], [1]) for _ in range(50)]
            elapsed = time.perf_counter() - started
        finally:
            await store.aclose()
    # 50 requests; without the breaker each would wait for the 0.1 s timeout (5 s in all).
    # Generous for a loaded machine: measured in milliseconds.
    assert elapsed < 2.0
    assert sum(d.allowed for d in decisions) == 7  # still limited locally: 10 - 3


async def test_on_store_error_is_validated() -> None:
    with pytest.raises(ValueError, match="on_store_error"):
        RateLimiter(MemoryStore(), on_store_error="ignore")  # type: ignore[arg-type]



# -- refunds to a shared store ride on the bucket's next acquire ------------------------------


async def _stored_count(backend: Backend, key_suffix: str) -> int:
    """The current window's count of the one key of this test ending with ``key_suffix``."""
    store = backend.stores[0]
    assert isinstance(store, RedisStore)
    key = next(k for k in await backend.keys() if k.endswith(key_suffix.encode()))
    return int(await store.client.hget(key, "c") or 0)


async def test_a_refund_rides_on_the_buckets_next_acquire(redis_backend: Backend) -> None:
    limiter = limiter_on(redis_backend, on_store_error="closed", refund_delay=3600)
    tokens = [HOURLY_TOKENS]
    decision = await limiter.acquire("p", tokens, [100])
    await limiter.settle(decision.reservation, [-60])
    assert await _stored_count(redis_backend, ":tokens-3600s") == 100  # owed, not yet sent
    store = redis_backend.stores[0]
    calls: list[int] = []
    original = store.run

    async def counted(script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        calls.append(len(keys))
        return await original(script, keys, args)

    store.run = counted  # type: ignore[method-assign]
    assert await probe(limiter, "p", tokens) == about(tokens=40)  # applied before the check
    assert calls == [2]  # one script: the limit's key and the refunded key
    assert await _stored_count(redis_backend, ":tokens-3600s") == 40
    await probe(limiter, "p", tokens)
    assert calls == [2, 1]  # nothing owed any more


async def test_charges_above_the_reservation_are_sent_at_once(redis_backend: Backend) -> None:
    limiter = limiter_on(redis_backend, on_store_error="closed", refund_delay=3600)
    decision = await limiter.acquire("p", [HOURLY_TOKENS], [100])
    await limiter.settle(decision.reservation, [50])  # the answer used more than reserved
    assert await _stored_count(redis_backend, ":tokens-3600s") == 150


async def test_owed_refunds_are_sent_after_the_delay_or_on_close(redis_backend: Backend) -> None:
    limiter = limiter_on(redis_backend, on_store_error="closed", refund_delay=0.05)
    decision = await limiter.acquire("p", [HOURLY_TOKENS], [100])
    await limiter.settle(decision.reservation, [-60])
    deadline = time.monotonic() + 5
    while await _stored_count(redis_backend, ":tokens-3600s") != 40:
        assert time.monotonic() < deadline, "the owed refund was never sent"
        await asyncio.sleep(0.02)
    later = limiter_on(redis_backend, on_store_error="closed", refund_delay=3600)
    decision = await later.acquire("q", [HOURLY_TOKENS], [100])
    await later.settle(decision.reservation, [-30])
    await later.aclose()  # shutdown sends what is still owed
    assert await _stored_count(redis_backend, "{" + _tag_of(later, "q") + "}:tokens-3600s") == 70


async def test_a_bucket_owed_too_many_refunds_sends_them_without_waiting(
    redis_backend: Backend,
) -> None:
    """Past 64 refunds owed to one bucket (long answers settling with no acquire between),
    everything owed goes out in the background at once, not after the delay; the settling
    request itself never waits for it."""
    limiter = limiter_on(redis_backend, on_store_error="closed", refund_delay=3600)
    reservations = [
        (await limiter.acquire("p", [HOURLY_TOKENS], [10])).reservation for _ in range(70)
    ]
    for reservation in reservations:
        assert limiter.settle_now(reservation, [-10])  # deferred: nothing awaited
    deadline = time.monotonic() + 5
    while await _stored_count(redis_backend, ":tokens-3600s") != 0:
        assert time.monotonic() < deadline, "the owed refunds were never sent"
        await asyncio.sleep(0.02)
    await limiter.aclose()


def _tag_of(limiter: RateLimiter, tag: str) -> str:
    key = limiter.keys(tag, [HOURLY_TOKENS])[0]
    return key[key.index("{") + 1 : key.index("}")]


def test_a_refund_timer_armed_on_an_ended_loop_does_not_stop_later_ones(
    machine_redis_url: str,
) -> None:
    """A limiter used from one event loop, then another (``asyncio.run`` per job): the
    second loop's refunds still go out after ``refund_delay``."""
    store = RedisStore.from_url(machine_redis_url, prefix=f"gs-rl-test-{time.time_ns()}")
    limiter = RateLimiter(store, on_store_error="closed", refund_delay=0.05)
    tokens = [HOURLY_TOKENS]

    async def first() -> None:
        decision = await limiter.acquire("a", tokens, [900])
        await limiter.settle(decision.reservation, [-800])  # a timer on this loop...
        await store.aclose()  # ...which ends before it fires (its refund is lost with it)

    async def second() -> None:
        decision = await limiter.acquire("b", tokens, [900])
        await limiter.settle(decision.reservation, [-800])
        await _counts_until(store, limiter.keys("b", tokens)[0], 100, "the second loop's refund")

    asyncio.run(first())
    asyncio.run(_then_clean_up(store, second()))


async def _counts_until(store: RedisStore, key: str, expected: int, what: str) -> None:
    """Wait (at most 5 s) until the window ``key`` counts ``expected``."""
    deadline = time.monotonic() + 5
    while int(await store.client.hget(store.prefix + ":" + key, "c") or 0) != expected:
        assert time.monotonic() < deadline, f"{what} was never sent"
        await asyncio.sleep(0.02)


async def _then_clean_up(store: RedisStore, job: Any) -> None:
    """Run ``job`` on a loop after the store's first one ended, then remove the test's keys
    and close what this loop opened (the first loop's aclose() released what the store owns;
    the kept connections of this one are left)."""
    try:
        await job
    finally:
        async for found in store.client.scan_iter(match=f"{store.prefix}:*"):
            await store.client.delete(found)
        await store.client.connection_pool.disconnect()


def test_a_flush_cancelled_with_its_loop_does_not_stop_later_ones(
    machine_redis_url: str,
) -> None:
    """A background flush scheduled as one loop ends never runs; on the next loop, a bucket
    owed too many refunds still gets them sent at once (not never, nor after the delay)."""
    store = RedisStore.from_url(machine_redis_url, prefix=f"gs-rl-test-{time.time_ns()}")
    limiter = RateLimiter(store, on_store_error="closed", refund_delay=3600)
    tokens = [HOURLY_TOKENS]

    async def first() -> None:
        decision = await limiter.acquire("a", tokens, [10])
        assert limiter.settle_now(decision.reservation, [-10])
        await store.aclose()
        asyncio.get_running_loop().call_soon(limiter._refund_due)  # as the loop stops

    async def second() -> None:
        reservations = [(await limiter.acquire("b", tokens, [10])).reservation
                        for _ in range(70)]
        for reservation in reservations:
            assert limiter.settle_now(reservation, [-10])
        await _counts_until(store, limiter.keys("b", tokens)[0], 0, "the owed refunds")

    asyncio.run(first())
    asyncio.run(_then_clean_up(store, second()))


class _StallingStore(RedisStore):
    """A ``RedisStore`` whose script calls, while ``stall`` is set, wait for good first."""

    stall = False
    stalled = False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        if self.stall:
            self.stalled = True
            await asyncio.Event().wait()  # nobody sets it
        return await super().run(script, keys, args)


def _window_count(store: RedisStore, key: str) -> Any:
    return store.client.hget(store.prefix + ":" + key, "c")


def test_a_flush_left_unfinished_by_an_ended_loop_loses_only_its_bucket_in_flight(
    machine_redis_url: str,
) -> None:
    """A loop closed without running its tasks to the end (``run_until_complete``, then
    ``close``) leaves a refund flush stuck in its first bucket's call. The next loop's
    ``aclose()`` does not fail on it, and sends the other buckets' refunds; the one in
    flight stands (it may have reached the store: sending it again could refund twice)."""
    store = _StallingStore.from_url(machine_redis_url, prefix=f"gs-rl-test-{time.time_ns()}")
    limiter = RateLimiter(store, on_store_error="closed", refund_delay=3600)
    tokens = [HOURLY_TOKENS]

    async def first() -> None:
        for tag in "abc":
            decision = await limiter.acquire(tag, tokens, [10])
            assert limiter.settle_now(decision.reservation, [-10])  # owed, deferred
        await store.aclose()
        store.stall = True
        limiter._refund_due()  # the timer fires: a flush task starts...
        for _ in range(100):
            if store.stalled:
                break
            await asyncio.sleep(0)
        assert store.stalled  # ...and waits in its first bucket's call as the loop ends

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
    finally:
        loop.close()
    store.stall = False

    async def second() -> None:
        await limiter.aclose()
        counts = [int(await _window_count(store, limiter.keys(tag, tokens)[0]) or 0)
                  for tag in "abc"]
        assert counts == [10, 0, 0]

    asyncio.run(_then_clean_up(store, second()))


def test_settle_now_outside_an_event_loop_leaves_the_refund_to_settle(
    machine_redis_url: str,
) -> None:
    """With no running loop a refund cannot be deferred: ``settle_now`` says so (``False``)
    and owes nothing, so ``settle`` refunds it exactly once."""
    store = RedisStore.from_url(machine_redis_url, prefix=f"gs-rl-test-{time.time_ns()}")
    limiter = RateLimiter(store, on_store_error="closed", refund_delay=3600)
    tokens = [HOURLY_TOKENS]
    key = limiter.keys("p", tokens)[0]

    async def reserve() -> Any:
        await limiter.acquire("p", tokens, [10])
        reservation = (await limiter.acquire("p", tokens, [10])).reservation
        await store.aclose()
        return reservation

    reservation = asyncio.run(reserve())
    assert limiter.settle_now(reservation, [-10]) is False

    async def settle_then_acquire() -> None:
        await limiter.settle(reservation, [-10])
        await limiter.acquire("p", tokens, [5])  # would carry a refund owed twice
        assert int(await _window_count(store, key) or 0) == 15

    asyncio.run(_then_clean_up(store, settle_then_acquire()))


def test_the_memory_twin_rounds_the_sliding_window_as_the_lua_does() -> None:
    """At an exact boundary ``prev * (x / window)`` and ``prev * x / window`` differ; the twin
    must refuse exactly when Redis does (the case found: a window pushed past its limit)."""
    from gemini_scale.ratelimit.scripts import ACQUIRE

    window_ms = 60_000
    now_ms = 1_800_000_000_000 + (window_ms - 43_520)  # 43,520 ms left in the window
    index = now_ms // window_ms
    store = MemoryStore(clock=FakeClock(now_ms / 1000))
    store.run_now(ACQUIRE, ["k"], [10**9, window_ms, 0])  # create the key
    key = store.prefix + ":k"
    store._state.put(key, [index, 116_904, 1_216_125], None)
    raw = store.run_now(ACQUIRE, ["k"], [1_000_000, window_ms, 1000])
    weight = (window_ms - (now_ms - index * window_ms)) / window_ms
    expected = 0 if 1_216_125 * weight + 116_904 + 1000 > 1_000_000 else 1
    assert raw[0] == expected == 0


@pytest.mark.parametrize("amount", [2**53 + 1, 2**53 + 3])
async def test_the_tightest_limit_counts_what_is_left_exactly_as_its_state_does(
    amount: int,
) -> None:
    """``tightest()`` (the RateLimit header's ``r``) and ``states`` agree, for any amount a
    policy parses (``9007199254740993/minute`` is accepted), in either build: both count in
    floats (as Redis's Lua does), so past 2**53 what is left is rounded alike."""
    clock = FakeClock(WINDOW_START)
    limiter = RateLimiter(MemoryStore(clock=clock), clock=clock)
    limits = (Limit("tokens", amount, 60),)
    decision = await limiter.acquire("exact", limits, (1,))
    tightest = decision.tightest()
    assert tightest is not None
    assert tightest[1] == decision.states[0].remaining == math.floor(float(amount) - 1.0 + 1e-9)
