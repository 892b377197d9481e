"""The limiter engine: sliding-window counters, all limits of a request in one round trip.

Algorithm: the sliding-window counter (as in ``limits``' sliding window and Cloudflare's):
each limit keeps the count of the current fixed window and of the one before, and a request
fits when ``previous * (unelapsed share of the window) + current + cost <= limit``. It needs
one small hash per limit (O(1) memory whatever the cost, unlike a moving-window log, which
would store one entry per token), takes a cost (Gemini tokens) and a refund (settlement)
naturally, and is exact within a window: with nothing carried over, exactly ``limit`` units
pass. GCRA would be as small, but a refund there moves a single timestamp that every later
request already used, so settling a token reservation after the fact is ill-defined.

Time is the store's (Redis ``TIME`` inside the script), so replicas' clocks never matter.
A request's keys share one hash tag, so the script runs on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import anyio

from gemini_scale.errors import StoreError
from gemini_scale.memo import remember
from gemini_scale.observability.metrics import record_store_error
from gemini_scale.ratelimit.metrics import record_degraded, record_recovered
from gemini_scale.ratelimit.scripts import ACQUIRE, SETTLE
from gemini_scale.stores.base import Store
from gemini_scale.stores.memory import MemoryStore
from gemini_scale.types import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from limits import RateLimitItem

logger = logging.getLogger("gemini_scale.ratelimit")

_KEYS_CACHE_SIZE = 10_000
#: Bounds on refunds owed to the shared store: past them, everything owed is sent at once.
_OWED_PER_BUCKET = 64
_OWED_BUCKETS = 10_000
LimitKind = Literal["requests", "tokens"]
StoreErrorMode = Literal["local", "open", "closed"]


class Limit:
    """One budget: ``amount`` units of ``kind`` per ``window`` seconds (immutable).

    A plain class with read-only properties, not a frozen dataclass: compiled with mypyc,
    its fields are then read directly (every limit of every request reads them)."""

    __slots__ = ("_amount", "_kind", "_window")
    __match_args__ = ("kind", "amount", "window")

    def __init__(self, kind: LimitKind, amount: int, window: int) -> None:
        self._kind: LimitKind = kind
        self._amount = amount
        self._window = window

    @property
    def kind(self) -> LimitKind:
        """``requests`` or ``tokens``."""
        return self._kind

    @property
    def amount(self) -> int:
        """Units per window."""
        return self._amount

    @property
    def window(self) -> int:
        """The window, in seconds."""
        return self._window

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Limit):
            return NotImplemented
        return (
            self._kind == other._kind
            and self._amount == other._amount
            and self._window == other._window
        )

    def __hash__(self) -> int:
        return hash((self._kind, self._amount, self._window))

    def __repr__(self) -> str:
        return f"Limit(kind={self._kind!r}, amount={self._amount!r}, window={self._window!r})"

    @classmethod
    def from_item(cls, kind: LimitKind, item: RateLimitItem) -> Limit:
        """From a parsed ``limits`` item (``60/minute`` -> 60 per 60 s)."""
        return cls(kind, int(item.amount), int(item.get_expiry()))

    @property
    def name(self) -> str:
        """``requests-60s``: unique within a policy, used in keys and headers."""
        return f"{self.kind}-{self.window}s"


class LimitState(NamedTuple):
    """One limit after a decision (a named tuple: built on every request, so it is cheap)."""

    limit: Limit
    used: float
    """Weighted units in the sliding window, including this request when it was charged."""
    reset_after: float
    """Seconds until the current fixed window ends."""
    retry_after: float | None
    """For a limit this request did not fit: seconds until it would (``inf``: never)."""

    @property
    def remaining(self) -> int:
        """Whole units still available now."""
        return max(0, math.floor(self.limit.amount - self.used + 1e-9))


class Reservation:
    """What a decision charged, so it can be settled or refunded later. Treat it as a
    value: compared and hashed by its fields, which are never changed after it is made.

    A plain class, not a named tuple or a dataclass: compiled with mypyc, its fields are
    then read directly, on every settlement."""

    __slots__ = ("costs", "indexes", "keys", "local")

    keys: tuple[str, ...]
    indexes: tuple[int, ...]
    costs: tuple[int, ...]
    local: bool
    """Charged on the replica's local fallback store, not the shared one."""

    def __init__(
        self, keys: tuple[str, ...], indexes: tuple[int, ...], costs: tuple[int, ...],
        local: bool,
    ) -> None:
        self.keys = keys
        self.indexes = indexes
        self.costs = costs
        self.local = local

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reservation):
            return NotImplemented
        return (self.keys, self.indexes, self.costs, self.local) == (
            other.keys, other.indexes, other.costs, other.local
        )

    def __hash__(self) -> int:
        return hash((self.keys, self.indexes, self.costs, self.local))

    def __repr__(self) -> str:
        return (
            f"Reservation(keys={self.keys!r}, indexes={self.indexes!r}, "
            f"costs={self.costs!r}, local={self.local!r})"
        )


_UNSET: Final[Any] = object()
_NO_REPLY: Final[list[int]] = []  # (never changed)


class Decision:
    """The outcome of :meth:`RateLimiter.acquire`.

    Built straight from the store's reply; the per-limit :attr:`states` and the
    :attr:`reservation` are worked out only when asked for (most requests need neither
    object, only :meth:`tightest` for the ``RateLimit`` header).
    """

    __slots__ = ("_costs", "_keys", "_limits", "_local", "_raw", "_reservation", "_states",
                 "_tightest", "allowed", "degraded")

    allowed: bool
    degraded: bool
    """The shared store failed: the decision was made locally (``local``) or skipped (``open``)."""

    def __init__(
        self,
        allowed: bool,
        states: Sequence[LimitState] = (),
        reservation: Reservation | None = None,
        degraded: bool = False,
    ) -> None:
        self.allowed = allowed
        self.degraded = degraded
        self._states: tuple[LimitState, ...] | None = (
            states if type(states) is tuple else tuple(states)
        )
        self._reservation = reservation
        # Concrete types (a list, a tuple): compiled, reading them by index is direct.
        self._raw: list[int] = _NO_REPLY
        self._limits: tuple[Limit, ...] = ()
        self._keys: tuple[str, ...] = ()
        self._costs: Sequence[int] = ()
        self._local = False
        self._tightest: Any = _UNSET

    @classmethod
    def from_reply(
        cls,
        raw: Sequence[int],
        limits: Sequence[Limit],
        keys: tuple[str, ...],
        costs: Sequence[int],
        local: bool,
        *,
        degraded: bool = False,
    ) -> Decision:
        """From the acquire script's reply: ``[allowed, now_ms, (index, current, previous)
        per limit]``."""
        # Positional, and by name when not a subclass: compiled, a direct call (calling
        # ``cls`` parses the arguments).
        decision = (
            Decision(raw[0] == 1, (), None, degraded)
            if cls is Decision
            else cls(raw[0] == 1, (), None, degraded)
        )
        decision._raw = raw if isinstance(raw, list) else list(raw)
        decision._limits = limits if isinstance(limits, tuple) else tuple(limits)
        decision._keys = keys
        decision._costs = costs
        decision._local = local
        decision._states = None
        decision._reservation = None
        decision._tightest = _UNSET
        return decision

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, states={self.states!r}, "
            f"reservation={self.reservation!r}, degraded={self.degraded})"
        )

    @property
    def states(self) -> tuple[LimitState, ...]:
        """Each limit after the decision, in the order of the limits."""
        states = self._states
        if states is None:
            states = self._states = tuple(self._iter_states())
        return states

    def _iter_states(self) -> Iterator[LimitState]:
        raw, allowed = self._raw, self.allowed
        now_ms = raw[1]
        i = 2
        for limit, cost in zip(self._limits, self._costs, strict=True):
            cur, prev = raw[i + 1], raw[i + 2]
            used, left_ms = _weighted(limit.window * 1000, now_ms, raw[i], cur, prev)
            i += 3
            retry = None
            if not allowed and used + cost > limit.amount:
                elapsed = limit.window - left_ms / 1000
                retry = _retry_after(limit, cur, prev, cost, elapsed)
            yield LimitState(limit, used, left_ms / 1000, retry)

    @property
    def reservation(self) -> Reservation | None:
        """What was charged (``None`` when refused, or when no limit was checked)."""
        reservation = self._reservation
        if reservation is None and self.allowed and self._raw:
            raw = self._raw
            costs = self._costs
            reservation = self._reservation = Reservation(
                self._keys,
                tuple([raw[i] for i in range(2, len(raw), 3)]),  # (compiled: direct reads)
                costs if type(costs) is tuple else tuple(costs),
                self._local,
            )
        return reservation

    def tightest(self) -> tuple[Limit, int, float] | None:
        """``(limit, remaining, reset_after)`` of the limit closest to exhaustion (the
        smallest remaining share; the sooner reset on a tie), or ``None`` with no limits.
        For a refusal, the limit that refused it (the longest wait of those the request did
        not fit), with :attr:`retry_after` as its reset: what the ``RateLimit`` header says
        then agrees with ``Retry-After``."""
        found = self._tightest
        if found is _UNSET:  # the headers and the metrics both ask
            found = self._tightest = (
                self._find_tightest() if self.allowed else self._find_binding()
            )
        return found  # type: ignore[no-any-return]

    def _find_binding(self) -> tuple[Limit, int, float] | None:
        binding: LimitState | None = None
        for state in self.violated:
            if binding is None or (state.retry_after or 0.0) > (binding.retry_after or 0.0):
                binding = state
        if binding is None:  # refused without a limit state (no limits)
            return self._find_tightest()
        return binding.limit, binding.remaining, float(self.retry_after)

    def _find_tightest(self) -> tuple[Limit, int, float] | None:
        raw = self._raw
        best: tuple[Limit, int, float] | None = None
        if not raw:
            best_key = (math.inf, math.inf)
            for state in self.states:
                key = (state.remaining / state.limit.amount, state.reset_after)
                if key < best_key:
                    best_key, best = key, (state.limit, state.remaining, state.reset_after)
            return best
        now_ms = raw[1]
        best_share = best_reset = math.inf
        i = 2
        for limit in self._limits:
            window_ms = limit.window * 1000
            left_ms = window_ms - (now_ms - raw[i] * window_ms)  # _weighted, inlined
            cur, prev = raw[i + 1], raw[i + 2]
            i += 3
            amount = limit.amount
            # In floats, typed (compiled, the arithmetic is direct), as the states count.
            used: float = prev * (left_ms / window_ms) + cur if prev else float(cur)
            remaining = max(math.floor(amount - used + 1e-9), 0)
            share = remaining / amount
            reset_after = left_ms / 1000
            if share < best_share or (share == best_share and reset_after < best_reset):
                best_share, best_reset = share, reset_after
                best = (limit, remaining, reset_after)
        return best

    @property
    def violated(self) -> tuple[LimitState, ...]:
        """The limits the request did not fit."""
        return tuple(s for s in self.states if s.retry_after is not None)

    @property
    def retry_after(self) -> int:
        """Whole seconds (at least 1) until every violated limit would admit the request."""
        waits = [s.retry_after for s in self.violated if s.retry_after is not None]
        if waits and all(math.isfinite(w) for w in waits):
            return max(1, math.ceil(max(waits)))
        # A limit the request can never fit: no wait admits it; say the longest window,
        # whatever the other limits would need (they would only make it retry sooner).
        return max(1, math.ceil(max(s.limit.window for s in self.states)))

    def most_constrained(self) -> LimitState | None:
        """The limit closest to exhaustion (for the ``RateLimit`` header)."""
        found = self.tightest()
        if found is None:
            return None
        return next(state for state in self.states if state.limit is found[0])


class StoreFailureError(StoreError):
    """The shared store failed and ``on_store_error="closed"``: refuse with 503."""


class _Breaker:
    """Consecutive-failure circuit breaker: after ``threshold`` failures the store is not
    called for ``cooldown`` seconds; then one probe decides (half-open)."""

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.open_until = -math.inf
        self.probing = False

    def allows(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.clock.monotonic() < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: this caller probes, the others stay local
        return True

    def is_open(self) -> bool:
        """Whether calls are being kept off the store right now."""
        return self.failures >= self.threshold and self.clock.monotonic() < self.open_until

    def succeeded(self) -> None:
        if self.failures >= self.threshold:
            logger.warning("rate-limit store recovered; limits are shared again")
        if self.failures:
            record_recovered()
        self.failures = 0
        self.probing = False

    def failed(self) -> None:
        self.failed_aside()
        self.probing = False

    def failed_aside(self) -> None:
        """A failure outside the probe (a settlement): it counts, and opens the breaker at
        the threshold, without ending a probe in flight."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock.monotonic() + self.cooldown


class RateLimiter:
    """Checks and charges limits in a store, with an explicit failure mode.

    ``on_store_error``: ``"local"`` (default) enforces the same limits on this replica in
    memory while the store is failing; ``"open"`` lets requests through unlimited;
    ``"closed"`` refuses them (:class:`StoreFailureError`). In every mode a failing store is
    skipped by a circuit breaker after ``breaker_threshold`` consecutive failures, for
    ``breaker_cooldown`` seconds, so a dead Redis costs no waiting per request.

    Refunds to a shared store (a settlement that lowers a reservation: the common case, as
    estimates are generous) are deferred: they ride on the same bucket's next acquire, in
    the same script, so a steady caller costs one round trip per request; a timer sends the
    rest after ``refund_delay`` seconds (``0``: refund at once). Until then the bucket counts
    the reservation, which is conservative. Charges above a reservation are sent at once.
    """

    def __init__(
        self,
        store: Store,
        *,
        on_store_error: StoreErrorMode = "local",
        clock: Clock = SYSTEM_CLOCK,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        local_max_keys: int = 100_000,
        namespace: str = "rl",
        refund_delay: float = 1.0,
    ) -> None:
        if on_store_error not in ("local", "open", "closed"):
            raise ValueError(f"on_store_error must be local, open or closed: {on_store_error!r}")
        self.store = store
        self.on_store_error = on_store_error
        self.namespace = namespace
        self._shared_is_local = isinstance(store, MemoryStore)
        self._local = (
            store
            if isinstance(store, MemoryStore)
            else MemoryStore(prefix=store.prefix, clock=clock, max_keys=local_max_keys)
        )
        # A plain MemoryStore (not a subclass that may override ``run``) is run synchronously
        # (a call of ``self._local.run_now`` by name: compiled, a direct call).
        self._local_is_plain = type(self._local) is MemoryStore
        self.synchronous = self._shared_is_local and self._local_is_plain
        """Whether decisions never wait (the store is a plain in-process ``MemoryStore``):
        then :meth:`acquire_now` gives them without a coroutine."""
        # id(limits) -> (limits, {tag, or (tag, scope): keys}); one bound over all of them.
        self._keys: dict[int, tuple[Sequence[Limit], dict[Any, tuple[str, ...]]]] = {}
        self._keys_held = 0
        self._arg_cache: dict[int, tuple[Sequence[int], Sequence[Limit], list[int]]] = {}
        self._arg_bases: dict[int, tuple[Sequence[Limit], list[int]]] = {}
        self._breaker = _Breaker(breaker_threshold, breaker_cooldown, clock)
        self._clock = clock
        self._last_warning = -math.inf
        self._last_skip_warning = -math.inf
        self.refund_delay = refund_delay
        # Refunds owed to the shared store, by bucket tag: they ride on the bucket's next
        # acquire (same script, same hash slot), or a timer sends them after refund_delay.
        self._refunds: dict[str, tuple[list[str], list[int]]] = {}
        self._refund_timer: asyncio.TimerHandle | None = None
        self._refund_loop: asyncio.AbstractEventLoop | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._flush_waiting: asyncio.Task[None] | None = None

    def keys(self, tag: str, limits: Sequence[Limit], scope: str = "") -> tuple[str, ...]:
        """The store keys of ``limits`` for one bucket identity: one hash slot (``{tag}``).
        ``scope`` separates budgets of different policies (e.g. per route)."""
        middle = f"{scope}:" if scope else ""
        return tuple(f"{self.namespace}:{{{tag}}}:{middle}{limit.name}" for limit in limits)

    def _cached_keys(self, tag: str, limits: Sequence[Limit], scope: str) -> tuple[str, ...]:
        """:meth:`keys`, memoised for a policy's (constant) tuple of limits (bounded). Keyed
        by the tuple's identity (held in the entry, so the id cannot be reused meanwhile):
        hashing the limits themselves would cost more than building the keys."""
        if type(limits) is not tuple:
            return self.keys(tag, limits, scope)
        # Two lookups by an int and a str (their hashes cached or trivial): a tuple key
        # would be built and hashed on every request.
        per_limits = self._keys.get(id(limits))
        if per_limits is None or per_limits[0] is not limits:
            per_limits = self._keys[id(limits)] = (limits, {})
        by_tag = per_limits[1]
        name: Any = (tag, scope) if scope else tag
        found = by_tag.get(name)
        if found is not None:
            return found
        keys = self.keys(tag, limits, scope)
        if self._keys_held >= _KEYS_CACHE_SIZE or len(self._keys) > _KEYS_CACHE_SIZE:
            self._keys.clear()  # a flood of buckets (or of policies) costs recomputation
            self._keys_held = 0
            by_tag = self._keys.setdefault(id(limits), (limits, {}))[1]
        by_tag[name] = keys
        self._keys_held += 1
        return keys

    def _args(self, limits: Sequence[Limit], costs: Sequence[int]) -> list[int]:
        """The script's arguments: (limit, window in ms, cost) per limit; memoised when both
        are constant tuples (a policy's request-only costs), else the costs are filled into
        the limits' memoised part (a token request's cost changes with its estimate)."""
        if type(limits) is not tuple:
            return _new_args(limits, costs)
        if type(costs) is tuple:
            found = self._arg_cache.get(id(costs))
            if found is not None and found[0] is costs and found[1] is limits:
                return found[2]
            args = _new_args(limits, costs)
            remember(self._arg_cache, id(costs), (costs, limits, args), _KEYS_CACHE_SIZE)
            return args
        base = self._arg_bases.get(id(limits))
        if base is None or base[0] is not limits:
            base = (limits, _new_args(limits, [0] * len(limits)))
            remember(self._arg_bases, id(limits), base, _KEYS_CACHE_SIZE)
        same_length(limits, costs)
        args = base[1].copy()
        for i in range(len(costs)):  # indexed, typed: compiled, direct
            cost = costs[i]
            args[3 * i + 2] = cost if type(cost) is int and cost >= 0 else max(0, int(cost))
        return args

    def acquire_now(
        self, tag: str, limits: Sequence[Limit], costs: Sequence[int], *, scope: str = ""
    ) -> Decision:
        """:meth:`acquire` without a coroutine, for a limiter whose store is a plain
        in-process :class:`MemoryStore` (:attr:`synchronous`)."""
        if not self.synchronous:
            raise RuntimeError("acquire_now needs a limiter on a plain MemoryStore")
        costs = _sequence(costs)
        keys = self._cached_keys(tag, limits, scope)
        raw = self._local.run_now(ACQUIRE, keys, self._args(limits, costs))
        return Decision.from_reply(raw, limits, keys, costs, False)

    async def acquire(
        self, tag: str, limits: Sequence[Limit], costs: Sequence[int], *, scope: str = ""
    ) -> Decision:
        """Check every limit and, only if all fit, charge ``costs`` to them, atomically.

        A cost larger than its whole limit can never fit: refused, nothing charged.
        """
        if self.synchronous:
            return self.acquire_now(tag, limits, costs, scope=scope)
        costs = _sequence(costs)
        keys = self._cached_keys(tag, limits, scope)
        args = self._args(limits, costs)
        if self._shared_is_local:
            raw = await self._local.run(ACQUIRE, keys, args)
            return Decision.from_reply(raw, limits, keys, costs, False)
        breaker = self._breaker
        if breaker.failures == 0 or breaker.allows():
            sent_keys, sent_args = keys, args
            if self._refunds:
                owed = self._refunds.pop(tag, None)
                if owed is not None:  # settle the bucket's refunds in the same script
                    sent_keys, sent_args = (*keys, *owed[0]), [*args, *owed[1]]
            try:
                raw = await self.store.run(ACQUIRE, sent_keys, sent_args)
            except StoreError as exc:
                breaker.failed()
                self._warn(exc)
            except BaseException:
                breaker.probing = False  # cancelled mid-probe: let another probe
                raise
            else:
                if breaker.failures:
                    breaker.succeeded()
                return Decision.from_reply(raw, limits, keys, costs, False)
        # The shared store failed, or the breaker keeps us off it for now.
        record_degraded(self.on_store_error)
        if self.on_store_error == "closed":
            raise StoreFailureError("the rate-limit store is unavailable")
        if self.on_store_error == "open":
            return Decision(True, (), None, degraded=True)
        raw = (
            self._local.run_now(ACQUIRE, keys, args)
            if self._local_is_plain
            else await self._local.run(ACQUIRE, keys, args)
        )
        return Decision.from_reply(raw, limits, keys, costs, True, degraded=True)

    def settle_now(self, reservation: Reservation | None, deltas: Sequence[int]) -> bool:
        """:meth:`settle` without suspending, when it can be: the reservation lives in a
        plain in-process memory store, or it is a refund to the shared store (deferred to
        the bucket's next acquire). Whether it was done; if not, await :meth:`settle`."""
        if reservation is None:
            return True
        keys, args = _moves(reservation, _sequence(deltas))
        return not keys or self._settled_now(reservation, keys, args)

    def _settled_now(
        self, reservation: Reservation, keys: tuple[str, ...], args: list[int]
    ) -> bool:
        """Apply these moves without suspending, if that can be done (see :meth:`settle_now`)."""
        if reservation.local or self._shared_is_local:
            if self._local_is_plain:
                self._local.run_now(SETTLE, keys, args)
            return self._local_is_plain
        if self._breaker.is_open():
            # The store is known to be down: not sent (a timeout per answer otherwise). A
            # refund is dropped (the reservation stands); a charge above it is lost.
            self._skipped_settlement()
            return True
        deferred = self.refund_delay > 0 and all(d < 0 for d in args[1::2])
        if deferred:
            try:
                self._defer(keys, args)
            except RuntimeError:  # no running event loop: settle() sends it
                return False
        return deferred

    async def settle(self, reservation: Reservation | None, deltas: Sequence[int]) -> None:
        """Move each charged limit by its delta (``actual - reserved``; ``-reserved`` refunds).

        Best effort: a store failure is logged, never raised; the reservation then stands.
        """
        if reservation is None:
            return
        keys, args = _moves(reservation, _sequence(deltas))
        if not keys or self._settled_now(reservation, keys, args):
            return
        store: Store = self._local if reservation.local or self._shared_is_local else self.store
        try:
            await store.run(SETTLE, keys, args)
        except StoreError as exc:
            self._breaker.failed_aside()  # a probe in flight stays its own
            self._warn(exc)

    def _defer(self, keys: Sequence[str], args: list[int]) -> None:
        """Owe ``keys`` their refunds until the bucket's next acquire, or the timer (in the
        running event loop: without one, ``RuntimeError`` and nothing is owed)."""
        loop = asyncio.get_running_loop()
        key = keys[0]
        tag = key[key.index("{") + 1 : key.index("}")]  # every key of a bucket has its tag
        owed = self._refunds.get(tag)
        if owed is None:
            owed = self._refunds[tag] = ([], [])
        owed[0].extend(keys)
        owed[1].extend(args)
        if len(owed[0]) > _OWED_PER_BUCKET or len(self._refunds) > _OWED_BUCKETS:
            self._flush_soon()  # bounded: never a growing backlog
            return
        if self._refund_timer is None or self._refund_loop is not loop:
            # (a timer armed on a loop that has ended would never fire: arm one here)
            self._refund_loop = loop
            self._refund_timer = loop.call_later(self.refund_delay, self._refund_due)

    def _refund_due(self) -> None:
        self._refund_timer = None
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Send what is owed from a task of its own (no request waits for it)."""
        loop = asyncio.get_running_loop()
        waiting = self._flush_waiting
        if waiting is not None and not waiting.done() and waiting.get_loop() is loop:
            return  # the task scheduled, not started yet, takes everything owed when it starts
        task = self._flush_waiting = loop.create_task(self.flush_refunds())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush_refunds(self) -> None:
        """Send every refund still owed (best effort: a store failure is logged, and those
        reservations then stand)."""
        self._flush_waiting = None  # what is owed from now on needs a flush of its own
        if self._refund_timer is not None:
            self._refund_timer.cancel()
            self._refund_timer = None
        refunds = self._refunds
        # A bucket stays owed until its turn: if this loop ends meanwhile (closed without
        # running its tasks to the end), only the bucket in flight is lost (it may have
        # been applied: sending it again could refund twice); the rest go out later.
        for tag in list(refunds):
            owed = refunds.pop(tag, None)
            if owed is None or self._breaker.is_open():
                continue  # an acquire carried it meanwhile; or the reservations stand
            try:
                with anyio.CancelScope(shield=True):
                    await self.store.run(SETTLE, *owed)
            except StoreError as exc:
                self._breaker.failed_aside()
                self._warn(exc)

    async def aclose(self) -> None:
        """Send the refunds still owed (called when the middleware's app shuts down)."""
        await self.flush_refunds()
        loop = asyncio.get_running_loop()
        for task in list(self._flushing):
            if task.get_loop() is loop:
                await task
            else:  # left on an event loop that ended: its bucket in flight is lost
                self._flushing.discard(task)
                if not task.done():
                    logger.warning("a refund flush was left unfinished by an event loop that "
                                   "ended; the reservations it was refunding stand")

    def _skipped_settlement(self) -> None:
        now = time.monotonic()
        if now - self._last_skip_warning >= 10.0:  # once per interval, not per request
            self._last_skip_warning = now
            logger.warning(
                "rate-limit store is down (breaker open): settlements are not sent; "
                "reservations stand and charges above them are lost meanwhile"
            )

    def _warn(self, exc: Exception) -> None:
        record_store_error("ratelimit")
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # once per interval, not per request (B15)
            self._last_warning = now
            logger.warning(
                "rate-limit store failed (%s); on_store_error=%s",
                type(exc).__name__,
                self.on_store_error,
            )


# The loops below index instead of ``zip(..., strict=True)``: compiled, that zip is a
# generic call costing several times the loop's own work (half a microsecond per request).


def _new_args(limits: Sequence[Limit], costs: Sequence[int]) -> list[int]:
    same_length(limits, costs)
    args: list[int] = []
    for i in range(len(limits)):
        limit = limits[i]
        args += (limit.amount, limit.window * 1000, max(0, int(costs[i])))
    return args


def _moves(reservation: Reservation, deltas: Sequence[int]) -> tuple[tuple[str, ...], list[int]]:
    """The settle script's keys and arguments: (window index, delta) per key that moves.
    The keys are a tuple: a memory store remembers its prefixed form."""
    names, indexes = reservation.keys, reservation.indexes
    same_length(names, deltas)
    same_length(indexes, deltas)
    keys: list[str] = []
    args: list[int] = []
    for i in range(len(deltas)):
        delta = deltas[i]
        if delta:
            keys.append(names[i])
            args.append(indexes[i])
            args.append(int(delta))
    return tuple(keys), args


def _sequence(values: Iterable[int]) -> Sequence[int]:
    """``values`` as a list or tuple (costs and deltas are read by index, more than once)."""
    return values if type(values) is tuple or type(values) is list else tuple(values)


def same_length(first: Sized, second: Sized) -> None:
    """What ``zip(first, second, strict=True)`` checks (``ValueError``), for loops that
    index instead."""
    if len(first) != len(second):
        raise ValueError(f"lengths differ: {len(first)} and {len(second)}")


def _weighted(window_ms: int, now_ms: int, index: int, cur: int, prev: int) -> tuple[float, int]:
    """(units in the sliding window, milliseconds left in the current fixed window)."""
    left_ms = window_ms - (now_ms - index * window_ms)
    # A float either way: compiled, the tuple's slot is one, and both builds count alike.
    return (prev * (left_ms / window_ms) + cur if prev else float(cur)), left_ms


def _retry_after(limit: Limit, cur: int, prev: int, cost: int, elapsed: float) -> float:
    """Seconds until ``cost`` fits the sliding window, if nothing else is charged meanwhile."""
    amount, window = limit.amount, limit.window
    if cost > amount:
        return math.inf
    room = amount - cur - cost
    if room >= 0:
        # Within this window, once the previous window's weight has decayed enough.
        if prev <= 0:
            return 0.0
        needed_share = 1 - room / prev  # share of the window that must have elapsed
        return max(0.0, needed_share * window - elapsed)
    # Only in the next window, where this window's count becomes the decaying one.
    rest = window - elapsed
    needed_share = 1 - (amount - cost) / cur if cur > 0 else 0.0
    return rest + max(0.0, needed_share) * window
