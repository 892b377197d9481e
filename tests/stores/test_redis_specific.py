"""What only some backends have: URLs, failures, timeouts, script reloads, memory bounds."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis, SSLConnection
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis_harness import RedisClusterProcesses, RedisProcesses, free_port

from gemini_scale.errors import ConfigurationError, StoreError, StoreUnavailableError
from gemini_scale.stores import MemoryStore, RedisStore, store_from_url
from gemini_scale.stores.scripts import COMPARE_AND_DELETE, INCR_WITH_TTL, SERVER_TIME

from .conftest import FakeClock, delete_prefixed, gather_all, unique_prefix

SECRET = "hunter2-s3cret"


@pytest.fixture
async def closing() -> AsyncIterator[list[RedisStore]]:
    """Stores to close after the test, whatever happens."""
    stores: list[RedisStore] = []
    yield stores
    for store in stores:
        await store.aclose()


def from_url(closing: list[RedisStore], url: str, **options: float) -> RedisStore:
    store = RedisStore.from_url(url, prefix=unique_prefix(), **options)  # type: ignore[arg-type]
    closing.append(store)
    return store


async def debug_sleep(client: Redis, seconds: float) -> None:
    """Block the whole server (needs ``--enable-debug-command local``)."""
    await client.execute_command("DEBUG", "SLEEP", str(seconds))  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def asleep(url: str, seconds: float) -> AsyncIterator[None]:
    """The server at ``url`` blocked in ``DEBUG SLEEP`` for ``seconds`` from about 0.1 s after
    entering; leaving waits for it to wake up."""
    blocker = Redis.from_url(url, socket_timeout=5)
    try:
        await blocker.ping()  # connected, so DEBUG SLEEP goes out at once
        sleeping = asyncio.create_task(debug_sleep(blocker, seconds))
        await asyncio.sleep(0.1)
        yield
        await sleeping
    finally:
        await blocker.aclose()


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- URLs -------------------------------------------------------------------------------------


async def test_redis_url(closing: list[RedisStore]) -> None:
    store = from_url(closing, f"redis://:{SECRET}@127.0.0.1:6390/2")
    client = store.client
    assert isinstance(client, Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 2)
    assert kwargs["password"] == SECRET
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 1.0
    # 64 operations in flight, plus up to 16 idle connections kept for scripts and GET.
    assert client.connection_pool.max_connections == 64 + 16
    retry = client.get_retry()
    assert retry is not None
    assert retry.get_retries() == 0


async def test_redis_url_options(closing: list[RedisStore]) -> None:
    store = from_url(
        closing, "redis://h", socket_timeout=0.1, connect_timeout=0.2, max_connections=7
    )
    assert isinstance(store.client, Redis)
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs.get("port", 6379), kwargs.get("db", 0)) == ("h", 6379, 0)
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.1, 0.2)
    assert store.client.connection_pool.max_connections == 7 + 7


async def test_rediss_url_uses_tls(closing: list[RedisStore]) -> None:
    store = from_url(closing, "rediss://user:pw@cache.example:6380")
    assert isinstance(store.client, Redis)
    assert store.client.connection_pool.connection_class is SSLConnection
    assert store.client.connection_pool.connection_kwargs["username"] == "user"


@pytest.mark.parametrize(
    ("url", "username", "password", "db"),
    [
        ("redis+sentinel://s1:26380,s2/mymaster", None, None, 0),
        (f"redis+sentinel://{SECRET}@s1:26380,s2/mymaster/3", None, SECRET, 3),
        (f"redis+sentinel://:{SECRET}@s1:26380,s2/mymaster", None, SECRET, 0),
        (f"redis+sentinel://user:{SECRET}@s1:26380,s2/mymaster/1", "user", SECRET, 1),
    ],
)
async def test_sentinel_url(
    closing: list[RedisStore], url: str, username: str | None, password: str | None, db: int
) -> None:
    store = from_url(closing, url, socket_timeout=0.1)
    client = store.client
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (db, username, password)
    assert kwargs["socket_timeout"] == 0.1
    assert kwargs["retry"].get_retries() == 0
    sentinels = pool.sentinel_manager.sentinels
    ports = [s.connection_pool.connection_kwargs["port"] for s in sentinels]
    assert ports == [26380, 26379]
    for sentinel in sentinels:
        assert sentinel.get_retry().get_retries() == 0
        assert sentinel.connection_pool.connection_kwargs["password"] == password


async def test_cluster_url(closing: list[RedisStore]) -> None:
    store = from_url(closing, f"redis+cluster://:{SECRET}@127.0.0.1:7000,127.0.0.1:7001/")
    client = store.client
    assert isinstance(client, RedisCluster)
    assert [node.name for node in client.startup_nodes] == ["127.0.0.1:7000", "127.0.0.1:7001"]
    assert client.retry.get_retries() == 0
    assert client.connection_kwargs["socket_timeout"] == 0.25
    assert client.connection_kwargs["password"] == SECRET
    assert client.connection_kwargs["max_connections"] == 64


async def test_store_from_url() -> None:
    clock = FakeClock(1_700_000_000.0)
    for url in (None, ""):
        memory = store_from_url(url, prefix="p", clock=clock, max_keys=5)
        assert isinstance(memory, MemoryStore)
        assert (memory.prefix, memory.max_keys) == ("p", 5)
    redis_store = store_from_url("redis://127.0.0.1:6390", prefix="p", socket_timeout=0.1)
    try:
        assert isinstance(redis_store, RedisStore)
        assert redis_store.prefix == "p"
    finally:
        await redis_store.aclose()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"http://:{SECRET}@host:6379", "scheme"),
        (f"user:{SECRET}@host:6379", "scheme"),
        (f"unix://:{SECRET}@/tmp/redis.sock", "scheme"),
        (f"redis://:{SECRET}@host:port/0", "port"),
        (f"redis://:{SECRET}@/0", "host"),  # was localhost, quietly
        ("redis://", "host"),
        (f"redis://:{SECRET}@host:6379/zero", "database"),
        (f"redis://:{SECRET}@host:6379/0?socket_timeout=soon", "socket_timeout"),
        # Options redis-py does not know: refused when the first command ran (a 500 each).
        (f"redis://:{SECRET}@host:6379/0?socket_timout=1", "socket_timout"),
        (f"redis://:{SECRET}@host:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs"),
        (f"redis+sentinel://:{SECRET}@s1:26379", "service"),
        (f"redis+sentinel://{SECRET}@s1:26379/", "service"),
        (f"redis+sentinel://:{SECRET}@s1:26379/mymaster/x", "database"),
        (f"redis+sentinel://:{SECRET}@/mymaster", "host"),
        (f"redis+sentinel://:{SECRET}@s1:99999/mymaster", "port"),
        (f"redis+sentinel://:{SECRET}@s1:26379/mymaster?ssl=true", "query"),
        (f"redis+cluster://:{SECRET}@h:7000/1", "database 0"),
        (f"redis+cluster://:{SECRET}@", "host"),
        (f"redis+cluster://:{SECRET}@h1:7000,,h2:7001", "host"),
        (f"redis+cluster://:{SECRET}@h:7000?password=x", "query"),
        ("redis+cluster://:hunter2/s3cret@h:x", "port"),
    ],
)
def test_bad_urls_never_echo_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RedisStore.from_url(url)
    assert problem in str(caught.value)
    chain: list[BaseException] = []
    exc: BaseException | None = caught.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for link in chain:
        for secret in (SECRET, "hunter2", "s3cret"):
            assert secret not in str(link)
            assert secret not in repr(link)


@pytest.mark.parametrize(
    "options",
    [
        {"socket_timeout": 0},
        {"connect_timeout": -1},
        {"pool_timeout": 0},
        {"max_connections": 0},
    ],
)
def test_bad_client_options(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://127.0.0.1", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "a{b", "x}", "{tag}"])
async def test_prefix_without_hash_tags(prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        MemoryStore(prefix=prefix)
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://127.0.0.1", prefix=prefix)
    client = Redis()
    try:
        with pytest.raises(ConfigurationError):
            RedisStore(client, prefix=prefix)
    finally:
        await client.aclose()


async def test_decoding_client_is_refused() -> None:
    client = Redis(decode_responses=True)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


# -- failures are fast and explicit ---------------------------------------------------------


async def assert_unavailable_fast(store: RedisStore) -> None:
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("k"),
        lambda: store.set("k", b"v", ttl=1),
        lambda: store.incr("k", ttl=1),
        lambda: store.run(COMPARE_AND_DELETE, ["k"], ["v"]),
        lambda: store.add_to_set("s", "m", ttl=1),
        store.ping,
    ]
    for operation in operations:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await operation()
        assert time.monotonic() - started < 0.5  # no retries, no backoff


async def test_nothing_listening(closing: list[RedisStore]) -> None:
    store = from_url(closing, dead_url())  # the constructor opens no connection
    await assert_unavailable_fast(store)


async def test_nothing_listening_cluster(closing: list[RedisStore]) -> None:
    store = from_url(closing, f"redis+cluster://127.0.0.1:{free_port()}")
    await assert_unavailable_fast(store)


async def test_nothing_listening_sentinel(closing: list[RedisStore]) -> None:
    store = from_url(closing, f"redis+sentinel://127.0.0.1:{free_port()}/mymaster")
    await assert_unavailable_fast(store)


@pytest.mark.redis
@pytest.mark.slow
async def test_killed_server(redis_servers: RedisProcesses, closing: list[RedisStore]) -> None:
    server = redis_servers.server()
    store = from_url(closing, server.url)
    await store.set("k", b"v", ttl=30)
    server.kill()
    await assert_unavailable_fast(store)


@pytest.mark.redis
@pytest.mark.slow
async def test_ping_after_a_restart_needs_no_second_probe(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    """Connections pooled before Redis restarted are closed by it; the first probe after the
    restart (the gateway's /readyz) finds Redis up all the same."""
    server = redis_servers.server()
    store = from_url(closing, server.url)
    await asyncio.gather(*(store.ping() for _ in range(4)))  # four pooled connections
    server.restart()
    for _ in range(3):
        await store.ping()
    await store.set("after", b"restart", ttl=30)
    assert await store.get("after") == b"restart"
    server.kill()
    with pytest.raises(StoreUnavailableError):
        await store.ping()  # a server that is gone is still reported


@pytest.mark.redis
@pytest.mark.slow
async def test_timed_out_incr_is_not_retried(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server("--enable-debug-command", "local")
    store = from_url(closing, server.url, socket_timeout=0.05)
    await store.run(INCR_WITH_TTL, ["warm-up"], [1, 30_000])  # connected, script loaded
    async with asleep(server.url, 0.6):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.incr("n", ttl=30)
        assert time.monotonic() - started < 0.4  # one 0.05 s timeout, not a retry loop
    # The INCR was sent once: the server applied it after the sleep (a timeout means
    # "outcome unknown"), and nothing sent it again.
    counted = int(await store.get("n") or 0)
    assert counted <= 1
    # The store works again. The timed-out INCR may land just after the read above (its
    # socket was closed, but Redis still runs what it had buffered), so the total is ours
    # plus at most that one: never a retried copy.
    assert await store.incr("n", ttl=30) in (counted + 1, 2)


@pytest.mark.redis
@pytest.mark.slow
async def test_saturated_store_waits_then_gives_up(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server("--enable-debug-command", "local")
    # Queued for the one connection, all served (a wait far longer than 30 round trips: a
    # wait of 0.1 s here failed once in about ten runs of the suite on a busy machine).
    queued = from_url(closing, server.url, max_connections=1, pool_timeout=5, socket_timeout=2)
    results = await gather_all(*(queued.incr("n", ttl=30) for _ in range(30)))
    assert sorted(results) == list(range(1, 31))
    store = from_url(closing, server.url, max_connections=1, pool_timeout=0.1, socket_timeout=2)
    async with asleep(server.url, 0.6):
        slow = asyncio.create_task(store.run(SERVER_TIME, [], []))  # holds the one turn
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="saturated"):
            await store.get("n")
        assert time.monotonic() - started < 0.4  # waited pool_timeout=0.1 s, then gave up
        assert isinstance(await slow, int)


# -- scripts --------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_scripts_reload_after_script_flush(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server()
    store = from_url(closing, server.url)
    assert await store.incr("n", ttl=30) == 1
    with server.client() as raw:
        assert raw.script_flush()
    assert await store.incr("n", ttl=30) == 2  # NOSCRIPT, SCRIPT LOAD, EVALSHA: counted once
    with server.client() as raw:
        sha = store.client.register_script(INCR_WITH_TTL.lua).sha
        assert raw.script_exists(sha) == [True]


@pytest.mark.redis
@pytest.mark.cluster
@pytest.mark.slow
async def test_cluster_scripts_reload_after_script_flush(
    redis_cluster: RedisClusterProcesses, closing: list[RedisStore]
) -> None:
    store = from_url(closing, redis_cluster.url)
    try:
        for tag in ("a", "b", "c", "d"):
            assert await store.incr(f"{{{tag}}}n", ttl=30) == 1
        for node in redis_cluster.nodes:
            with node.client() as raw:
                raw.script_flush()
        for tag in ("a", "b", "c", "d"):  # the tags land on different masters
            assert await store.incr(f"{{{tag}}}n", ttl=30) == 2
    finally:
        await delete_prefixed(store)


@pytest.mark.redis
@pytest.mark.cluster
@pytest.mark.slow
async def test_cluster_cross_slot_script_is_a_store_error(
    redis_cluster: RedisClusterProcesses, closing: list[RedisStore]
) -> None:
    store = from_url(closing, redis_cluster.url)
    with pytest.raises(StoreError) as caught:
        await store.run(COMPARE_AND_DELETE, ["rl:alice:a", "rl:bob:b"], ["x"])
    assert not isinstance(caught.value, StoreUnavailableError)


# -- clients --------------------------------------------------------------------------------


@pytest.mark.redis
async def test_injected_client_is_not_closed(machine_redis_url: str) -> None:
    client = Redis.from_url(machine_redis_url, socket_timeout=1)
    try:
        store = RedisStore(client, prefix=unique_prefix())
        await store.set("k", b"v", ttl=5)
        await store.aclose()
        assert await client.get(f"{store.prefix}:k") == b"v"
        await delete_prefixed(store)
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_sentinel_end_to_end(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    master = redis_servers.server()
    sentinel = redis_servers.sentinel(master, service="gsmaster")
    store = from_url(closing, f"redis+sentinel://127.0.0.1:{sentinel.port}/gsmaster")
    await store.ping()
    await store.set("k", b"v", ttl=30)
    assert await store.incr("n", ttl=30) == 1
    with master.client() as raw:
        assert raw.get(f"{store.prefix}:k") == b"v"


# -- memory bounds --------------------------------------------------------------------------


async def test_memory_store_stays_bounded_under_a_flood() -> None:
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock, max_keys=500)
    await store.set("keep", b"v", ttl=3600)
    peak = 0
    for i in range(10_000):
        await store.set(f"flood:{i}", b"x", ttl=3600)
        if i % 100 == 0:
            assert await store.get("keep") == b"v"  # used recently: never the one evicted
        peak = max(peak, len(store))
    assert peak <= 500
    assert await store.get("flood:0") is None  # least recently used: evicted
    assert await store.get("flood:9999") == b"x"


async def test_memory_store_evicts_expired_keys_first() -> None:
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock, max_keys=500)
    for i in range(100):
        await store.set(f"long:{i}", b"v", ttl=3600)  # the oldest keys, but still live
    for i in range(400):
        await store.set(f"short:{i}", b"v", ttl=1)
    clock.advance(2)
    for i in range(400):
        await store.set(f"new:{i}", b"v", ttl=3600)
    assert len(store) <= 500
    for i in range(100):
        assert await store.get(f"long:{i}") == b"v"


async def test_memory_store_sweeps_expired_keys() -> None:
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock, max_keys=10_000)  # a sweep every 1250 writes
    for i in range(2000):
        await store.set(f"short:{i}", b"v", ttl=1)
    clock.advance(2)
    for i in range(1100):
        await store.set(f"new:{i}", b"v", ttl=3600)
    assert len(store) < 2000  # swept without being read


async def test_memory_store_sweeps_keys_whose_expiry_was_brought_forward() -> None:
    """Sweeps skip a store where nothing can have expired yet, and still find keys whose
    expiry was moved earlier since the last sweep."""
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock, max_keys=10_000)  # a sweep every 1250 writes
    for i in range(2000):
        await store.set(f"k:{i}", b"v", ttl=3600)  # swept at write 1250: nothing expired
    for i in range(2000):
        await store.set(f"k:{i}", b"v", ttl=1)
    clock.advance(2)
    for i in range(1300):
        await store.set(f"new:{i}", b"v", ttl=3600)
    assert len(store) <= 1300  # the 2000 expired keys were swept without being read
    assert await store.get("new:0") == b"v"


async def test_memory_store_stays_within_its_byte_bound() -> None:
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock, max_bytes=64 * 1024)
    await store.set("keep", b"k" * 1000, ttl=3600)
    for i in range(500):  # about 1 MiB of 2 KiB values into 64 KiB
        await store.set(f"flood:{i}", bytes([i % 256]) * 2048, ttl=3600)
        assert store.size <= 64 * 1024
        if i % 10 == 0:
            assert await store.get("keep") == b"k" * 1000  # recently used: kept
    assert await store.get("flood:0") is None  # least recently used: evicted
    assert await store.get("flood:499") == bytes([499 % 256]) * 2048
    assert 20 <= len(store) <= 32  # as many 2 KiB values as the bound holds, no fewer


async def test_memory_store_byte_count_follows_overwrites_deletes_and_expiry() -> None:
    clock = FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=clock)
    assert store.size == 0
    await store.set("a", b"x" * 1000, ttl=10)
    one = store.size
    await store.set("a", b"x" * 10, ttl=10)  # overwritten: the old value no longer counts
    assert store.size == one - 990
    await store.set("b", b"y" * 500, ttl=1)
    await store.delete("a")
    clock.advance(2)
    assert await store.get("b") is None  # expired on read
    assert store.size == 0


async def test_a_value_bigger_than_the_bound_is_not_kept() -> None:
    store = MemoryStore(max_bytes=4096)
    await store.set("small", b"s", ttl=60)
    await store.set("huge", b"h" * 10_000, ttl=60)
    assert await store.get("huge") is None
    assert store.size <= 4096


def test_empty_memory_store_is_truthy() -> None:
    assert MemoryStore()  # `store or fallback` must not discard an empty store


def test_memory_store_needs_room() -> None:
    with pytest.raises(ConfigurationError):
        MemoryStore(max_keys=0)
    with pytest.raises(ConfigurationError):
        MemoryStore(max_bytes=0)


# -- connections kept between uses (stores made by from_url, outside a cluster) ---------------


@pytest.mark.redis
async def test_a_cancelled_command_never_leaves_its_reply_for_the_next(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server("--enable-debug-command", "local")
    store = from_url(closing, server.url, socket_timeout=2)
    await store.set("a", b"value-a", ttl=30)
    assert await store.get("a") == b"value-a"  # a connection is now kept idle
    async with asleep(server.url, 0.5):
        for operation in (store.run(SERVER_TIME, [], []), store.get("a")):
            pending = asyncio.ensure_future(operation)
            await asyncio.sleep(0.05)  # sent; the reply comes after the server wakes up
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
    # The replies of the cancelled commands arrive on connections that were dropped: every
    # later command reads its own reply.
    for _ in range(5):
        assert await store.get("a") == b"value-a"
        assert isinstance(await store.run(SERVER_TIME, [], []), int)
        assert await store.get("missing") is None


def tls_options(directory: Path) -> list[str]:
    """Options that make a server also listen with TLS (a fresh self-signed certificate)
    on ``--tls-port``, which the caller adds."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH (it makes the TLS test's certificate)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_write_the_kernel_cannot_take_is_bounded_by_the_socket_timeout(
    redis_servers: RedisProcesses, closing: list[RedisStore], tmp_path: Path, tls: bool
) -> None:
    tls_port = free_port()
    options = [*tls_options(tmp_path), "--tls-port", str(tls_port)] if tls else []
    server = redis_servers.server("--enable-debug-command", "local", *options)
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none" if tls else server.url
    store = from_url(closing, url, socket_timeout=0.2)
    await store.run(INCR_WITH_TTL, ["n"], [1, 30_000])  # a connection is kept idle
    async with asleep(server.url, 2.0):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            # More than the socket buffers hold while the server reads nothing.
            await store.run(INCR_WITH_TTL, ["n"], [1, 30_000, b"x" * (32 << 20)])
        assert time.monotonic() - started < 1.5  # the write timed out; it did not wait on
    await asyncio.sleep(0.2)
    # Dropped with what it still buffered, the command never reached the server whole.
    assert await store.run(INCR_WITH_TTL, ["n"], [1, 30_000]) == 2


@pytest.mark.redis
async def test_error_replies_keep_their_connections(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    # Out of memory, every write is refused: the cache's writes then fail on each miss, and
    # must not cost a new connection each (nor drop the kept ones).
    server = redis_servers.server("--maxmemory", "1", "--maxmemory-policy", "noeviction")
    store = from_url(closing, server.url)
    assert await store.get("a") is None  # connected; one connection is kept

    def connections_made() -> int:
        with server.client() as admin:
            return int(admin.info("stats")["total_connections_received"])

    before = connections_made()
    for _ in range(20):
        with pytest.raises(StoreError, match="OutOfMemoryError"):
            await store.set("a", b"value", ttl=30)
        with pytest.raises(StoreError, match="OutOfMemoryError"):
            await store.run(INCR_WITH_TTL, ["n"], [1, 30_000])
        assert await store.get("a") is None
    assert connections_made() - before <= 2  # the admin's own connections


@pytest.mark.redis
async def test_a_failure_while_closed_connections_are_swept_releases_each_once(
    redis_servers: RedisProcesses,
) -> None:
    from gemini_scale.stores.redis_connections import ReusedConnections

    primary, server = redis_servers.server(), redis_servers.server()
    pool = ConnectionPool.from_url(server.url, max_connections=64, socket_timeout=2)
    kept = ReusedConnections(pool, keep=16)
    try:
        # Six connections kept idle: the one on top named "keeper", the rest killed.
        await gather_all(*(kept.execute("CLIENT", "SETNAME", "victim") for _ in range(6)))
        await kept.execute("CLIENT", "SETNAME", "keeper")
        with server.client() as admin:
            for client in admin.client_list():
                if client["name"] == "victim":
                    admin.client_kill_filter(_id=client["id"])
            admin.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        await asyncio.sleep(0.1)  # the event loop sees the killed connections close
        # A write on the keeper fails (READONLY: every kept connection is dropped) while a
        # PING sweeps the killed ones aside: each is released once, and both get answers.
        write = asyncio.ensure_future(kept.execute("SET", "k", "v"))
        await asyncio.sleep(0)
        assert await kept.execute("PING") in (b"PONG", "PONG", True)
        with pytest.raises(redis_errors.ReadOnlyError):
            await write
        for _ in range(10):
            assert await kept.execute("GET", "k") is None
    finally:
        await kept.aclose()
        await pool.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_caller_cancelled_while_a_failure_drops_the_kept_connections_leaks_none(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server("--enable-debug-command", "local")
    store = from_url(closing, server.url, socket_timeout=0.1, max_connections=16)
    for extra in (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005):
        await gather_all(*(store.get("a") for _ in range(16)))  # 16 connections kept
        async with asleep(server.url, 0.25):
            # The read times out and the failure drops the kept connections; the caller's
            # own deadline, just after, cancels it somewhere in that (as a cache's
            # store_timeout would).
            with contextlib.suppress(TimeoutError, StoreUnavailableError):
                async with asyncio.timeout(0.1 + extra):
                    await store.get("a")
    # Every connection went back to the pool: a full burst still finds one each.
    assert await gather_all(*(store.get("a") for _ in range(16))) == [None] * 16


@pytest.mark.redis
@pytest.mark.slow
async def test_connections_the_server_closed_in_the_pool_are_reopened(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server("--timeout", "1")  # the server closes idle clients
    store = from_url(closing, server.url)
    # More at once than the store keeps: the rest wait in redis-py's own pool.
    assert await gather_all(*(store.get("a") for _ in range(40))) == [None] * 40
    await asyncio.sleep(2.5)  # the server closes them all
    assert await store.set_members("s") == frozenset()
    assert await gather_all(*(store.get("a") for _ in range(40))) == [None] * 40


@pytest.mark.redis
async def test_connections_closed_by_the_server_are_replaced_without_an_error(
    redis_servers: RedisProcesses, closing: list[RedisStore]
) -> None:
    server = redis_servers.server()
    store = from_url(closing, server.url)
    await store.set("a", b"value-a", ttl=30)
    # Several operations at once: several connections are kept idle afterwards.
    assert await gather_all(*(store.get("a") for _ in range(8))) == [b"value-a"] * 8
    admin = Redis.from_url(server.url)
    try:
        killed = await admin.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 2
        await asyncio.sleep(0.1)  # the event loop sees the connections close
        for _ in range(20):  # more than were kept: every one is replaced, none fails
            assert await store.get("a") == b"value-a"
            assert isinstance(await store.run(SERVER_TIME, [], []), int)
    finally:
        await admin.aclose()


class _FakeSentinels:
    """What ``SentinelConnectionPool`` asks Sentinels, answered from a variable."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def discover_master(self, service: str) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def discover_slaves(self, service: str) -> list[tuple[str, int]]:
        return []


@pytest.mark.redis
async def test_a_failover_costs_one_failed_operation_not_one_per_kept_connection(
    redis_servers: RedisProcesses,
) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from gemini_scale.stores.redis_connections import ReusedConnections

    old, new = redis_servers.server(), redis_servers.server()
    sentinels = _FakeSentinels(old.port)
    pool = SentinelConnectionPool(
        "svc", sentinels, socket_timeout=0.5, retry=Retry(NoBackoff(), 0), max_connections=80
    )
    client = Redis.from_pool(pool)
    store = RedisStore(client, prefix=unique_prefix(), max_concurrency=64)
    store._reused = ReusedConnections(pool, keep=16)  # as from_url sets it up
    try:
        # 16 operations at once: 16 connections to the old master are kept idle.
        await gather_all(*(store.incr(f"n{i}", ttl=60) for i in range(16)))
        await gather_all(*(store.run(SERVER_TIME, [], []) for _ in range(16)))
        with old.client() as admin:  # the failover: the old master becomes a replica
            admin.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
        sentinels.port = new.port
        failures = 0
        for i in range(20):
            try:
                await store.run(INCR_WITH_TTL, [f"after{i}"], [1, 60_000])
            except StoreError:
                failures += 1
        assert failures <= 1  # as plain redis-py: the first write meets READONLY
    finally:
        with old.client() as admin:
            admin.execute_command("REPLICAOF", "NO", "ONE")
        await client.aclose()
