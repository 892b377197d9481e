"""Redis faults under the example gateway, one app per ``GEMINI_SCALE_ON_STORE_ERROR`` mode,
all on one private ``redis-server`` (B15-B19, E02, E05).

The apps run in this process (their lifespan entered, requests through the streaming ASGI
transport): the faults are in Redis, which is a real server the test kills, restarts,
pauses, flushes and starves of memory. Every app accepts the same service-account key, so
the local apps are two replicas of one principal's limit. The gateway's store has the
defaults of ``RedisStore.from_url``: 0.25 s socket and connect timeouts, no retries; its
breaker opens after 3 consecutive failures for 5 s.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest

from tests.gateway import build, running
from tests.redis_harness import RedisProcess, RedisProcesses

from .support import ApiKey, client_api_keys, principal_key, read_window, restart_redis

pytestmark = [pytest.mark.slow, pytest.mark.redis]

MODES = ("local", "open", "closed")
STORE_TIMEOUT = 0.25
LIMITERS = 2  # per address, then per principal: each may wait one store timeout
LATENCY_BOUND = LIMITERS * STORE_TIMEOUT + 0.35


@dataclass
class Answer:
    app: str
    phase: str
    status: int
    headers: httpx.Headers
    body: bytes
    latency: float


@asynccontextmanager
async def gateways(
    server: RedisProcess, key: ApiKey, names: Mapping[str, str], **extra: str
) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """One in-process gateway per ``name -> on_store_error`` on ``server``."""
    async with AsyncExitStack() as stack:
        clients = {}
        for name, mode in names.items():
            env = {
                "GEMINI_SCALE_REDIS_URL": server.url,
                "GEMINI_SCALE_ON_STORE_ERROR": mode,
                "GEMINI_SCALE_CLIENT_API_KEYS": client_api_keys(key),
                "GEMINI_SCALE_RATE_LIMIT": "10000/hour",
                "GEMINI_SCALE_IP_RATE_LIMIT": "100000/hour",
                **extra,
            }
            client = await stack.enter_async_context(running(build(env), scope=None))
            client.headers.update(key.headers)
            clients[name] = client
        yield clients


async def ask(client: httpx.AsyncClient, app: str, phase: str) -> Answer:
    started = time.monotonic()
    response = await client.get("/v1beta/models")
    return Answer(
        app, phase, response.status_code, response.headers, response.content,
        time.monotonic() - started,
    )  # fmt: skip


def _unavailable(answer: Answer, *, counted_before: bool = False) -> bool:
    """A 503 UNAVAILABLE with Retry-After. ``counted_before``: a limiter in front may have
    counted the request (and then says so in RateLimit headers) before one failed."""
    return (
        answer.status == 503
        and httpx.Response(503, content=answer.body).json()["error"]["status"] == "UNAVAILABLE"
        and int(answer.headers["retry-after"]) >= 1
        and (counted_before or "ratelimit" not in answer.headers)
    )


async def test_redis_killed_mid_run_then_back(redis_servers: RedisProcesses) -> None:
    """B15/B18/E02: Redis is SIGKILLed under steady load and restarted (empty) on the same
    port. ``local`` and ``open`` answer no 5xx (``open`` without RateLimit headers, since
    nothing was counted); ``closed`` answers 503 UNAVAILABLE; no answer waits more than
    the store timeout per limiter. When Redis is back the two ``local`` replicas share the
    principal's limit again within the breaker cool-down (5 s) and a margin."""
    server = redis_servers.server()
    key = ApiKey("dora")
    names = {"local": "local", "local-2": "local", "open": "open", "closed": "closed"}
    answers: list[Answer] = []
    phase = "up"
    stop = asyncio.Event()

    async def load(client: httpx.AsyncClient, app: str) -> None:
        while not stop.is_set():
            began = phase
            answer = await ask(client, app, began)
            if phase != began:
                answer.phase = "during-kill"  # in flight when Redis died: either outcome
            answers.append(answer)
            await asyncio.sleep(0.01)

    async with gateways(server, key, names) as clients:
        tasks = [asyncio.create_task(load(c, n)) for n, c in clients.items()]
        try:
            await asyncio.sleep(0.4)
            server.kill()
            phase = "down"
            await asyncio.sleep(1.2)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        restarted = restart_redis(redis_servers, server)
        back_at = time.monotonic()

        # Poll until one request through each local replica lands in the one shared
        # counter, and the closed app answers again.
        bucket = principal_key(key, "requests-3600s")
        recovered_in = None
        with restarted.client() as admin:
            while time.monotonic() - back_at < 5.0 + 3.0:
                before = read_window(admin, bucket).get("c", 0)
                first = await ask(clients["local"], "local", "back")
                second = await ask(clients["local-2"], "local-2", "back")
                closed = await ask(clients["closed"], "closed", "back")
                answers += [first, second, closed]
                counted = read_window(admin, bucket).get("c", 0) - before
                if counted == 3 and closed.status == 200:  # local, local-2 and closed
                    recovered_in = time.monotonic() - back_at
                    break
                await asyncio.sleep(0.1)

    by: defaultdict[tuple[str, str], list[Answer]] = defaultdict(list)
    for answer in answers:
        by[(answer.app, answer.phase)].append(answer)
    for name in names:
        up, down = by[(name, "up")], by[(name, "down")]
        assert up
        assert all(a.status == 200 and "ratelimit" in a.headers for a in up)
        assert len(down) >= 5
        assert max(a.latency for a in down) <= LATENCY_BOUND
    for name in ("local", "local-2", "open"):
        assert all(a.status < 500 for a in answers if a.app == name)
    for name in ("local", "local-2"):  # limited on their own: headers, all 200
        assert all(a.status == 200 and "ratelimit" in a.headers for a in by[(name, "down")])
    # Nothing counted, so no RateLimit headers (B15).
    assert all(a.status == 200 and "ratelimit" not in a.headers for a in by[("open", "down")])
    assert all(_unavailable(a) for a in by[("closed", "down")])
    # In flight when Redis died: the per-address limiter may have counted the request just
    # before the principal limiter's call failed.
    odd = [
        a
        for a in by[("closed", "during-kill")]
        if not (a.status == 200 or _unavailable(a, counted_before=True))
    ]
    assert not odd, odd
    assert recovered_in is not None, "limits not shared again within the cool-down + 3 s"
    assert recovered_in <= 5.0 + 1.5


async def test_writes_paused_latency_bounded(redis_servers: RedisProcesses) -> None:
    """E05/B16: ``CLIENT PAUSE 2000 WRITE`` stalls the limiter's scripts. Under ``local``
    every request is still answered (200), none waits more than the store timeout per
    limiter, and once 3 timeouts opened each limiter's breaker the stall costs nothing.
    Nothing is counted twice: each timed-out script ran at most once."""
    server = redis_servers.server()
    key = ApiKey("erin")
    async with gateways(server, key, {"local": "local"}) as clients:
        client = clients["local"]
        warm = await ask(client, "local", "warm")  # scripts cached, connections open
        assert warm.status == 200
        bucket = principal_key(key, "requests-3600s")
        with server.client() as admin:
            assert read_window(admin, bucket)["c"] == 1
            admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
            paused_at = time.monotonic()
            paused = [await ask(client, "local", "paused") for _ in range(6)]
            assert time.monotonic() - paused_at < 2.0  # all of them inside the pause
            await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - paused_at)))
            counted = read_window(admin, bucket)["c"]

    assert all(a.status == 200 and "ratelimit" in a.headers for a in paused)
    assert max(a.latency for a in paused) <= LATENCY_BOUND
    assert all(a.latency >= STORE_TIMEOUT for a in paused[:3])  # they did wait for Redis
    assert all(a.latency < 0.2 for a in paused[3:])  # breakers open: not even tried
    assert 1 <= counted <= 1 + 3  # the warm request, plus at most each timed-out call once


async def test_out_of_memory_is_a_store_error(redis_servers: RedisProcesses) -> None:
    """B19: Redis over ``maxmemory`` (``noeviction``) refuses the scripts with OOM: each mode
    treats it as a store failure (``local``: limited per replica, ``open``: let through
    without RateLimit headers, ``closed``: 503 UNAVAILABLE), and nothing is charged."""
    server = redis_servers.server()
    key = ApiKey("fay")
    async with gateways(server, key, {mode: mode for mode in MODES}) as clients:
        for mode, client in clients.items():
            assert (await ask(client, mode, "warm")).status == 200
        bucket = principal_key(key, "requests-3600s")
        with server.client() as admin:
            admin.set("gs-filler", b"x" * 600_000)
            admin.config_set("maxmemory", "1mb")
            try:
                starved = {
                    mode: [await ask(client, mode, "oom") for _ in range(4)]
                    for mode, client in clients.items()
                }
                counted = read_window(admin, bucket)["c"]
            finally:
                admin.config_set("maxmemory", "0")

    assert all(a.status == 200 and "ratelimit" in a.headers for a in starved["local"])
    assert all(a.status == 200 and "ratelimit" not in a.headers for a in starved["open"])
    assert all(_unavailable(a) for a in starved["closed"])
    assert counted == len(MODES)  # the warm-up requests only
    for answers in starved.values():
        assert max(a.latency for a in answers) <= LATENCY_BOUND


async def test_script_flush_through_the_gateway(redis_servers: RedisProcesses) -> None:
    """B18: after ``SCRIPT FLUSH`` the next request reloads the scripts transparently:
    200 with RateLimit headers under ``closed`` (where any store error would be a 503)."""
    server = redis_servers.server()
    key = ApiKey("gus")
    async with gateways(server, key, {"closed": "closed"}) as clients:
        client = clients["closed"]
        assert (await ask(client, "closed", "warm")).status == 200
        with server.client() as admin:
            for _ in range(3):
                admin.script_flush()
                answer = await ask(client, "closed", "flushed")
                assert answer.status == 200
                assert "ratelimit" in answer.headers
            assert read_window(admin, principal_key(key, "requests-3600s"))["c"] == 4
