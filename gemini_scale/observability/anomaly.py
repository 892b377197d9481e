"""Usage anomalies: each principal's request and token rates against its own moving baseline.

The detector counts every finished request per principal in fixed windows of ``window``
seconds (``observe``: no I/O), and every ``flush_interval`` seconds merges the counts of all
replicas in the store with one script call (per 100 principals), which also keeps each
principal's baselines and judges it there, so every replica sees the same counts and a flag
is raised once, by one replica, however many replicas the traffic was spread over.

The rule, per principal and signal (requests, tokens):

- a window's *baseline* is an exponentially weighted moving average of the principal's counts
  in its past **active** windows (idle windows are skipped: the baseline is the rate while
  active, so a principal coming back after a night's pause is not a burst); the first windows
  are averaged, then the newest closed window weighs ``smoothing``;
- a window joins the baseline only once it is two windows old, so the windows being judged
  never vouch for themselves, and past warm-up it joins with its count capped at ``factor``
  times the baseline, so a burst cannot teach the baseline its own level in one window;
- the principal is flagged when, after ``warmup_windows`` active windows of history, its raw
  count in the current (partial) window or in the window just closed exceeds
  ``factor * max(baseline, floor)``, where the floor is ``min_requests`` / ``min_tokens``;
  and unflagged when neither does any more.

A partial window is compared raw, not scaled up to a full window: scaling a few seconds of
traffic makes noise look like a burst. A burst is then caught once it has done ``factor``
times a full window's usage, or with the window just closed at the latest.

Limits: a brand-new principal (a fresh token) is never flagged during its warm-up, whatever
it does, and a flood from the start becomes its baseline: the rate limiter is what bounds
new principals. A slow ramp (each window under ``factor`` times the last) is followed, not
flagged. See docs/operations/anomalies.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from gemini_scale.errors import ConfigurationError, StoreError
from gemini_scale.stores.base import LocalState, Script, Store
from gemini_scale.stores.memory import MemoryStore
from gemini_scale.types import SYSTEM_CLOCK, Clock, SystemClock

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge
    from prometheus_client.metrics import MetricWrapperBase

__all__ = ["FLUSH", "Anomaly", "Signal", "UsageAnomalyDetector"]

logger = logging.getLogger("gemini_scale.anomaly")

Signal = Literal["requests", "tokens"]
_SIGNALS: tuple[tuple[Signal, int], ...] = (("requests", 1), ("tokens", 2))

#: Principals per script call: a flush of more is split, so one script never blocks a
#: shared Redis (the rate limiter's hot path) for long.
_BATCH = 100  # principals per script call: no call holds Redis (or the loop) for long
#: A store failure is logged at most this often (seconds).
_WARN_EVERY = 60.0
#: Integers per principal in the script's reply.
_ROW = 9


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A principal's usage in one window departed from its own baseline."""

    principal: str
    """The key the caller observed under (an opaque string such as ``"issuer subject"``)."""
    signal: Signal
    """Which rate departed."""
    observed: float
    """The count in the window that departed."""
    baseline: float
    """The principal's baseline for a window of that length."""
    factor: float
    """``observed / max(baseline, floor)``."""
    window_start: float
    """When that window began (wall-clock seconds)."""


# -- the shared operation: Lua for Redis, a Python twin for memory stores --------------------


class _Params(NamedTuple):
    factor: float
    alpha: float
    warmup: int
    floors: tuple[float, float]


class _Shared:
    """One principal's shared state, as anomaly_flush.lua keeps it (see its header)."""

    __slots__ = ("ar", "at", "br", "bt", "er", "et", "fl", "n", "w")

    def __init__(self, stored: tuple[Any, ...] | None) -> None:
        if stored is None:
            self.w: int | None = None
            self.ar = self.at = self.br = self.bt = self.n = self.fl = 0
            self.er = self.et = 0.0
        else:
            self.w, self.ar, self.at, self.br, self.bt, self.n, self.er, self.et, self.fl = stored

    def stored(self) -> tuple[Any, ...]:
        return (self.w, self.ar, self.at, self.br, self.bt, self.n, self.er, self.et, self.fl)

    def _fold(self, count: float, baseline: float, floor: float, p: _Params) -> float:
        if self.n >= p.warmup:
            count = min(count, p.factor * max(baseline, floor))
        return baseline + max(p.alpha, 1 / (self.n + 1)) * (count - baseline)

    def _close(self, requests: int, tokens: int, p: _Params) -> None:
        if requests > 0 or tokens > 0:
            self.er = self._fold(requests, self.er, p.floors[0], p)
            self.et = self._fold(tokens, self.et, p.floors[1], p)
            self.n += 1

    def advance(self, window: int, p: _Params) -> None:
        w = self.w
        if w is None:
            self.w = window
            return
        if window <= w:
            return
        self._close(self.br, self.bt, p)
        if window == w + 1:
            self.br, self.bt = self.ar, self.at
        else:
            self._close(self.ar, self.at, p)
            self.br = self.bt = 0
            self.fl = 0
        self.ar = self.at = 0
        self.w = window


def _judge(
    current: float, previous: float, *, n: int, w: int, baseline: float, floor: float,
    p: _Params,
) -> tuple[bool, float, int]:
    """``(flagged, observed, its window)``: the rule of the module docstring."""
    observed, window = current, w
    if previous > current:
        observed, window = previous, w - 1
    flagged = n >= p.warmup and observed > floor and observed > p.factor * max(baseline, floor)
    return flagged, observed, window


def _flush_twin(state: LocalState, keys: list[str], args: list[Any], now: float) -> list[int]:
    window = int(args[0])
    p = _Params(float(args[1]), float(args[2]), int(args[3]), (float(args[4]), float(args[5])))
    expires_at = now + int(args[6]) / 1000
    shift, skew = 0, float(args[9])
    if skew >= 0 and abs(now - float(args[8])) > skew:
        ours = math.floor(now / float(args[7]))
        shift, window = ours - window, ours
    out: list[int] = []
    for i, key in enumerate(keys):
        stored = state.get(key)
        s = _Shared(stored if isinstance(stored, tuple) else None)
        at = 10 + 6 * i
        for j in (at, at + 3):
            x, r, t = int(args[j]) + shift, int(args[j + 1]), int(args[j + 2])
            if r > 0 or t > 0:
                s.advance(x, p)
                if x == s.w:
                    s.ar, s.at = s.ar + r, s.at + t
                elif x + 1 == s.w:
                    s.br, s.bt = s.br + r, s.bt + t
        if s.w is None:
            out += [0] * _ROW
            continue
        s.advance(window, p)
        before = s.fl
        w = s.w
        up_r, seen_r, win_r = _judge(s.ar, s.br, n=s.n, w=w, baseline=s.er, floor=p.floors[0], p=p)
        up_t, seen_t, win_t = _judge(s.at, s.bt, n=s.n, w=w, baseline=s.et, floor=p.floors[1], p=p)
        flags = (1 if up_r else 0) | (2 if up_t else 0)
        s.fl = flags
        state.put(key, s.stored(), expires_at)
        out += (
            flags, flags & ~before, s.n,
            int(seen_r), math.floor(s.er * 1000), win_r,
            int(seen_t), math.floor(s.et * 1000), win_t,
        )
    return out


FLUSH = Script(
    name="anomaly_flush",
    lua=resources.files("gemini_scale.observability")
    .joinpath("lua", "anomaly_flush.lua")
    .read_text(encoding="utf-8"),
    local=_flush_twin,
    exact=True,
)
"""Merge counts, roll windows, fold baselines and judge, for a batch of principals: KEYS one
per principal, ARGV ``now, factor, alpha, warmup, min_requests, min_tokens, ttl_ms, window,
time, max_skew`` then ``x1, r1, t1, x2, r2, t2`` per principal; nine integers per principal
back. A caller whose ``time`` is more than ``max_skew`` seconds (negative: any) from the
store's has its window indexes moved onto the store's clock."""


# -- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Metrics:
    anomalies: Counter
    flagged: Gauge
    evictions: Counter
    store_errors: Any
    """``gemini_scale_store_errors_total``: one family for every area, owned by
    :mod:`gemini_scale.observability.metrics`."""


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_M = TypeVar("_M", bound="MetricWrapperBase")


def _metrics(registry: CollectorRegistry) -> _Metrics:
    """This registry's metrics, created on first use and shared by every detector on it."""
    found = _METRICS.get(registry)
    if found is None:
        from prometheus_client import Counter, Gauge

        from gemini_scale.observability.metrics import families

        found = _METRICS[registry] = _Metrics(
            anomalies=_register(
                registry, Counter, "gemini_scale_usage_anomalies_total",
                "Principals whose usage departed from their own baseline by more than the "
                "configured factor (once per anomaly, not per flush).", ("signal",),
            ),
            flagged=_register(
                registry, Gauge, "gemini_scale_anomalous_principals",
                "Principals currently flagged, counted on the replica that raised the flag.",
                ("signal",),
            ),
            evictions=_register(
                registry, Counter, "gemini_scale_usage_anomaly_evictions_total",
                "Principals whose unflushed counts the anomaly detector dropped to stay "
                "within max_principals.", (),
            ),
            store_errors=families(registry).store_errors,
        )
    return found


def _register(
    registry: CollectorRegistry, kind: type[_M], name: str, doc: str, labels: tuple[str, ...]
) -> _M:
    """Create a metric, or reuse the one already registered under that name (a module
    reloaded, or a registry whose cache entry was dropped)."""
    options: dict[str, Any] = {"registry": registry}
    if kind.__name__ == "Gauge":
        # Several workers (PROMETHEUS_MULTIPROC_DIR): each counts the flags it raised.
        options["multiprocess_mode"] = "livesum"
    try:
        return kind(name, doc, labels, **options)
    except ValueError:
        existing = getattr(registry, "_names_to_collectors", {}).get(name)
        if isinstance(existing, kind) and tuple(existing._labelnames) == labels:
            return existing
        raise


# -- the detector ----------------------------------------------------------------------------


class _Local:
    """What one replica holds for a principal: unflushed counts, and the last shared verdict."""

    __slots__ = (
        "adopt", "flags", "history", "key", "prev_requests", "prev_tokens", "raised",
        "requests", "requests_baseline", "tokens", "tokens_baseline", "window",
    )

    def __init__(self, window: int) -> None:
        self.window = window
        self.requests = self.tokens = 0
        """Counted in ``window`` and not yet flushed."""
        self.prev_requests = self.prev_tokens = 0
        """Counted in ``window - 1`` and not yet flushed."""
        self.key: str | None = None
        self.history = -1
        """Active windows in the shared baseline at the last flush (-1: none seen yet)."""
        self.requests_baseline = self.tokens_baseline = 0.0
        self.flags = 0
        """Signals flagged at the last verdict (1 requests, 2 tokens)."""
        self.raised = 0
        """Flags this replica raised and counts in its gauge."""
        self.adopt = 0
        """Flags this replica raised before the principal was evicted, to count again if the
        next verdict still holds them."""

    @property
    def pending(self) -> bool:
        return bool(self.requests or self.tokens or self.prev_requests or self.prev_tokens)

    def add(self, window: int, requests: int, tokens: int) -> None:
        if window == self.window:
            self.requests += requests
            self.tokens += tokens
        elif window > self.window:
            if window == self.window + 1:
                self.prev_requests, self.prev_tokens = self.requests, self.tokens
            else:
                self.prev_requests = self.prev_tokens = 0
            self.window, self.requests, self.tokens = window, requests, tokens
        elif window == self.window - 1:
            self.prev_requests += requests
            self.prev_tokens += tokens
        # Older windows are folded into the baseline already: too late to count.

    def take(self, now: int) -> tuple[int, int, int, int, int, int] | None:
        """The unflushed counts of windows ``now - 1`` and ``now``, as script arguments
        (older ones are dropped), leaving none behind; ``None`` when there were none."""
        w = self.window
        first = (w - 1, self.prev_requests, self.prev_tokens) if w >= now else (now, 0, 0)
        second = (w, self.requests, self.tokens) if w >= now - 1 else (now, 0, 0)
        self.requests = self.tokens = self.prev_requests = self.prev_tokens = 0
        if first[1] or first[2] or second[1] or second[2]:
            return (*first, *second)
        return None


_Item = tuple[str, _Local, tuple[int, int, int, int, int, int]]


class UsageAnomalyDetector:
    """Flags principals whose request or token rate departs from their own baseline.

    Call :meth:`observe` when a request completes; counts are merged across replicas in
    ``store`` (``None``: an in-process memory store) every ``flush_interval`` seconds by a
    background task (started by :meth:`start`, or by the first :meth:`observe` made on a
    running event loop) or by :meth:`flush`. The rule is in the module docstring.

    A new anomaly (a principal becoming flagged for a signal) increments
    ``gemini_scale_usage_anomalies_total{signal}``, logs a WARNING on
    ``gemini_scale.anomaly`` (the principal only in ``extra``) and calls ``on_anomaly``
    (sync or async; its errors are logged, never raised). If the store fails, the failure
    is counted in ``gemini_scale_store_errors_total{area="anomaly"}`` and logged at most
    once a minute, the counts are kept for the next flush, and this replica judges its own
    counts against the last baselines it saw.

    :param store: where replicas merge counts and keep baselines (keys under ``{anomaly}``).
    :param factor: how many times its baseline a window's count must exceed (> 1).
    :param window: the window length in seconds.
    :param smoothing: the weight of the newest closed window in the moving average.
    :param warmup_windows: active windows of history before a principal can be flagged.
    :param min_requests: below this count in a window, requests are never flagged.
    :param min_tokens: below this count in a window, tokens are never flagged.
    :param max_principals: principals held in this process (least recently seen evicted).
    :param flush_interval: seconds between background flushes.
    :param history_ttl: seconds an idle principal's shared state is kept (at least three
        windows; ``None``: a day, or three windows if longer); after it, the principal
        starts a new warm-up.
    :param max_clock_skew: seconds this replica's clock may differ from the store's (Redis
        ``TIME``) before the store's clock places its counts in windows, so a replica whose
        clock is stepped or badly set cannot roll every principal's windows forward or back
        (``None``: one window; a slow store or a late batch is no skew; ``math.inf``: always
        this replica's clock, as tests with an injected clock need).
    :param on_anomaly: called with each new :class:`Anomaly`.
    :param clock: wall-clock source (windows come from its ``time()``); tests inject one.
    :param registry: the Prometheus registry (default: the global one).
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        factor: float = 5.0,
        window: float = 60.0,
        smoothing: float = 0.2,
        warmup_windows: int = 5,
        min_requests: int = 30,
        min_tokens: int = 50_000,
        max_principals: int = 10_000,
        flush_interval: float = 5.0,
        history_ttl: float | None = None,
        max_clock_skew: float | None = None,
        on_anomaly: Callable[[Anomaly], object] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
    ) -> None:
        _check(factor > 1, "factor must be > 1", factor)
        _check(window > 0 and math.isfinite(window), "window must be > 0 seconds", window)
        _check(0 < smoothing <= 1, "smoothing must be in (0, 1]", smoothing)
        _check(warmup_windows >= 0, "warmup_windows must be >= 0", warmup_windows)
        _check(min_requests >= 1, "min_requests must be >= 1", min_requests)
        _check(min_tokens >= 1, "min_tokens must be >= 1", min_tokens)
        _check(max_principals >= 1, "max_principals must be >= 1", max_principals)
        _check(flush_interval > 0, "flush_interval must be > 0 seconds", flush_interval)
        # Only the current and the previous window are kept between flushes.
        _check(flush_interval <= window, "flush_interval must not exceed window",
               flush_interval)
        if history_ttl is None:
            history_ttl = max(86_400.0, 3 * window)
        _check(history_ttl >= 3 * window, "history_ttl must be at least 3 windows", history_ttl)
        if max_clock_skew is None:
            max_clock_skew = float(window)
        _check(max_clock_skew >= 0, "max_clock_skew must be >= 0 seconds", max_clock_skew)
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self.factor = float(factor)
        self.window = float(window)
        self.smoothing = float(smoothing)
        self.warmup_windows = warmup_windows
        self.min_requests = min_requests
        self.min_tokens = min_tokens
        self.max_principals = max_principals
        self.flush_interval = flush_interval
        self.history_ttl = history_ttl
        self.max_clock_skew = max_clock_skew
        self.on_anomaly = on_anomaly
        self.store: Store = (
            store
            if store is not None
            else MemoryStore(clock=clock, max_keys=max(1_000, 4 * max_principals))
        )
        self._clock = clock
        # The system clock's time() is called once per request: skip its wrapper.
        self._time = time.time if type(clock) is SystemClock else clock.time
        self._metrics = _metrics(registry)
        self._store_errors = self._metrics.store_errors.labels(area="anomaly")
        self._params = _Params(self.factor, self.smoothing, warmup_windows,
                               (float(min_requests), float(min_tokens)))
        self._head: list[int | float] = [
            0, self.factor, self.smoothing, warmup_windows, min_requests, min_tokens,
            max(1, round(history_ttl * 1000)), self.window, 0.0,
            -1.0 if max_clock_skew == math.inf else float(max_clock_skew),
        ]
        self._tag = f"anomaly:{{anomaly}}:{self.window:g}s:"
        self._locals: OrderedDict[str, _Local] = OrderedDict()
        # Evicted principals -> the flags this replica had raised for them (bounded).
        self._evicted_flags: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._last_warning = -math.inf

    def __repr__(self) -> str:
        return (
            f"UsageAnomalyDetector(store={self.store!r}, factor={self.factor}, "
            f"window={self.window}, tracked={len(self._locals)})"
        )

    @property
    def tracked(self) -> int:
        """Principals held in this process (at most ``max_principals``)."""
        return len(self._locals)

    def observe(self, principal: str, *, requests: int = 1, tokens: int = 0) -> None:
        """Count a finished request (or ``requests`` of them) and its ``tokens`` for
        ``principal``: O(1), synchronous, no I/O."""
        window = int(self._time() // self.window)
        locals_ = self._locals
        local = locals_.get(principal)
        if local is None:
            local = self._admit(principal, window)
        else:
            locals_.move_to_end(principal)
        if local.window == window:
            local.requests += requests
            local.tokens += tokens
        else:
            local.add(window, requests, tokens)
        if self._task is None and not self._closed:
            self._autostart()

    def flagged(self, principal: str) -> frozenset[str]:
        """The signals ``principal`` is flagged for, as of this replica's last flush."""
        local = self._locals.get(principal)
        if local is None or not local.flags:
            return frozenset()
        return frozenset(name for name, bit in _SIGNALS if local.flags & bit)

    async def flush(self) -> list[Anomaly]:
        """Merge this replica's counts into the store and judge every principal it counted
        or holds flagged; announce and return the new anomalies. Never raises for a store
        failure."""
        async with self._lock:
            return await self._flush()

    def start(self) -> None:
        """Flush every ``flush_interval`` seconds on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._closed = False
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(self._wake), name="gemini-scale anomalies")

    async def aclose(self) -> None:
        """Stop background flushing and flush once more."""
        self._closed = True
        task, wake = self._task, self._wake
        if (
            task is not None
            and wake is not None
            and not task.done()
            and task.get_loop() is asyncio.get_running_loop()
        ):
            wake.set()
            await task  # returns after the flush in progress, if any
        self._task = None  # (a task on another, finished loop is left to that loop)
        await self.flush()

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, principal: str, window: int) -> _Local:
        locals_ = self._locals
        if len(locals_) >= self.max_principals:
            self._forget(*locals_.popitem(last=False))
        local = locals_[principal] = _Local(window)
        if self._evicted_flags:
            local.adopt = self._evicted_flags.pop(principal, 0)
        return local

    def _forget(self, principal: str, local: _Local) -> None:
        if local.pending:
            self._metrics.evictions.inc()
        for name, bit in _SIGNALS:
            if local.raised & bit:
                self._metrics.flagged.labels(signal=name).dec()
        if local.raised:
            flags = self._evicted_flags
            if len(flags) >= self.max_principals:
                del flags[next(iter(flags))]
            flags[principal] = local.raised
        local.raised = 0

    def _autostart(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.start()

    async def _run(self, wake: asyncio.Event) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await wake.wait()
                wake.clear()
                if self._closed:
                    return
                try:
                    await self.flush()
                except Exception:
                    # A fault in our own code: keep flushing, but never silently.
                    logger.exception("usage-anomaly flush failed")
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _key(self, principal: str) -> str:
        # No raw subject ever reaches the store: only a digest of it.
        digest = hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()
        return self._tag + digest[:32]

    async def _flush(self) -> list[Anomaly]:
        wall = self._time()
        now = int(wall // self.window)
        idle = (now, 0, 0, now, 0, 0)
        batch: list[_Item] = []
        for principal, local in self._locals.items():
            entries = local.take(now)
            if entries is None and not local.flags:
                continue
            if local.key is None:
                local.key = self._key(principal)
            batch.append((principal, local, entries or idle))
        self._head[0] = now
        found: list[Anomaly] = []
        for start in range(0, len(batch), _BATCH):
            part = batch[start : start + _BATCH]
            keys = [local.key or "" for _, local, _ in part]
            self._head[8] = self._time() if start else wall  # this part's own send time
            args = [*self._head, *chain.from_iterable(entries for _, _, entries in part)]
            try:
                reply = await self.store.run(FLUSH, keys, args)
            except StoreError as exc:
                self._store_failed(exc)
                self._restore(part)
                found += self._judge_locally(now, part)
            except BaseException:
                # Cancelled: this part's outcome is unknown (not resent: never counted
                # twice); the parts not sent yet keep their counts.
                self._restore(batch[start + _BATCH :])
                raise
            else:
                found += self._verdicts(part, reply)
            if start + _BATCH < len(batch):
                await asyncio.sleep(0)  # let requests run between parts
        for anomaly in found:
            await self._announce(anomaly)
        return found

    def _verdicts(self, part: list[_Item], reply: list[int]) -> list[Anomaly]:
        found: list[Anomaly] = []
        floors = self._params.floors
        for i, (principal, local, _) in enumerate(part):
            row = reply[_ROW * i : _ROW * (i + 1)]
            flags, raised, history = row[0], row[1], row[2]
            alive = self._locals.get(principal) is local
            local.history = history
            local.requests_baseline = row[4] / 1000
            local.tokens_baseline = row[7] / 1000
            for index, (name, bit) in enumerate(_SIGNALS):
                if raised & bit and not local.raised & bit:
                    at = 3 + 3 * index
                    observed, baseline, window = row[at], row[at + 1] / 1000, row[at + 2]
                    found.append(self._anomaly(
                        principal, name, observed=observed, baseline=baseline,
                        floor=floors[index], window=window,
                    ))
                    if alive:
                        local.raised |= bit
                        self._metrics.flagged.labels(signal=name).inc()
                elif local.raised & bit and not flags & bit:
                    local.raised &= ~bit
                    self._metrics.flagged.labels(signal=name).dec()
                elif local.adopt & bit and flags & bit and not local.raised & bit and alive:
                    local.raised |= bit  # still flagged: count it again, as this replica did
                    self._metrics.flagged.labels(signal=name).inc()
            local.adopt = 0
            local.flags = flags
        return found

    def _judge_locally(self, now: int, part: list[_Item]) -> list[Anomaly]:
        """Without the store: this replica's counts (kept for the next flush) against the
        last shared baselines it saw. Flags are only raised here, never cleared."""
        found: list[Anomaly] = []
        p = self._params
        for principal, local, _ in part:
            if self._locals.get(principal) is not local or local.history < 0:
                continue
            if local.window == now:
                current = (local.requests, local.tokens)
                previous = (local.prev_requests, local.prev_tokens)
            elif local.window == now - 1:
                current, previous = (0, 0), (local.requests, local.tokens)
            else:
                continue
            baselines = (local.requests_baseline, local.tokens_baseline)
            for index, (name, bit) in enumerate(_SIGNALS):
                if local.flags & bit:
                    continue
                flagged, observed, window = _judge(
                    current[index], previous[index], n=local.history, w=now,
                    baseline=baselines[index], floor=p.floors[index], p=p,
                )
                if flagged:
                    local.flags |= bit
                    local.raised |= bit
                    self._metrics.flagged.labels(signal=name).inc()
                    found.append(self._anomaly(
                        principal, name, observed=observed, baseline=baselines[index],
                        floor=p.floors[index], window=window,
                    ))
        return found

    def _restore(self, part: list[_Item]) -> None:
        """Give counts that were not merged back to their principals, for the next flush."""
        for principal, local, (x1, r1, t1, x2, r2, t2) in part:
            if self._locals.get(principal) is local:
                if r1 or t1:
                    local.add(x1, r1, t1)
                if r2 or t2:
                    local.add(x2, r2, t2)
            elif r1 or t1 or r2 or t2:
                self._metrics.evictions.inc()  # evicted while the flush was in flight

    def _anomaly(
        self, principal: str, signal: Signal, *, observed: float, baseline: float, floor: float,
        window: int,
    ) -> Anomaly:
        return Anomaly(
            principal=principal,
            signal=signal,
            observed=float(observed),
            baseline=baseline,
            factor=observed / max(baseline, floor),
            window_start=window * self.window,
        )

    async def _announce(self, anomaly: Anomaly) -> None:
        self._metrics.anomalies.labels(signal=anomaly.signal).inc()
        logger.warning(
            "usage anomaly: %s %.0f in the window, %.1fx the baseline of %.1f",
            anomaly.signal, anomaly.observed, anomaly.factor, anomaly.baseline,
            extra={
                "principal": anomaly.principal,
                "signal": anomaly.signal,
                "observed": anomaly.observed,
                "baseline": anomaly.baseline,
                "factor": anomaly.factor,
                "window_start": anomaly.window_start,
            },
        )
        hook = self.on_anomaly
        if hook is None:
            return
        try:
            result = hook(anomaly)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The hook is the caller's code: a failure there must not stop detection.
            logger.exception(
                "the on_anomaly hook failed for a %s anomaly", anomaly.signal,
                extra={"principal": anomaly.principal},
            )

    def _store_failed(self, exc: StoreError) -> None:
        self._store_errors.inc()
        now = self._clock.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            logger.warning(
                "usage-anomaly store failed (%s); judging this replica's counts locally",
                type(exc).__name__,
            )


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ConfigurationError(f"UsageAnomalyDetector: {message}, got {value!r}")
