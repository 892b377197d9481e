"""A store on Redis: standalone, Sentinel or Cluster, through redis-py asyncio.

Clients built here have short socket and connect timeouts and **no automatic retries**: a
retried ``INCR`` counts twice, and a timeout means the outcome is unknown, not that nothing
happened (research/security.md §2). Cluster redirections (``MOVED``/``ASK``) are still
followed; they are refusals, not executions, so following them never applies a write twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gemini_scale.errors import ConfigurationError, StoreError, StoreUnavailableError
from gemini_scale.stores.base import (
    DEFAULT_PREFIX,
    Script,
    ScriptArg,
    check_prefix,
    ttl_ms,
    value_bytes,
)
from gemini_scale.stores.redis_connections import ReusedConnections
from gemini_scale.stores.scripted import ScriptedOperations

_T = TypeVar("_T")
#: Idle connections a store made by ``from_url`` keeps for its scripts and plain commands.
_KEEP_IDLE = 16

RedisClient = Redis | RedisCluster
"""The clients :class:`RedisStore` accepts."""

SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")
"""URL schemes :meth:`RedisStore.from_url` understands."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes MaxConnectionsError, MasterNotFoundError
    redis_errors.TimeoutError,
    redis_errors.ClusterError,  # includes ClusterDownError: TTL of redirections exhausted
    redis_errors.SlotNotCoveredError,
    redis_errors.ReadOnlyError,  # a demoted master during a failover
    OSError,  # includes the builtin TimeoutError
)
_REDIS_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)
_TIMEOUTS = (redis_errors.TimeoutError, TimeoutError)  # (socket.timeout is TimeoutError)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _needs_initialize(cluster: RedisCluster) -> bool:
    # redis-py 8.1 loses connections when commands run concurrently with the cluster's lazy
    # (re)initialization (CLUSTER SLOTS after start-up or a connection error), so we run that
    # step alone. The flag is private: if it disappears, we fall back to redis-py's own path.
    return bool(getattr(cluster, "_initialize", False))


def _translate(exc: BaseException) -> StoreError:
    kind = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, _UNAVAILABLE) or (
        # "Redis Cluster cannot be connected" and "All slots are not covered" carry no type
        # of their own; the first is raised from the connection error.
        isinstance(exc, redis_errors.RedisClusterException)
        and (isinstance(exc.__cause__, _UNAVAILABLE) or "not covered" in str(exc))
    ):
        return StoreUnavailableError(f"Redis is unavailable ({kind})")
    return StoreError(f"Redis failed ({kind})")


class RedisStore(ScriptedOperations):
    """A :class:`~gemini_scale.stores.Store` on Redis (standalone, Sentinel or Cluster).

    ``RedisStore(client)`` uses a client you built and never closes it; configure it with
    short timeouts and ``retry=Retry(NoBackoff(), 0)`` as :meth:`from_url` does. No connection
    is opened until the first operation. Scripts are registered once per store and run with
    ``EVALSHA``; after a ``SCRIPT FLUSH`` or a failover redis-py loads them again (a reload
    is not a retry: the refused ``EVALSHA`` did not run).

    Errors: connection failures, timeouts and cluster-down conditions raise
    :class:`~gemini_scale.errors.StoreUnavailableError`; other Redis errors raise
    :class:`~gemini_scale.errors.StoreError`. After either, a write's outcome is unknown.

    :param client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``
        created with ``decode_responses=False``; kept as the ``client`` attribute.
    :param prefix: namespace prepended to every key as ``prefix + ":"``; no ``{`` or ``}``.
    :param max_concurrency: bound on operations in flight (``None``: unbounded). redis-py's
        pools fail at once when all connections are busy; with this bound, operations wait
        for a turn instead, up to ``acquire_timeout`` seconds.
    :param acquire_timeout: how long an operation waits for its turn before raising
        ``StoreUnavailableError``. An operation that waited for its turn while another one
        timed out raises it too, without sending: a Redis that hangs costs a queue of callers
        one timeout, not one each in turn. (Other failures, a reset connection say, fail
        only their own operation: they come at once, so nobody waits long behind them.)
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_concurrency: int | None = None,
        acquire_timeout: float = 1.0,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise ConfigurationError(
                "RedisStore needs a client created with decode_responses=False (values are bytes)."
            )
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if not acquire_timeout > 0:
            raise ConfigurationError(f"acquire_timeout must be > 0, got {acquire_timeout}")
        self.prefix = check_prefix(prefix)
        self.client = client
        self._head = prefix + ":"
        self._scripts: dict[str, AsyncScript] = {}
        self._gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._acquire_timeout = acquire_timeout
        self._timeouts = 0  # operations that timed out waiting for Redis, so far
        self._owned: list[Callable[[], Awaitable[None]]] = []
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._cluster_lock = asyncio.Lock()
        self._reused: ReusedConnections | None = None

    def __repr__(self) -> str:
        return f"RedisStore({type(self.client).__name__}, prefix={self.prefix!r})"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = 0.25,
        connect_timeout: float = 1.0,
        max_connections: int = 64,
        pool_timeout: float = 1.0,
    ) -> RedisStore:
        """Build a store and the client it owns from a URL; :meth:`aclose` closes the client.

        - ``redis://[[user]:password@]host[:port][/db][?option=value]`` and ``rediss://``
          (TLS): redis-py's own URL format.
        - ``redis+sentinel://[[user]:password@|password@]host[:port][,host[:port]...]/service[/db]``:
          the master of ``service`` as the Sentinels report it (default port 26379); the
          credentials are used for both the Sentinels and the master, as in ``limits``.
        - ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: a Redis Cluster
          discovered from these startup nodes.

        No connection is opened here. Every client gets ``socket_timeout``,
        ``connect_timeout`` and no retries; ``max_connections`` bounds the operations in
        flight, which wait up to ``pool_timeout`` seconds for a turn, and each connection pool
        (per node on a cluster). Outside a cluster the pool also keeps up to
        ``min(16, max_connections)`` idle connections for scripts and single commands,
        which skips redis-py's per-checkout lock and socket check on the hot path.

        :raises ConfigurationError: for a malformed URL or option (the message never
            contains the password).
        """
        for name, value in (
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
            ("pool_timeout", pool_timeout),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be at least 1, got {max_connections}")
        check_prefix(prefix)
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": _no_retry(),
        }
        # The pool holds the operations in flight (at most max_connections, the gate) plus
        # the idle connections kept for scripts and plain commands (see redis_connections.py).
        cluster = isinstance(url, str) and url.lower().startswith("redis+cluster://")
        keep = 0 if cluster else min(_KEEP_IDLE, max_connections)
        client, owned = _client_from_url(url, options, max_connections + keep)
        store = cls(
            client, prefix=prefix, max_concurrency=max_connections, acquire_timeout=pool_timeout
        )
        if keep and isinstance(client, Redis):
            store._reused = ReusedConnections(client.connection_pool, keep=keep)
        store._owned = owned
        return store

    async def _do(self, operation: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """Await ``operation(*args, **kwargs)`` within the concurrency gate, translating
        failures to :class:`StoreError` (a plain method: a generator-based context manager
        would cost more than the rest of a script call's Python work)."""
        gate = self._gate
        if gate is not None:
            if not gate.locked():
                await gate.acquire()  # returns at once: no timer on the common path
            else:
                timeouts = self._timeouts
                try:
                    async with asyncio.timeout(self._acquire_timeout):
                        await gate.acquire()
                except TimeoutError:
                    raise StoreUnavailableError(
                        f"Redis is saturated: no connection free within {self._acquire_timeout} s"
                    ) from None
                if self._timeouts != timeouts:
                    gate.release()
                    raise StoreUnavailableError(
                        "Redis timed out while this operation waited for its turn"
                    )
        try:
            if self._cluster is not None and _needs_initialize(self._cluster):
                async with self._cluster_lock:
                    if _needs_initialize(self._cluster):
                        await self._cluster.initialize()
            return await operation(*args, **kwargs)
        except _REDIS_ERRORS as exc:
            if isinstance(exc, _TIMEOUTS):
                self._timeouts += 1
            raise _translate(exc) from exc
        except (OSError, RuntimeError, AttributeError) as exc:
            # redis-py's asyncio cluster client can fail outside its own exception tree when
            # a connection is closed under a concurrent command (a half-closed transport:
            # AttributeError on plain asyncio, RuntimeError on uvloop). The outcome is
            # unknown, exactly like a timeout: report the store unavailable.
            raise StoreUnavailableError(
                f"Redis connection failed ({type(exc).__name__})"
            ) from exc
        finally:
            if gate is not None:
                gate.release()

    async def _command(self, *args: Any) -> Any:
        """One single-key command: on a kept connection when the store has them (the raw
        reply: ``SET`` answers ``b"OK"``, not ``True``; ``SMEMBERS`` a list), else through
        the client."""
        if self._reused is not None:
            return await self._do(self._reused.execute, *args)
        return await self._do(self.client.execute_command, *args)

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` when absent or expired."""
        value = await self._command("GET", self._head + key)
        return None if value is None else _bytes(value)

    async def set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``SET PX``)."""
        data, ms = value_bytes(value), ttl_ms(ttl)
        await self._command("SET", self._head + key, data, "PX", ms)

    async def set_if_absent(self, key: str, value: bytes, *, ttl: float) -> bool:
        """Store ``value`` only if ``key`` is absent (``SET NX PX``); whether it was stored."""
        data, ms = value_bytes(value), ttl_ms(ttl)
        stored = await self._command("SET", self._head + key, data, "PX", ms, "NX")
        return bool(stored)

    async def delete(self, *keys: str) -> int:
        """Remove ``keys``; how many existed. On a cluster, keys may span slots."""
        if not keys:
            return 0
        names = [self._head + key for key in keys]
        if self._reused is not None:  # never a cluster: one DEL for all
            return int(await self._do(self._reused.execute, "DEL", *names))
        return int(await self._do(self.client.delete, *names))

    async def set_members(self, key: str) -> frozenset[str]:
        """The members of a set (empty when absent)."""
        members = await self._command("SMEMBERS", self._head + key)
        return frozenset(_bytes(member).decode() for member in members)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        """Run ``script`` with ``EVALSHA`` on the prefixed ``keys``; see :class:`Script`."""
        head = self._head
        if self._reused is not None:
            result = await self._do(
                self._reused.evalsha, script.lua, [head + key for key in keys], list(args)
            )
        else:
            registered = self._scripts.get(script.lua)
            if registered is None:
                registered = self._scripts[script.lua] = self.client.register_script(script.lua)
            result = await self._do(registered, [head + key for key in keys], list(args))
        return _from_reply(result)

    async def ping(self) -> None:
        """Round-trip to Redis; raises ``StoreUnavailableError`` on any failure.

        A connection the server closed while it sat in the pool (Redis restarted) is not a
        failure of the store: on a connection error (not a timeout), the pool's idle
        connections are dropped and ``PING`` is sent once more, on a new connection.
        """
        try:
            await self._ping_once()
        except StoreUnavailableError as exc:
            if not isinstance(exc.__cause__, redis_errors.ConnectionError):
                raise
            await self._drop_idle_connections()
            await self._ping_once()

    async def _ping_once(self) -> None:
        try:
            await self._do(self.client.ping)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def _drop_idle_connections(self) -> None:
        """Disconnect the connections idle in the pool (a cluster's pools re-point
        themselves); the next use of each connects afresh."""
        client = self.client
        if isinstance(client, Redis):
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        """Close the client if :meth:`from_url` created it; an injected client stays open."""
        owned, self._owned = self._owned, []
        if self._reused is not None:
            await self._reused.aclose()
        for close in owned:
            await close()


def _client_from_url(
    url: str, options: dict[str, Any], max_connections: int
) -> tuple[RedisClient, list[Callable[[], Awaitable[None]]]]:
    if not isinstance(url, str):
        raise ConfigurationError(f"A store URL must be a string, not {type(url).__name__}.")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"Unsupported store URL {_redact(url)!r}: the scheme must be one of "
            f"{', '.join(s + '://' for s in SCHEMES)}."
        )
    userinfo, hosts, path, query = _split(url, scheme)
    username, password = _credentials(userinfo, bare_is_password=scheme == "redis+sentinel")
    shown = _redact(url)
    if scheme in ("redis", "rediss"):
        # A host is required: redis-py would quietly connect to localhost without one.
        _locations(hosts, default_port=6379, shown=shown)
        _db(path.lstrip("/"), shown=shown, allow_empty=True)
        try:
            client = Redis.from_url(url, max_connections=max_connections, **options)
            # redis-py passes query options it does not know on to each connection, which
            # refuses them only when the first command needs one: build one now (no I/O).
            client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            # redis-py's message names the bad option; scrubbed in case it echoes a value.
            detail = _scrub(str(exc), password)
            raise ConfigurationError(f"Invalid Redis URL {shown!r}: {detail}") from None
        return client, [client.aclose]

    if query:
        raise ConfigurationError(
            f"Invalid store URL {shown!r}: {scheme}:// URLs take no query parameters."
        )
    if scheme == "redis+cluster":
        nodes = _locations(hosts, default_port=6379, shown=shown)
        if path.strip("/"):
            raise ConfigurationError(
                f"Invalid store URL {shown!r}: Redis Cluster has only database 0, so a "
                "redis+cluster:// URL has no path."
            )
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            username=username,
            password=password,
            max_connections=max_connections,
            **options,
        )
        return cluster, [cluster.aclose]

    sentinels = _locations(hosts, default_port=26379, shown=shown)
    service, _, db_text = path.strip("/").partition("/")
    if not service:
        raise ConfigurationError(
            f"Invalid store URL {shown!r}: a redis+sentinel:// URL names the service, as in "
            "redis+sentinel://host:26379/mymaster[/db]."
        )
    db = _db(db_text, shown=shown, allow_empty=True)
    auth = {"username": username, "password": password}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs={**options, **auth}, **options, **auth
    )
    master: Redis = sentinel.master_for(service, db=db, max_connections=max_connections)
    return master, [master.aclose, *(s.aclose for s in sentinel.sentinels)]


def _split(url: str, scheme: str) -> tuple[str, str, str, str]:
    """``userinfo, hosts, path, query`` of a URL whose netloc may list several hosts.

    The credentials end at the *last* ``@``, so a password with an unescaped ``/`` or ``?``
    never leaks into the hosts or the path (which error messages might show).
    """
    userinfo, _, rest = url[len(scheme) + 3 :].rpartition("@")
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    hosts, slash, path = rest.partition("/")
    return userinfo, hosts, slash + path, query


def _credentials(userinfo: str, *, bare_is_password: bool) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    if ":" in userinfo:
        user, _, password = userinfo.partition(":")
        return urllib.parse.unquote(user) or None, urllib.parse.unquote(password)
    if bare_is_password:
        return None, urllib.parse.unquote(userinfo)
    return urllib.parse.unquote(userinfo), None


def _locations(
    hosts: str, *, default_port: int, shown: str, allow_empty: bool = False
) -> list[tuple[str, int]]:
    if not hosts and allow_empty:
        return []
    found: list[tuple[str, int]] = []
    for raw in hosts.split(","):
        location = raw.strip()
        try:
            parts = urllib.parse.urlsplit("//" + location)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigurationError(
                f"Invalid store URL {shown!r}: bad host or port {location!r}."
            ) from None
        if not host:
            raise ConfigurationError(f"Invalid store URL {shown!r}: a host is missing.")
        found.append((host, port or default_port))
    return found


def _db(text: str, *, shown: str, allow_empty: bool) -> int:
    if not text and allow_empty:
        return 0
    if not text.isdigit():
        raise ConfigurationError(
            f"Invalid store URL {shown!r}: the database must be a number."
        )
    return int(text)


def _redact(url: str) -> str:
    """``url`` with everything before its last ``@`` (the credentials) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _userinfo, at, tail = rest.rpartition("@")
    return f"{scheme}{sep}***@{tail}" if at else url


_INT_ONLY = {int}


def _from_reply(value: Any) -> Any:
    """A script reply in the form :func:`~gemini_scale.stores.base.normalize_result` gives.

    Redis already turned the Lua value into a reply (nil-terminated arrays included); only
    RESP3 booleans and doubles, and strings from a decoding client, need converting.
    """
    if type(value) is list and {*map(type, value)} == _INT_ONLY:
        return value  # already in normalized form (the common case: counters)
    if isinstance(value, bool):
        return 1 if value else None
    if isinstance(value, list):
        return [_from_reply(item) for item in value]
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, float):
        return int(value)
    return value


def _bytes(value: bytes | str) -> bytes:
    # Only a client with decode_responses=True answers str, and the constructor refuses one.
    return value if isinstance(value, bytes) else value.encode()


def _scrub(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
    return text

