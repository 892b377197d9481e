"""security.md A41 and DESIGN.md §5 for IPv6: the per-address limit keys an IPv6 client on
its /64 (what one subscriber or host is given), not on each of its 2^64 addresses.

Before, every IPv6 address was its own bucket, so one client rotating the interface id of
its /64 was never limited; and in the example gateway those per-address counters shared one
bounded LRU memory store with the principals' counters, so unauthenticated traffic from new
addresses evicted them and a principal's spent budget came back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import example_app.app as gateway_module
from gemini_scale import (
    ConfigurationError,
    IPRateLimitMiddleware,
    MemoryStore,
    StreamingASGITransport,
    TrustedProxies,
    client_address,
    client_ip_key,
)
from gemini_scale.keys import DEFAULT_IPV6_PREFIX, Identity, client_bucket, identity
from tests.gateway import build, lifespan
from tests.ratelimit.conftest import Backend
from tests.ratelimit.helpers import error_of

LIMIT = 5
PROXY = "10.0.0.1"


def per_address(
    backend: Backend, trusted: Sequence[str] | TrustedProxies = (PROXY,)
) -> IPRateLimitMiddleware:
    """A per-address limiter of ``LIMIT`` requests an hour in front of a plain app."""

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    options: dict[str, Any] = {"store": backend.store(), "on_store_error": "closed"}
    if backend.clock is not None:
        options["clock"] = backend.clock
    return IPRateLimitMiddleware(
        Starlette(routes=[Route("/", ok)]),
        limit=f"{LIMIT}/hour",
        trusted_proxies=trusted if isinstance(trusted, TrustedProxies) else list(trusted),
        **options,
    )


async def get(
    app: IPRateLimitMiddleware, peer: str, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """One request from the TCP peer ``peer``."""
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/", headers=headers)


async def statuses(app: IPRateLimitMiddleware, peers: Sequence[str]) -> list[int]:
    return [(await get(app, peer)).status_code for peer in peers]


def scope_from(peer: str, forwarded: str | None = None) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return {"type": "http", "client": (peer, 1234), "headers": headers}


# -- the per-address limiter over HTTP, on memory and on Redis ---------------------------------


async def test_a_flood_from_one_ipv6_64_is_limited(backend: Backend) -> None:
    """Every request from a new address of one /64 (what repro2 did: 60 of them against a
    limit of 20 all passed) spends the same budget."""
    app = per_address(backend)
    flood = [f"2001:db8:0:2::{n + 1:x}" for n in range(3 * LIMIT)]
    flood[-1] = "2001:db8:0:2:ffff:ffff:ffff:ffff"  # the last address of the /64
    assert await statuses(app, flood) == [200] * LIMIT + [429] * (2 * LIMIT)
    refused = await get(app, "2001:DB8:0:2:abcd::9")
    assert refused.status_code == 429
    assert "per client_ip" in error_of(refused)["message"]


async def test_other_ipv6_64s_keep_their_own_budgets(backend: Backend) -> None:
    app = per_address(backend)
    assert await statuses(app, [f"2001:db8:0:2::{n + 1:x}" for n in range(LIMIT + 1)]) == [
        200
    ] * LIMIT + [429]
    # The neighbouring /64s, below and above, and another subscriber's network.
    for other in ("2001:db8:0:1:ffff::1", "2001:db8:0:3::1", "2001:db8:1:2::1"):
        assert await statuses(app, [other]) == [200], other


async def test_ipv4_and_ipv4_mapped_addresses_are_single_addresses(backend: Backend) -> None:
    app = per_address(backend)
    assert await statuses(app, ["198.51.100.7"] * LIMIT) == [200] * LIMIT
    # The same client on a dual-stack socket (IPv4-mapped IPv6) is the same bucket...
    assert await statuses(app, ["::ffff:198.51.100.7", "198.51.100.7"]) == [429, 429]
    # ... and IPv4 is never widened: the next address has its own budget.
    assert await statuses(app, ["198.51.100.8", "::ffff:198.51.100.6"]) == [200, 200]


async def test_forwarded_ipv6_behind_a_trusted_proxy_is_grouped_by_64(backend: Backend) -> None:
    app = per_address(backend)
    forwarded = [
        f"2001:db8:0:7::{n + 1:x}" if n % 3 == 0
        else f"[2001:db8:0:7:{n:x}::1]:443" if n % 3 == 1
        else f"203.0.113.50, 2001:db8:0:7::{n:x}:1"  # the client prepends what it likes
        for n in range(2 * LIMIT)
    ]
    answers = [
        (await get(app, PROXY, {"x-forwarded-for": value})).status_code for value in forwarded
    ]
    assert answers == [200] * LIMIT + [429] * LIMIT
    # Another /64 behind the same proxy, and the proxy's own requests, are not limited.
    assert (await get(app, PROXY, {"x-forwarded-for": "2001:db8:0:8::1"})).status_code == 200
    assert (await get(app, PROXY)).status_code == 200
    # An untrusted peer's X-Forwarded-For is ignored: the peer's /64 is the bucket.
    untrusted = [
        (await get(app, f"2001:db8:0:9::{n + 1:x}", {"x-forwarded-for": f"2001:db8:{n}::1"}))
        .status_code
        for n in range(LIMIT + 1)
    ]
    assert untrusted == [200] * LIMIT + [429]


@pytest.mark.parametrize(
    ("prefix", "shared"), [(48, True), (64, False), (128, False)]
)
async def test_the_limiters_take_the_prefix_from_trusted_proxies(
    backend: Backend, prefix: int, shared: bool
) -> None:
    """``trusted_proxies=TrustedProxies(..., ipv6_prefix=n)``: the middleware keeps ``n``."""
    app = per_address(backend, TrustedProxies([PROXY], ipv6_prefix=prefix))
    assert app.trusted.ipv6_prefix == prefix
    # LIMIT addresses, each in another /64 of one /48, then a sixth.
    spent = await statuses(app, [f"2001:db8:5:{n:x}::1" for n in range(LIMIT + 1)])
    assert spent == ([200] * LIMIT + [429] if shared else [200] * (LIMIT + 1))
    # Within one /64: one bucket unless every address is its own.
    same = await statuses(app, [f"2001:db8:6:0::{n + 1:x}" for n in range(LIMIT + 1)])
    assert same == ([200] * (LIMIT + 1) if prefix == 128 else [200] * LIMIT + [429])


async def test_a_flood_from_one_64_keeps_one_counter(backend: Backend) -> None:
    """DESIGN.md §5, bounded cardinality: a /64 is one bucket in the store, whatever
    number of its addresses send (the limiter's memo of parsed addresses stays bounded)."""
    app = per_address(backend)
    await statuses(app, [f"2001:db8:0:2::{n + 1:x}" for n in range(40)])
    await statuses(app, [f"2001:db8:0:3::{n + 1:x}" for n in range(40)])
    buckets = {found for found in app._addresses.values() if found is not None}
    assert {bucket.parts for bucket in buckets} == {
        (("client_ip", "2001:db8:0:2::/64"),),
        (("client_ip", "2001:db8:0:3::/64"),),
    }
    if backend.redis:
        counters = {key.split(b"}")[0] for key in await backend.keys()}
        assert len(counters) == 2


# -- the key functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded", "bucket"),
    [
        ("2001:db8:0:1:2:3:4:5", None, "2001:db8:0:1::/64"),
        ("2001:DB8:0:1:ffff:ffff:ffff:ffff", None, "2001:db8:0:1::/64"),
        ("fe80::1%eth0", None, "fe80::/64"),
        ("::1", None, "::/64"),
        ("198.51.100.7", None, "198.51.100.7"),
        ("::ffff:198.51.100.7", None, "198.51.100.7"),
        (PROXY, "2001:db8:0:1::abcd", "2001:db8:0:1::/64"),
        (PROXY, "[2001:db8:0:1::abcd]:443", "2001:db8:0:1::/64"),
        (PROXY, "::ffff:203.0.113.5", "203.0.113.5"),
        ("unix:/run/gw.sock", None, "unix:/run/gw.sock"),
        # The low bits tell these clients apart: NAT64 embeds an IPv4 client, Teredo a
        # client behind its NAT.
        ("64:ff9b::c000:201", None, "192.0.2.1"),
        ("64:ff9b::cb00:7101", None, "203.0.113.1"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", None, "2001:0:4136:e378:8000:63bf:3fff:fdd2"),
    ],
)
def test_the_client_ip_dimension_groups_ipv6_by_64(
    peer: str, forwarded: str | None, bucket: str
) -> None:
    trusted = TrustedProxies([PROXY])
    scope = scope_from(peer, forwarded)
    assert trusted.ipv6_prefix == DEFAULT_IPV6_PREFIX == 64
    assert client_bucket(scope, trusted) == bucket
    assert identity(scope, "client_ip", trusted=trusted) == Identity((("client_ip", bucket),))


def test_client_address_still_names_the_address() -> None:
    trusted = TrustedProxies([PROXY])
    assert client_address(scope_from("2001:db8:0:1:2:3:4:5"), trusted) == "2001:db8:0:1:2:3:4:5"
    assert client_address(scope_from(PROXY, "[2001:db8::9]:80"), trusted) == "2001:db8::9"


@pytest.mark.parametrize(
    ("prefix", "bucket"),
    [
        (128, "2001:db8:aa:bb:1:2:3:4"),
        (96, "2001:db8:aa:bb:1:2::/96"),
        (56, "2001:db8:aa::/56"),
        (48, "2001:db8:aa::/48"),
        (1, "::/1"),
    ],
)
def test_the_ipv6_prefix_is_configurable(prefix: int, bucket: str) -> None:
    trusted = TrustedProxies([PROXY], ipv6_prefix=prefix)
    assert client_bucket(scope_from("2001:db8:aa:bb:1:2:3:4"), trusted) == bucket
    assert client_bucket(scope_from("192.0.2.1"), trusted) == "192.0.2.1"
    # A copy keeps the prefix unless it is given (the middlewares copy what they get).
    assert TrustedProxies(trusted) == trusted
    assert TrustedProxies(trusted).ipv6_prefix == prefix
    assert TrustedProxies(trusted, ipv6_prefix=64).ipv6_prefix == 64
    assert (TrustedProxies(trusted, ipv6_prefix=64) == trusted) is (prefix == 64)


@pytest.mark.parametrize("prefix", [0, 129, -64, True, 64.0, "64"])
def test_a_bad_ipv6_prefix_is_refused(prefix: Any) -> None:
    with pytest.raises(ConfigurationError, match="ipv6_prefix"):
        TrustedProxies(ipv6_prefix=prefix)


async def test_the_slowapi_key_groups_ipv6_by_64() -> None:
    key = client_ip_key(trusted=TrustedProxies([PROXY]))
    seen: list[str] = []

    async def record(request: Request) -> PlainTextResponse:
        seen.append(key(request))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", record)])
    for peer, forwarded in [
        ("2001:db8:0:1::1", None),
        ("2001:db8:0:1::2", None),
        (PROXY, "2001:db8:0:1:ffff::3"),
        ("2001:db8:0:2::1", None),
        ("::ffff:192.0.2.1", None),
        ("192.0.2.1", None),
        ("192.0.2.2", None),
    ]:
        transport = httpx.ASGITransport(app=app, client=(peer, 1))
        headers = {"x-forwarded-for": forwarded} if forwarded else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/", headers=headers)).status_code == 200
    assert all(value.startswith("client_ip:") for value in seen)
    assert seen[0] == seen[1] == seen[2] != seen[3]
    assert seen[4] == seen[5] != seen[6]


# -- the example gateway: unauthenticated addresses never evict a principal's counters ---------


async def test_unauthenticated_addresses_do_not_reset_a_principals_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's in-memory stores, scaled down to 64 keys: a principal spends its
    budget, then unauthenticated requests from 200 new addresses (new /64s; 200 IPv4
    addresses would do the same) pass the per-address limit and are refused 401. The
    principal's budget stays spent: its counters are not in the per-address limiter's LRU."""
    monkeypatch.setattr(
        gateway_module, "store_from_url", lambda url, **options: MemoryStore(max_keys=64)
    )
    monkeypatch.setattr(gateway_module, "IP_MEMORY_KEYS", 64, raising=False)
    app = build(
        {
            "GEMINI_SCALE_RATE_LIMIT": "3/hour",
            "GEMINI_SCALE_IP_RATE_LIMIT": "1000/hour",
            "GEMINI_SCALE_TRUSTED_PROXIES": "127.0.0.1",
        }
    )
    async with lifespan(app):
        transport = StreamingASGITransport(app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            token = app.state.dev_issuer.mint(subject="alice")
            alice = {"authorization": f"Bearer {token}", "x-forwarded-for": "198.51.100.9"}
            spent = [(await client.get("/v1beta/models", headers=alice)).status_code
                     for _ in range(4)]
            assert spent == [200, 200, 200, 429]
            for n in range(200):
                stranger = {"x-forwarded-for": f"2001:db8:{n:x}:1::{n + 1:x}"}
                response = await client.get("/v1beta/models", headers=stranger)
                assert response.status_code == 401
            again = [(await client.get("/v1beta/models", headers=alice)).status_code
                     for _ in range(2)]
    assert again == [429, 429]
