"""The cache engine: stored responses in a :class:`~gemini_scale.stores.Store`, tag
generations, invalidation and single flight. Tested without ASGI.

Store layout (relative keys; the store adds its prefix), every key with a TTL:

- ``cache:{<key>}``: an entry (:class:`~gemini_scale.caching.entry.StoredResponse`), encoded
  (a plain ``MemoryStore`` is written without a script or a coroutine, see
  :attr:`CacheEngine.objects`, and a hit there decodes an entry once);
- ``cache:{<key>}:lock``: the single-flight lock of a key (same hash slot as the entry, so
  a follower's poll reads both in one script on Redis Cluster too);
- ``cache:gen:{<tag digest>}``: the current generation of a tag, absent until the tag is
  first invalidated.

**Invalidation by generation.** Every key includes the current generation of each of its
tags (the model, the owner, the policy's tags, and ``*``). Invalidating a tag writes a new
random generation: every entry made under the old one becomes unreachable at once and
expires by its own TTL. That is O(1) per tag, with no member sets to grow or to keep
consistent with evictions, and it works on Redis Cluster (one key per tag). An answer
being recorded while its tag is invalidated is stored under the old generation, so it is
never served. Generations are random (never reused), and live ``max_ttl + lock_ttl``
seconds after their last change, longer than any entry made under an earlier one.
Each process remembers the generations it read for ``tag_refresh`` seconds: an
invalidation is immediate on the process that made it and reaches the others within
that time (``tag_refresh=0``: read on every request, one more store read per tag).

**Single flight.** The first miss for a key in a process leads; later ones in the same
process wait for it in memory. With a shared store the local leader also takes a
short-lived lock, in one script that returns the entry instead when a leader elsewhere
stored it meanwhile; the leader's write stores the entry and releases the lock in one
script too (a miss costs three round trips: the lookup, the lock, the write). Other
processes' leaders poll for the entry (one script call per poll, backing off to
``max_poll_interval``) until it appears, the lock is gone, or ``wait_timeout`` passes.
Followers only ever receive a complete cacheable 200; when none comes they call upstream
themselves.

**Failures.** A store error makes the cache step aside (the caller goes upstream and does
not store); an unreachable store is not asked again for ``retry_after`` seconds, and the
failure is logged at most once per ``log_interval``. A corrupt entry is a miss, and is
deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio

from gemini_scale.caching.entry import CorruptEntryError, StoredResponse
from gemini_scale.caching.keys import ALL_TAG, entry_key, model_tag, principal_tag, tenant_tag
from gemini_scale.caching.scripts import FOUND, GONE, LOCK, LOCKED, POLL, STORE
from gemini_scale.errors import ConfigurationError, StoreError, StoreUnavailableError
from gemini_scale.memo import remember
from gemini_scale.observability.metrics import record_store_error
from gemini_scale.principal import Principal
from gemini_scale.stores.base import Store, ttl_ms
from gemini_scale.stores.memory import MemoryStore
from gemini_scale.stores.scripts import COMPARE_AND_DELETE
from gemini_scale.types import SYSTEM_CLOCK, Clock

logger = logging.getLogger("gemini_scale.caching")

T = TypeVar("T")

_MEMO_SIZE: Final = 1024
#: The most bytes the remembered decoded entries keep alive (each counted twice: the
#: encoded entry and its decoded copy), and at most an eighth of an in-process store's
#: ``max_bytes``: what a hit decodes is remembered for the next hits, within the bound.
_MEMO_BYTES: Final = 32 * 1024 * 1024
_GENERATIONS_SIZE: Final = 10_000
_KEYS_SIZE: Final = 10_000
_NO_GENERATION: Final = "0"


@dataclass(slots=True)
class CacheStats:
    """Counters of what the cache did (for metrics and tests)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    """Requests answered with another request's response (single flight)."""
    stored: int = 0
    bypassed: int = 0
    store_errors: int = 0
    corrupt: int = 0
    waits: int = 0
    """Misses that waited for another request's answer (in this process or another)."""
    wait_timeouts: int = 0


@dataclass(eq=False, slots=True)
class Flight:
    """One key's upstream call in progress in this process."""

    key: str
    done: asyncio.Event | None = None
    """Created by the first follower (an uncontended miss needs none)."""
    response: StoredResponse | None = None
    token: bytes | None = None
    """The store lock's value while this process's leader holds it."""
    deleted: bool = False
    """Its key was deleted (``invalidate(keys=...)``) during the call: not stored."""


def _generations_suffix(generations: Sequence[str]) -> bytes:
    return b"\x00" + ",".join(generations).encode("ascii")


def _positive(name: str, value: float | int, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(value)


class CacheEngine:
    """Stored responses, tag invalidation and single flight over one store.

    Options:
        store: where entries, locks and generations live.
        clock: wall time for freshness and ``Age``; monotonic time for the generation memo
            and the store back-off. Waits use the event loop's own clock.
        namespace: first segment of every key.
        lock_ttl: lifetime of a single-flight lock (a leader that dies frees it then).
        wait_timeout: longest a follower waits for the leader's answer.
        poll_interval, max_poll_interval: a cross-process follower's first and longest
            pause between polls (doubling).
        distributed_lock: take the lock in the store; ``None``: unless the store is a
            ``MemoryStore`` (in-process coordination is then exact already).
        tag_refresh: seconds a process trusts the tag generations it read.
        max_ttl: the longest entry lifetime (longer policies are capped).
        store_timeout: bound on each store call (``None``: the store's own timeouts).
        retry_after: after the store was unreachable, seconds the cache steps aside
            without asking it.
        log_interval: at most one store-failure warning per this many seconds.
    """

    def __init__(
        self,
        store: Store,
        # ``float | int``, not ``float``: mypyc would turn an int (a bool too) into a float
        # before _positive sees it; the union keeps the value as passed, as Python does.
        *,
        clock: Clock = SYSTEM_CLOCK,
        namespace: str = "cache",
        lock_ttl: float | int = 30.0,
        wait_timeout: float | int = 10.0,
        poll_interval: float | int = 0.005,
        max_poll_interval: float | int = 0.1,
        distributed_lock: bool | None = None,
        tag_refresh: float | int = 1.0,
        max_ttl: float | int = 86_400.0,
        store_timeout: float | None = None,
        retry_after: float | int = 1.0,
        log_interval: float | int = 60.0,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}:"):
            raise ConfigurationError(f"namespace must be non-empty without '{{}}:': {namespace!r}")
        self.store = store
        self.clock = clock
        self.namespace = namespace
        self.lock_ttl = _positive("lock_ttl", lock_ttl)
        self.wait_timeout = _positive("wait_timeout", wait_timeout, zero=True)
        self.poll_interval = _positive("poll_interval", poll_interval)
        self.max_poll_interval = max(_positive("max_poll_interval", max_poll_interval),
                                     self.poll_interval)
        self.tag_refresh = _positive("tag_refresh", tag_refresh, zero=True)
        self.max_ttl = _positive("max_ttl", max_ttl)
        self.store_timeout = (
            None if store_timeout is None else _positive("store_timeout", store_timeout)
        )
        self.retry_after = _positive("retry_after", retry_after, zero=True)
        self.log_interval = _positive("log_interval", log_interval, zero=True)
        in_process = isinstance(store, MemoryStore)
        self.distributed_lock = not in_process if distributed_lock is None else distributed_lock
        # A plain MemoryStore (not a subclass that may override its methods) is written and
        # read synchronously (put_now, held). Not written so with a distributed lock, whose
        # scripts release the lock in the same step.
        self._memory = store if type(store) is MemoryStore else None
        self.objects = None if self.distributed_lock else self._memory
        """The store entries are written to synchronously (see :meth:`put_now`), or
        ``None``."""
        self.stats = CacheStats()
        # A MemoryStore hands back the very bytes object it was given, so an entry decoded
        # once is recognised by identity on every later hit (no re-parsing).
        self._memo: dict[int, tuple[bytes, StoredResponse]] | None = {} if in_process else None
        limit = store.max_bytes if isinstance(store, MemoryStore) else None
        self._memo_budget = _MEMO_BYTES if limit is None else min(_MEMO_BYTES, limit // 8)
        self._memo_bytes = 0
        self._flights: dict[str, Flight] = {}
        self._generations: dict[str, tuple[str, float]] = {}
        # material -> (key, epoch, fresh until): keys stay valid while no generation changed
        self._keys: dict[bytes, tuple[str, int, float]] = {}
        self.epoch = 0
        """Grows whenever a remembered generation changes: keys made before are stale."""
        self._down_until = -math.inf
        self._last_warning = -math.inf

    def __repr__(self) -> str:
        return f"CacheEngine({self.store!r}, namespace={self.namespace!r})"

    # -- tags (for invalidate)

    ALL: Final = ALL_TAG
    """The tag every entry carries: ``invalidate(tags=[CacheEngine.ALL])`` empties the cache."""
    # Methods, not ``staticmethod(model_tag)`` attributes: mypyc compiles a class attribute
    # into a data descriptor, which is not callable.
    @staticmethod
    def model_tag(model: str) -> str:
        """:func:`gemini_scale.caching.keys.model_tag`."""
        return model_tag(model)

    @staticmethod
    def principal_tag(principal: Principal) -> str:
        """:func:`gemini_scale.caching.keys.principal_tag`."""
        return principal_tag(principal)

    @staticmethod
    def tenant_tag(issuer: str, tenant: str) -> str:
        """:func:`gemini_scale.caching.keys.tenant_tag`."""
        return tenant_tag(issuer, tenant)

    # -- names

    def entry_name(self, key: str) -> str:
        """The store key of the entry ``key``."""
        return f"{self.namespace}:{{{key}}}"

    def _lock_name(self, key: str) -> str:
        return f"{self.namespace}:{{{key}}}:lock"

    def _generation_name(self, tag: str) -> str:
        digest = hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return f"{self.namespace}:gen:{{{digest}}}"

    @staticmethod
    def key(material: bytes, generations: Sequence[str]) -> str:
        """An entry key from a request's framed key material and its tags' generations."""
        return entry_key(material + _generations_suffix(generations))

    def known_key(self, material: bytes) -> str | None:
        """The key :meth:`key_for` gave ``material`` if it is still valid, without waiting."""
        known = self._keys.get(material)
        if known is not None and known[1] == self.epoch and known[2] > self.clock.monotonic():
            return known[0]
        return None

    async def key_for(self, material: bytes, tags: Sequence[str]) -> str:
        """:meth:`key` with the current generations of ``tags`` (raises ``StoreError``).

        Remembered per ``material`` until one of the tags' generations changes or is due
        for a refresh, so a repeated request costs one dictionary lookup."""
        remembered = self.known_key(material)
        if remembered is not None:
            return remembered
        epoch = self.epoch  # before the read: an invalidation during it makes this stale
        suffix, fresh_until = await self.generations(tags)
        key = entry_key(material + suffix)
        remember(self._keys, material, (key, epoch, fresh_until), _KEYS_SIZE)
        return key

    async def generations(self, tags: Sequence[str]) -> tuple[bytes, float]:
        """What :meth:`key` appends to key material for ``tags`` (their current
        generations), and until when (monotonic) it holds unless :attr:`epoch` grows.
        Raises ``StoreError``."""
        now = self.clock.monotonic()
        memo = self._generations
        generations: list[str] = []
        fresh_until = math.inf
        for tag in tags:
            found = memo.get(tag)
            if found is None or found[1] <= now:
                found = await self._generation(tag, now)
            generations.append(found[0])
            fresh_until = min(fresh_until, found[1])
        return _generations_suffix(generations), fresh_until

    # -- store calls

    async def _run(self, call: Callable[..., Awaitable[T]], *args: Any, **options: Any) -> T:
        """``call(*args, **options)`` on the store, bounded by ``store_timeout``; failures
        become ``StoreError`` (and an unreachable store is not asked for ``retry_after``)."""
        if self._down_until != -math.inf:
            if self._down_until > self.clock.monotonic():
                raise StoreUnavailableError("the cache store failed recently; not asking it yet")
            self._down_until = -math.inf
        try:
            if self.store_timeout is None:
                return await call(*args, **options)
            async with asyncio.timeout(self.store_timeout):
                return await call(*args, **options)
        except StoreError as exc:
            raise self._failed(exc) from exc
        except TimeoutError as exc:
            failure = StoreUnavailableError(
                f"the cache store did not answer within {self.store_timeout} s"
            )
            raise self._failed(failure) from exc

    def _failed(self, exc: StoreError) -> StoreError:
        now = self.clock.monotonic()
        self.stats.store_errors += 1
        record_store_error("cache")
        if isinstance(exc, StoreUnavailableError):
            self._down_until = now + self.retry_after
        if now - self._last_warning >= self.log_interval:
            self._last_warning = now
            logger.warning("cache store failed; the cache steps aside: %s", exc)
        return exc

    # -- generations and invalidation

    async def _generation(self, tag: str, now: float) -> tuple[str, float]:
        epoch = self.epoch
        raw = await self._run(self.store.get, self._generation_name(tag))
        if self.epoch != epoch:
            # Generations changed while we read (an invalidation here, or another read):
            # one remembered since is newer than what we read, which must not replace it.
            found = self._generations.get(tag)
            if found is not None and found[1] > now:
                return found
        known = (raw.decode("ascii", "replace") if raw else _NO_GENERATION, now + self.tag_refresh)
        self._remember_generation(tag, known)
        return known

    def _remember_generation(self, tag: str, known: tuple[str, float]) -> None:
        memo = self._generations
        previous = memo.get(tag)
        if previous is not None and previous[0] != known[0]:
            self.epoch += 1  # remembered keys that used the old generation are stale
        if previous is None and len(memo) >= _GENERATIONS_SIZE:
            memo.clear()
            self.epoch += 1
        memo[tag] = known

    async def invalidate(self, *, tags: Iterable[str] = (), keys: Iterable[str] = ()) -> int:
        """Make entries unreachable: all entries carrying any of ``tags`` (see
        :mod:`gemini_scale.caching.keys` for ``model_tag``, ``principal_tag``,
        ``tenant_tag`` and ``ALL_TAG``) and the entries ``keys`` (as shown by
        ``Cache-Status`` ``key`` or ``RequestContext.extras["cache_key"]``).

        Returns the number of tags renewed plus entries deleted. Raises ``StoreError``
        when the store fails (the invalidation may then be partial).
        """
        count = 0
        for tag in tags:
            generation = secrets.token_hex(8)
            await self.store.set(
                self._generation_name(tag), generation.encode(), ttl=self.max_ttl + self.lock_ttl
            )
            self._remember_generation(tag, (generation, self.clock.monotonic() + self.tag_refresh))
            self.epoch += 1
            count += 1
        keys = list(keys)
        for key in keys:  # an answer being recorded here for the key is not stored,
            flight = self._flights.pop(key, None)  # and later misses do not join its call
            if flight is not None:
                flight.deleted = True
        names = [self.entry_name(key) for key in keys]
        if names:
            count += await self.store.delete(*names)
        return count

    # -- entries

    def held(self, name: str) -> StoredResponse | Literal[False] | None:
        """On a ``MemoryStore``: the fresh entry stored as ``name`` (:meth:`entry_name`),
        or ``None``, synchronously. ``False``: ask :meth:`get` (another store, or an entry
        that does not decode)."""
        memory = self._memory
        if memory is None:
            return False
        found = memory.get_object(name)
        if type(found) is not bytes:
            return None if found is None else False
        try:
            response = self._decoded(found)
        except CorruptEntryError:
            return False  # get() deletes it
        return response if response.expires > self.clock.time() else None

    async def get(self, key: str) -> StoredResponse | None:
        """The fresh entry ``key``, or ``None``. Raises ``StoreError`` when the store fails."""
        name = f"{self.namespace}:{{{key}}}"
        found = self.held(name)
        if found is not False:
            return found
        raw = await self._run(self.store.get, name)
        if raw is None:
            return None
        return await self._fresh(name, raw)

    async def _fresh(self, name: str, raw: bytes) -> StoredResponse | None:
        try:
            response = self._decoded(raw)
        except CorruptEntryError as exc:
            self.stats.corrupt += 1
            logger.warning("cache entry %s is corrupt (%s); deleted", name, exc)
            with contextlib.suppress(StoreError):  # else it expires by its TTL
                await self._run(self.store.delete, name)
            return None
        return response if response.expires > self.clock.time() else None

    def _decoded(self, raw: bytes) -> StoredResponse:
        """``raw`` decoded, remembered by identity for an in-process store (which returns
        the very bytes object on each hit): a hot entry is decoded once. Raises
        :class:`CorruptEntryError`."""
        memo = self._memo
        known = memo.get(id(raw)) if memo is not None else None
        if known is not None and known[0] is raw:
            return known[1]
        response = StoredResponse.decode(raw)
        self._remember(raw, response)
        return response

    def _remember(self, raw: bytes, response: StoredResponse) -> None:
        """Keep ``response`` for the next hits on ``raw``, within the memo's bounds (a
        store's ``max_bytes`` must not be exceeded by copies of what it evicted)."""
        memo = self._memo
        if memo is None:
            return
        size = 2 * len(raw)
        if size > self._memo_budget:
            return  # never remembered: decoded on each hit, the others kept
        if len(memo) >= _MEMO_SIZE or self._memo_bytes + size > self._memo_budget:
            memo.clear()
            self._memo_bytes = 0
        memo[id(raw)] = (raw, response)
        self._memo_bytes += size

    async def put(
        self, key: str, response: StoredResponse, flight: Flight | None = None
    ) -> bool:
        """Store ``response`` under ``key`` until it expires (at most ``max_ttl``); whether
        it was stored (a store failure is logged, never raised). A leader passes its
        ``flight``: the store lock is released in the same round trip, and nothing is
        stored when the key was deleted during the call (the answer may be stale)."""
        held = self.put_now(key, response, flight)
        if held is not None:
            return held
        ttl = self._store_ttl(response)
        if ttl <= 0:
            return False
        name = self.entry_name(key)
        try:
            raw = response.encode()
        except ValueError:  # a field holding NUL: not stored (land() releases the lock)
            return False
        try:
            if flight is None or flight.token is None:
                await self._run(self.store.set, name, raw, ttl=ttl)
            else:
                keys = [name, self._lock_name(key)]
                await self._run(self.store.run, STORE, keys, [raw, ttl_ms(ttl), flight.token])
                flight.token = None
        except StoreError:
            return False
        self._remember(raw, response)
        self.stats.stored += 1
        return True

    def _store_ttl(self, response: StoredResponse) -> float:
        """How long the store keeps ``response`` from now: to its expiry, and never past
        ``max_ttl`` after it was made. ``created`` is when its request began, before its
        key was worked out, so an entry a tag invalidation overtook (it is stored under the
        old generation) is gone before that generation's record expires and its key
        could be reached again."""
        return min(response.expires, response.created + self.max_ttl) - self.clock.time()

    def put_now(
        self, key: str, response: StoredResponse, flight: Flight | None = None
    ) -> bool | None:
        """:meth:`put` without waiting, when the store holds :attr:`objects` (no store lock
        is ever held then); ``None``: it does not, :meth:`put`."""
        if flight is not None and flight.deleted:
            return False
        objects = self.objects
        if objects is None:
            return None
        ttl = self._store_ttl(response)
        if ttl <= 0:
            return False
        # Held encoded, as Redis would hold it: bytes in a tuple of bytes and numbers, which
        # the garbage collector stops tracking at once. An object per entry (and the tuple
        # holding it) would reach the oldest generation tracked, and every few thousand
        # misses set off a full collection walking the whole cache (30 ms at 100,000
        # entries: several microseconds per miss). Hits decode it once (see _decoded).
        try:
            raw = response.encode()
        except ValueError:  # a field holding NUL: not stored
            return False
        objects.set_object(self.entry_name(key), raw, ttl=ttl, size=len(raw))
        self.stats.stored += 1
        return True

    # -- single flight

    def lead(self, key: str) -> Flight | None:
        """The flight of ``key`` this request leads, when that is known without waiting:
        in-process coordination only, and no request of this process is on ``key``. Then
        :meth:`land` it as after :meth:`join`. ``None``: :meth:`join`."""
        flights = self._flights
        if self.distributed_lock or key in flights:
            return None
        flight = flights[key] = Flight(key)
        return flight

    async def join(self, key: str) -> tuple[Flight | None, StoredResponse | None]:
        """Join the single flight of ``key`` after a miss.

        ``(flight, None)``: this request leads; call upstream, store a cacheable answer,
        then always :meth:`land` the flight. ``(None, response)``: the answer another
        request got. ``(None, None)``: no usable answer came (the leader failed, its answer
        was not cacheable, or the wait timed out): call upstream alone.
        """
        flight = self._flights.get(key)
        if flight is not None:
            done = flight.done
            if done is None:
                done = flight.done = asyncio.Event()
            self.stats.waits += 1
            try:
                async with asyncio.timeout(self.wait_timeout):
                    await done.wait()
            except TimeoutError:
                self.stats.wait_timeouts += 1
                return None, None
            return None, flight.response
        flight = self.lead(key)
        if flight is not None:
            return flight, None
        flight = self._flights[key] = Flight(key)
        try:
            leads, response = await self._lock_or_wait(flight)
        except BaseException:
            self.settle(flight, None)
            raise
        if leads:
            return flight, None
        self.settle(flight, response)
        return None, response

    async def _lock_or_wait(self, flight: Flight) -> tuple[bool, StoredResponse | None]:
        token = secrets.token_hex(8).encode()
        keys = [self.entry_name(flight.key), self._lock_name(flight.key)]
        try:
            state = await self._run(self.store.run, LOCK, keys, [token, ttl_ms(self.lock_ttl)])
        except StoreError:
            return True, None  # no coordination possible: go upstream (and store nothing)
        if state[0] == LOCKED:
            flight.token = token
            return True, None
        if state[0] == FOUND:  # a leader elsewhere stored it just before we asked
            found = await self._fresh(keys[0], state[1])
            return found is None, found
        return False, await self._wait_in_store(flight.key)

    async def _wait_in_store(self, key: str) -> StoredResponse | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        delay = self.poll_interval
        keys = [self.entry_name(key), self._lock_name(key)]
        self.stats.waits += 1
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self.max_poll_interval)
            try:
                state = await self._run(self.store.run, POLL, keys, [])
            except StoreError:
                return None
            if state[0] == FOUND:
                return await self._fresh(keys[0], state[1])
            if state[0] == GONE:
                return None
        self.stats.wait_timeouts += 1
        return None

    async def land(self, flight: Flight, response: StoredResponse | None) -> None:
        """End a flight this request led: its local followers get ``response`` (a complete
        cacheable answer, or ``None``), and the store lock is released."""
        self.settle(flight, response)
        if flight.token is not None:
            with anyio.CancelScope(shield=True):
                await self._unlock(flight)

    def settle(self, flight: Flight, response: StoredResponse | None) -> None:
        """End a flight for this process: its local followers get ``response``. All of
        :meth:`land` for a flight holding no store lock (``flight.token is None``)."""
        flight.response = response
        if flight.done is not None:
            flight.done.set()
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    async def _unlock(self, flight: Flight) -> None:
        token, flight.token = flight.token, None
        if token is None:
            return
        with contextlib.suppress(StoreError):  # else the lock expires by its TTL
            await self._run(
                self.store.run, COMPARE_AND_DELETE, [self._lock_name(flight.key)], [token]
            )
