"""``RateLimitMiddleware`` and ``IPRateLimitMiddleware`` over HTTP: token reservations and
their settlement, route marks and central rules, client addresses behind trusted proxies,
the RateLimit headers of stacked limiters, and the store-failure modes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemini_scale import (
    IPRateLimitMiddleware,
    RateLimitMiddleware,
    RateLimitPolicy,
    rate_limit,
)
from gemini_scale.errors import ConfigurationError
from gemini_scale.ratelimit.answers import rate_limit_headers
from gemini_scale.ratelimit.engine import Limit, RateLimiter
from gemini_scale.stores import MemoryStore, RedisStore
from tests.cache.support import http_scope
from tests.clock import FakeClock
from tests.gateway import lifespan
from tests.ratelimit.conftest import Backend
from tests.ratelimit.helpers import (
    GENERATE,
    STREAM,
    WINDOW_START,
    FakeAuth,
    Upstream,
    body,
    bucket_usage,
    details_of,
    error_of,
    eventually,
    gemini_app,
    limited,
    policy_header,
    principal,
    rate_limit_header,
    who,
)


def clocked(**options: Any) -> dict[str, Any]:
    clock = FakeClock(WINDOW_START)
    return {"store": MemoryStore(clock=clock), "clock": clock, **options}


def about(**counts: float) -> dict[str, Any]:
    return {kind: pytest.approx(value, abs=0.01) for kind, value in counts.items()}


# -- token reservations -------------------------------------------------------------------


@pytest.mark.parametrize(("max_output", "status"), [(100, 200), (101, 429)])
async def test_the_estimate_is_prompt_text_plus_max_output_tokens(
    max_output: int, status: int
) -> None:
    """40 characters are 10 tokens; a budget of 110 takes maxOutputTokens 100, not 101."""
    default = RateLimitPolicy.parse("100/minute", tokens="110/minute")
    async with limited(default=default, **clocked()) as stack:
        response = await stack.client.post(
            GENERATE, json=body("x" * 40, max_output=max_output), headers=who("alice")
        )
    assert response.status_code == status


@pytest.mark.parametrize(("default_output", "status"), [(100, 200), (101, 429)])
async def test_without_max_output_tokens_the_configured_default_is_reserved(
    default_output: int, status: int
) -> None:
    default = RateLimitPolicy.parse("100/minute", tokens="110/minute")
    options = clocked(default_output_tokens=default_output)
    async with limited(default=default, **options) as stack:
        response = await stack.client.post(GENERATE, json=body("x" * 40), headers=who("alice"))
    assert response.status_code == status


@pytest.mark.parametrize(("count", "charged"), [("total", 45), ("input", 30), ("output", 15)])
async def test_a_json_answer_settles_the_reservation_to_its_usage(
    count: str, charged: int
) -> None:
    """The answer reports prompt 30, candidates 10, thoughts 5, total 45."""
    default = RateLimitPolicy.parse("100/minute", tokens="10000/minute")
    async with limited(default=default, **clocked(count=count)) as stack:
        response = await stack.client.post(
            GENERATE, json=body(max_output=500), headers=who("alice")
        )
        assert response.status_code == 200
        assert await stack.used("alice") == {"requests": 1, "tokens": charged}


@pytest.mark.parametrize(
    ("count", "text", "max_output", "tokens"),
    [("input", "hi", None, "1000/minute"), ("output", "x" * 8000, 64, "1100/minute")],
)
async def test_the_reservation_is_what_the_count_will_charge(
    count: str, text: str, max_output: int | None, tokens: str
) -> None:
    """Settling on input tokens, the default output allowance (1024) is not reserved against
    a budget of 1000; settling on output tokens, a 2,000-token prompt is not reserved
    against a budget of 1100. Either would refuse, forever, a request the budget holds."""
    default = RateLimitPolicy.parse("100/minute", tokens=tokens)
    async with limited(default=default, **clocked(count=count)) as stack:
        response = await stack.client.post(
            GENERATE, json=body(text, max_output=max_output), headers=who("alice")
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("count", "charged"), [("total", 10), ("input", 10), ("output", 0)])
async def test_an_answer_cut_short_before_any_usage_charges_the_prompt(
    count: str, charged: int
) -> None:
    """The upstream started its answer, then it broke off before reporting any usage: the
    prompt (40 characters, 10 tokens) had reached it and is charged; the output allowance
    (500) is given back."""

    async def breaks_off(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"candidates": []}\n\n',
                    "more_body": True})
        raise RuntimeError("the upstream went away")

    clock = FakeClock(WINDOW_START)
    limiter = RateLimitMiddleware(
        breaks_off, store=MemoryStore(clock=clock), clock=clock, count=count,
        default=RateLimitPolicy.parse("100/minute", tokens="10000/minute"),
    )
    transport = httpx.ASGITransport(app=FakeAuth(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(RuntimeError, match="went away"):
            await client.post(STREAM, json=body(max_output=500), headers=who("alice"))
    assert await bucket_usage(limiter, principal("alice")) == {"requests": 1, "tokens": charged}


@pytest.mark.parametrize("dropped", ["never run", "run after the app returned"])
async def test_a_last_message_whose_send_the_app_drops_is_settled_once(dropped: str) -> None:
    """The app makes the send of its answer's last message and does not await it: with a
    store that settles by a round trip, the settlement is not lost with it; it is made when
    the app returns, to the usage the answer reported (35 tokens), once, whether that send
    never runs or runs later."""
    settlements: list[Any] = []

    class RoundTripStore(MemoryStore):  # not a plain MemoryStore: settling is awaited
        async def run(self, script: Any, keys: Any, args: Any) -> Any:
            if script.name == "rl_settle":
                settlements.append(list(args))
            return await super().run(script, keys, args)

    answer = b'{"candidates": [], "usageMetadata": {"totalTokenCount": 35}}'

    async def drops_its_last_send(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        last = send({"type": "http.response.body", "body": answer})
        if dropped == "never run":
            last.close()
        else:
            tasks.append(asyncio.ensure_future(last))

    tasks: list[asyncio.Future[None]] = []

    clock = FakeClock(WINDOW_START)
    limiter = RateLimitMiddleware(
        drops_its_last_send, store=RoundTripStore(clock=clock), clock=clock,
        default=RateLimitPolicy.parse("100/minute", tokens="10000/minute"),
    )
    request = json.dumps(body(max_output=500)).encode()
    scope = http_scope("POST", GENERATE, headers=who("alice"), body=request)
    messages = [{"type": "http.request", "body": request, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    await FakeAuth(limiter)(scope, receive, send)
    await asyncio.gather(*tasks)
    assert len(settlements) == 1
    assert await bucket_usage(limiter, principal("alice")) == {"requests": 1, "tokens": 35}


class _NotADict(MutableMapping[str, Any]):
    """An ASGI message that is a mapping but not a dict (ASGI sends dicts; we cope)."""

    def __init__(self, **items: Any) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._items[key] = value

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@pytest.mark.parametrize("path", [GENERATE, "/other"])
async def test_messages_that_are_mappings_but_not_dicts_are_read_and_headed(path: str) -> None:
    """An app whose messages are some other mapping: its answer is settled to its usage
    (35 tokens) and carries the RateLimit headers, on a token route and on another."""
    answer = b'{"candidates": [], "usageMetadata": {"totalTokenCount": 35}}'

    async def mapping_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(_NotADict(type="http.response.start", status=200,
                             headers=[(b"content-type", b"application/json")]))
        await send(_NotADict(type="http.response.body", body=answer))

    clock = FakeClock(WINDOW_START)
    limiter = RateLimitMiddleware(
        mapping_app, store=MemoryStore(clock=clock), clock=clock,
        default=RateLimitPolicy.parse("100/minute", tokens="10000/minute"),
    )
    transport = httpx.ASGITransport(app=FakeAuth(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(path, json=body(max_output=500), headers=who("alice"))
    assert response.status_code == 200
    assert response.content == answer
    assert rate_limit_header(response)["name"] in {"requests", "tokens"}
    assert "ratelimit-policy" in response.headers
    tokens = 35 if path == GENERATE else 0
    assert await bucket_usage(limiter, principal("alice")) == {"requests": 1, "tokens": tokens}


@pytest.mark.parametrize("form", ["list", "tuple", "absent"])
@pytest.mark.parametrize("path", [GENERATE, "/v1beta/models"])
async def test_rate_limit_headers_join_the_apps_headers_in_any_form(form: str, path: str) -> None:
    """The start message's headers as a list (kept by the app, sent again: never changed
    in place), as a tuple, or missing: the app's headers and the RateLimit ones go out."""
    own = [(b"content-type", b"application/json"), (b"x-own", b"1")]
    kept = list(own)
    start: dict[str, Any] = {"type": "http.response.start", "status": 200}
    if form != "absent":
        start["headers"] = kept if form == "list" else tuple(kept)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(dict(start))
        await send({"type": "http.response.body", "body": b'{"usageMetadata": {}}'})

    limiter = RateLimitMiddleware(
        app, default=RateLimitPolicy.parse("100/minute", tokens="10000/minute"), **clocked()
    )
    transport = httpx.ASGITransport(app=FakeAuth(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(2):
            response = await client.post(path, json=body(max_output=5), headers=who("alice"))
            assert response.status_code == 200
            assert "ratelimit-policy" in response.headers
            assert "ratelimit" in response.headers
            assert (response.headers.get("x-own") == "1") is (form != "absent")
    assert kept == own


async def test_token_methods_changed_after_construction_apply() -> None:
    """``token_methods`` is read per request: set to none, a generation reserves nothing."""
    default = RateLimitPolicy.parse("100/minute", tokens="10000/minute")
    async with limited(default=default, **clocked()) as stack:
        await stack.client.post(GENERATE, json=body(max_output=500), headers=who("alice"))
        assert await stack.used("alice") == {"requests": 1, "tokens": 45}
        stack.limiter.token_methods = ()
        await stack.client.post(GENERATE, json=body(max_output=500), headers=who("alice"))
        assert await stack.used("alice") == {"requests": 2, "tokens": 45}
        stack.limiter.token_methods = (":generateContent",)
        await stack.client.post(GENERATE, json=body(max_output=500), headers=who("alice"))
        assert await stack.used("alice") == {"requests": 3, "tokens": 90}


async def test_an_answer_without_usage_keeps_the_reservation() -> None:
    default = RateLimitPolicy.parse("100/minute", tokens="10000/minute")
    async with limited(upstream=Upstream(usage=None), default=default, **clocked()) as stack:
        await stack.client.post(GENERATE, json=body(max_output=500), headers=who("alice"))
        assert await stack.used("alice") == {"requests": 1, "tokens": 510}


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_an_error_answer_refunds_the_tokens_but_counts_the_request(status: int) -> None:
    default = RateLimitPolicy.parse("100/minute", tokens="10000/minute")
    async with limited(upstream=Upstream(status=status), default=default, **clocked()) as stack:
        response = await stack.client.post(
            GENERATE, json=body(max_output=500), headers=who("alice")
        )
        assert response.status_code == status
        assert await stack.used("alice") == {"requests": 1, "tokens": 0}


async def test_a_refusal_names_the_limit_that_refused_it() -> None:
    """Of two exhausted limits, the header names the one with the longest wait (the day,
    not the second), with the Retry-After as its reset; a refusal for tokens names the
    token limit, not the request limit with quota left."""
    clock = FakeClock(WINDOW_START)
    default = RateLimitPolicy.parse("1/second;2/day")
    async with limited(default=default, store=MemoryStore(clock=clock), clock=clock) as stack:
        assert (await stack.client.get("/other", headers=who("alice"))).status_code == 200
        clock.advance(2.5)  # past the one-second window and the one before it
        assert (await stack.client.get("/other", headers=who("alice"))).status_code == 200
        refused = await stack.client.get("/other", headers=who("alice"))
    assert refused.status_code == 429
    wait = int(refused.headers["retry-after"])
    assert wait > 3600
    assert rate_limit_header(refused) == {"name": "requests-86400s", "r": 0, "t": wait}

    default = RateLimitPolicy.parse("100/minute", tokens="1000/minute")
    async with limited(default=default, **clocked()) as stack:
        too_big = await stack.client.post(
            GENERATE, json=body(max_output=2000), headers=who("alice")
        )
    assert too_big.status_code == 429
    assert rate_limit_header(too_big) == {
        "name": "tokens", "r": 1000, "t": int(too_big.headers["retry-after"])
    }


def test_an_unknown_count_is_a_configuration_error() -> None:
    """A typo (``outputs``) fails at start-up, not on the first streamed answer."""
    with pytest.raises(ConfigurationError, match="count"):
        RateLimitMiddleware(Starlette(), store=MemoryStore(), count="outputs")  # type: ignore[arg-type]


async def test_routes_that_cost_no_tokens_reserve_none() -> None:
    default = RateLimitPolicy.parse("100/minute", tokens="10/minute")
    async with limited(default=default, **clocked()) as stack:
        for _ in range(5):  # a GET listing, 5 times against a 10-token budget
            assert (await stack.client.get("/v1beta/models", headers=who("alice"))).is_success
        assert await stack.used("alice") == {"requests": 5, "tokens": 0}


async def test_spent_tokens_refuse_generation_but_not_requests_that_cost_none() -> None:
    default = RateLimitPolicy.parse("100/minute", tokens="100/minute")
    async with limited(default=default, **clocked()) as stack:
        # Each answer reports 45 tokens against a reservation of 10 + 40: settles to 45.
        for _ in range(2):
            response = await stack.client.post(
                GENERATE, json=body(max_output=40), headers=who("alice")
            )
            assert response.status_code == 200
        assert await stack.used("alice") == {"requests": 2, "tokens": 90}
        refused = await stack.client.post(GENERATE, json=body(max_output=40), headers=who("alice"))
        assert refused.status_code == 429
        assert "tokens" in refused.json()["error"]["message"]
        # Listing models costs no tokens: still served, its headers name the request limit.
        listing = await stack.client.get("/v1beta/models", headers=who("alice"))
        assert listing.status_code == 200
        assert listing.headers["ratelimit"].startswith('"requests";r=')
        assert '"tokens";q=100;w=60' in listing.headers["ratelimit-policy"]


@pytest.mark.parametrize("path", [GENERATE, STREAM], ids=["json", "sse"])
async def test_concurrent_reservations_never_exceed_the_budget_and_settle_exactly(
    backend: Backend, path: str
) -> None:
    """N = 20 concurrent requests each reserve E = 150 (10 prompt + 140 output) against
    B = 1000: while all are in flight at most floor(B / E) = 6 are admitted, so the
    estimates in flight never exceed B. Each then uses 45 (a JSON answer, or the last of
    three SSE events with cumulative usage): the bucket holds 6 * 45."""
    upstream = Upstream(hold=asyncio.Event())
    default = RateLimitPolicy.parse("1000/hour", tokens="1000/hour")
    options: dict[str, Any] = {"store": backend.store(), "on_store_error": "closed"}
    if backend.clock is not None:
        options["clock"] = backend.clock
    async with limited(upstream=upstream, default=default, **options) as stack:
        tasks = [
            asyncio.create_task(
                stack.client.post(path, json=body(max_output=140), headers=who("alice"))
            )
            for _ in range(20)
        ]
        await eventually(lambda: upstream.entered + sum(t.done() for t in tasks) == 20)
        in_flight = upstream.entered
        assert in_flight * 150 <= 1000
        assert in_flight == 6  # exact: every refused one saw the others' reservations
        assert await stack.used("alice") == about(requests=6, tokens=6 * 150)
        upstream.hold.set()  # type: ignore[union-attr]
        statuses = [(await task).status_code for task in tasks]
        assert statuses.count(200) == 6
        assert statuses.count(429) == 14
        assert await stack.used("alice") == about(requests=6, tokens=6 * 45)
        # What settlement gave back is usable again (each of these settles before the next).
        more = [
            await stack.client.post(path, json=body(max_output=140), headers=who("alice"))
            for _ in range(6)
        ]
        assert [r.status_code for r in more].count(200) == 6
        assert await stack.used("alice") == about(requests=12, tokens=12 * 45)


async def test_the_bound_holds_with_the_sequential_answers_settled_in_between() -> None:
    """Sequentially each request settles before the next: with a 45-token usage the
    budget of 1000 admits as many as fit an estimate of 150 on top of what was used."""
    default = RateLimitPolicy.parse("1000/minute", tokens="1000/minute")
    async with limited(default=default, **clocked()) as stack:
        statuses = [
            (
                await stack.client.post(
                    GENERATE, json=body(max_output=140), headers=who("alice")
                )
            ).status_code
            for _ in range(30)
        ]
        # Request k (from 0) is admitted while 45 * k + 150 <= 1000: k = 0..18, 19 of them,
        # then 19 * 45 = 855 are used and 855 + 150 no longer fits.
        assert statuses.count(200) == 19
        assert await stack.used("alice") == {"requests": 19, "tokens": 855}


# -- marks, rules and the default ---------------------------------------------------------


@rate_limit("2/minute")
async def marked(request: Request) -> Response:
    return JSONResponse({"route": "marked"})


@rate_limit("4/minute", key="route")
async def per_route(request: Request) -> Response:
    return JSONResponse({"route": "per-route"})


async def ruled(request: Request) -> Response:
    return JSONResponse({"route": "ruled"})


EXTRA = [
    Route("/marked", marked),
    Route("/ruled", ruled),
    Route("/per-route", per_route),
]


async def passes(client: httpx.AsyncClient, path: str, n: int, sub: str = "alice") -> int:
    statuses = [(await client.get(path, headers=who(sub))).status_code for _ in range(n)]
    return statuses.count(200)


async def test_route_marks_and_central_rules_override_the_default() -> None:
    rules = {
        "GET /ruled": RateLimitPolicy.parse("3/minute"),
        "/marked": RateLimitPolicy.parse("50/minute"),  # the route's own mark wins
    }
    default = RateLimitPolicy.parse("5/minute")
    async with limited(extra=EXTRA, default=default, rules=rules, **clocked()) as stack:
        assert await passes(stack.client, "/marked", 10, sub="alice") == 2
        assert await passes(stack.client, "/ruled", 10, sub="bob") == 3
        assert await passes(stack.client, "/other", 10, sub="carol") == 5
        # A mark keyed on the route is one bucket for every caller of that route.
        assert await passes(stack.client, "/per-route", 3, sub="dave") == 3
        assert await passes(stack.client, "/per-route", 3, sub="erin") == 1
        for path, quota in (("/marked", 2), ("/ruled", 3), ("/other", 5), ("/per-route", 4)):
            response = await stack.client.get(path, headers=who("frank"))
            assert policy_header(response) == {"requests": (quota, 60)}


async def test_a_routes_own_policy_has_its_own_budget() -> None:
    """A route's ``2/minute`` mark and the ``5/minute`` default (both per principal) are two
    budgets: requests to the marked route do not use up the default's."""
    default = RateLimitPolicy.parse("5/minute")
    async with limited(extra=EXTRA, default=default, **clocked()) as stack:
        assert await passes(stack.client, "/marked", 5) == 2
        assert await passes(stack.client, "/other", 5) == 5
        assert await passes(stack.client, "/marked", 1) == 0


async def test_without_a_default_only_marked_and_ruled_routes_are_limited() -> None:
    rules = {"/ruled": RateLimitPolicy.parse("3/minute")}
    async with limited(extra=EXTRA, rules=rules, **clocked()) as stack:
        assert await passes(stack.client, "/other", 20) == 20
        free = await stack.client.get("/other", headers=who("alice"))
        assert "ratelimit" not in free.headers
        assert await passes(stack.client, "/ruled", 5) == 3


async def test_a_marked_route_without_a_principal_limiter_fails_the_audit() -> None:
    """The per-address limiter ignores route marks, so it does not count as enforcing them:
    the app refuses to start, and refuses requests rather than serve them unlimited."""
    app = Starlette(routes=EXTRA)
    stack = IPRateLimitMiddleware(app, limit="100/minute")
    with pytest.raises(RuntimeError, match="rate_limit"):
        async with lifespan(stack):
            pass
    transport = httpx.ASGITransport(app=stack)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/ruled")
    assert response.status_code == 500
    assert error_of(response)["status"] == "INTERNAL"


# -- client addresses and the per-address limiter -----------------------------------------


@dataclass
class TwoLimiters:
    client: httpx.AsyncClient
    upstream: Upstream
    inner: RateLimitMiddleware
    outer: IPRateLimitMiddleware


@asynccontextmanager
async def two_limiters(
    *, ip_limit: str, default: RateLimitPolicy | None, trusted: tuple[str, ...] = (),
    peer: str = "127.0.0.1",
) -> AsyncIterator[TwoLimiters]:
    """IPRateLimitMiddleware -> FakeAuth -> RateLimitMiddleware -> app, on one store."""
    clock = FakeClock(WINDOW_START)
    store = MemoryStore(clock=clock)
    upstream = Upstream()
    inner = RateLimitMiddleware(
        gemini_app(upstream, EXTRA), store=store, clock=clock, default=default,
        trusted_proxies=trusted,
    )
    outer = IPRateLimitMiddleware(
        FakeAuth(inner), limit=ip_limit, store=store, clock=clock, trusted_proxies=trusted
    )
    transport = httpx.ASGITransport(app=outer, client=(peer, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield TwoLimiters(client, upstream, inner, outer)


async def test_ip_limiter_keys_on_the_peer_and_ignores_principals_and_spoofed_headers() -> None:
    async with two_limiters(ip_limit="5/minute", default=None, peer="127.0.0.2") as two:
        statuses = [
            (
                await two.client.get(
                    "/other",
                    headers=who(f"user-{n}")
                    | {"x-forwarded-for": f"198.51.100.{n}", "x-real-ip": f"192.0.2.{n}"},
                )
            ).status_code
            for n in range(8)
        ]
    assert statuses == [200] * 5 + [429] * 3


async def test_ip_limiter_believes_x_forwarded_for_only_from_a_trusted_proxy() -> None:
    async with two_limiters(
        ip_limit="2/minute", default=None, trusted=("10.0.0.0/8",), peer="10.0.0.1"
    ) as two:
        client = two.client

        async def status(xff: str) -> int:
            return (await client.get("/other", headers={"x-forwarded-for": xff})).status_code

        # The rightmost untrusted entry is the client; what it prepends is never read.
        assert [await status(f"evil-{n}, 203.0.113.7, 10.0.0.5") for n in range(3)] == [
            200, 200, 429,
        ]
        assert await status("203.0.113.8") == 200  # another client behind the proxy
        refused = await client.get("/other", headers={"x-forwarded-for": "203.0.113.7"})
        [quota] = details_of(error_of(refused), "QuotaFailure")
        assert quota["violations"][0]["quotaDimensions"] == {"key": "client_ip"}
        assert quota["violations"][0]["quotaId"] == "RequestsPerMinutePerClientIp"


async def test_header_names_follow_the_prefix_for_the_same_limits() -> None:
    """The header parts memoised per policy are told apart by the limiter's name prefix
    too: one set of limits named by two prefixes, alternately, keeps each its own names."""
    limiter = RateLimiter(MemoryStore())
    limits = (Limit("requests", 5, 60),)
    decision = await limiter.acquire("t", limits, (1,))
    for prefix in ("", "ip-", "", "ip-"):
        policy, field = dict(rate_limit_headers([(prefix, limits, decision)])).values()
        assert policy == f'"{prefix}requests";q=5;w=60'.encode()
        assert field.startswith(f'"{prefix}requests";r=4;t='.encode())


async def test_ip_limiter_ignores_route_marks_and_one_set_of_headers_covers_both() -> None:
    default = RateLimitPolicy.parse("10/minute")
    async with two_limiters(ip_limit="5/minute", default=default) as two:
        client = two.client
        first = await client.get("/marked", headers=who("alice"))
        assert first.status_code == 200
        # One RateLimit-Policy and one RateLimit line, for both limiters the request met.
        assert len(first.headers.get_list("ratelimit-policy")) == 1
        assert len(first.headers.get_list("ratelimit")) == 1
        assert policy_header(first) == {"ip-requests": (5, 60), "requests": (2, 60)}
        assert rate_limit_header(first) == {"name": "requests", "r": 1, "t": 60}

        assert (await client.get("/marked", headers=who("alice"))).status_code == 200
        third = await client.get("/marked", headers=who("alice"))  # the mark: per principal
        assert third.status_code == 429
        [quota] = details_of(error_of(third), "QuotaFailure")
        assert quota["violations"][0]["quotaDimensions"] == {"key": "principal"}
        assert (await client.get("/marked", headers=who("bob"))).status_code == 200

        # Four requests from this address so far (the refused one too: the per-address
        # limiter ran first): the fifth passes, the sixth is refused by the address limit.
        assert (await client.get("/other", headers=who("carol"))).status_code == 200
        sixth = await client.get("/other", headers=who("dave"))
        assert sixth.status_code == 429
        [quota] = details_of(error_of(sixth), "QuotaFailure")
        assert quota["violations"][0]["quotaDimensions"] == {"key": "client_ip"}
        assert rate_limit_header(sixth)["name"] == "ip-requests"
    assert two.upstream.calls == ["/other"]  # carol's; dave's never reached the app


async def test_anonymous_requests_fall_back_to_their_own_address_bucket() -> None:
    """A route with a principal policy but no principal (a public route): each client
    address is its own bucket, never one bucket shared by everyone."""
    default = RateLimitPolicy.parse("3/minute")
    async with limited(default=default, client=("127.0.0.1", 4321), **clocked()) as first:
        responses = [await first.client.get("/other") for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        [quota] = details_of(error_of(responses[-1]), "QuotaFailure")
        assert quota["violations"][0]["quotaDimensions"] == {"key": "client_ip"}
        # Alice, from the same address, has her own bucket.
        assert (await first.client.get("/other", headers=who("alice"))).status_code == 200
    async with limited(default=default, client=("127.0.0.9", 4321), **clocked()) as second:
        assert (await second.client.get("/other")).status_code == 200


async def test_an_anonymous_request_counts_once_in_each_of_two_limiters() -> None:
    """Both limiters key an anonymous request on its address, in counters of their own
    (``rl`` and ``rl-ip``): one request is one unit in each, never two in a shared one."""
    default = RateLimitPolicy.parse("3/minute")
    async with two_limiters(ip_limit="10/minute", default=default) as two:
        responses = [await two.client.get("/other") for _ in range(4)]
        peer = ("127.0.0.1", 4321)
        by_address = RateLimitPolicy.parse("3/minute", key="client_ip")
        principal_side = await bucket_usage(two.inner, None, policy=by_address, client=peer)
        address_side = await bucket_usage(two.outer, None, client=peer)
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert principal_side == {"requests": 3}
    assert address_side == {"requests": 4}


# -- store failures ---------------------------------------------------------------------------


@asynccontextmanager
async def dead_redis(mode: str, **options: Any) -> AsyncIterator[tuple[Any, Upstream]]:
    """A limiter whose shared store is a Redis URL with nothing listening. The port stays
    bound (without listening) for the test, so connections are refused and no server
    started meanwhile by another test can take it."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        async with _dead_redis_at(port, mode, **options) as made:
            yield made


@asynccontextmanager
async def _dead_redis_at(
    port: int, mode: str, **options: Any
) -> AsyncIterator[tuple[Any, Upstream]]:
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", prefix="gs-rl-dead")
    try:
        async with limited(
            store=store, on_store_error=mode, default=RateLimitPolicy.parse("5/minute"),
            **options,
        ) as stack:
            yield stack, stack.upstream
    finally:
        await store.aclose()


async def test_store_down_local_enforces_the_limits_on_this_replica() -> None:
    async with dead_redis("local") as (stack, upstream):
        responses = [await stack.client.get("/other", headers=who("alice")) for _ in range(12)]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 5 + [429] * 7
    assert all("ratelimit" in r.headers for r in responses)
    assert len(upstream.calls) == 5


async def test_store_down_open_lets_everything_through_without_headers() -> None:
    async with dead_redis("open") as (stack, upstream):
        responses = [await stack.client.get("/other", headers=who("alice")) for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 12
    assert not any("ratelimit" in r.headers or "ratelimit-policy" in r.headers
                   for r in responses)
    assert len(upstream.calls) == 12


async def test_store_down_closed_answers_503_unavailable_with_retry_after() -> None:
    async with dead_redis("closed") as (stack, upstream):
        responses = [await stack.client.get("/other", headers=who("alice")) for _ in range(6)]
    for response in responses:
        assert response.status_code == 503
        assert error_of(response)["status"] == "UNAVAILABLE"
        assert int(response.headers["retry-after"]) >= 1
        assert "ratelimit" not in response.headers
    assert upstream.calls == []


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_once_the_breaker_is_open_a_dead_store_costs_almost_nothing(mode: str) -> None:
    async with dead_redis(mode) as (stack, _):
        for _ in range(3):  # the breaker's threshold of failures
            await stack.client.get("/other", headers=who("alice"))
        started = time.perf_counter()
        responses = [await stack.client.get("/other", headers=who("alice")) for _ in range(50)]
        elapsed = time.perf_counter() - started
    assert elapsed < 2.5  # 50 requests: milliseconds each, generous for a loaded machine
    assert not any(r.status_code == 500 for r in responses)


async def test_the_identity_memo_is_bounded_per_limiter_not_per_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memoised buckets (each holding its principal alive) stay within
    ``_IDENTITY_CACHE_SIZE`` for the whole limiter, however many policies its routes have,
    as when the memo was one dict: not that many per policy."""
    from gemini_scale.ratelimit import middleware as rl_middleware
    from gemini_scale.routing import CONTEXT_KEY, RequestContext

    monkeypatch.setattr(rl_middleware, "_IDENTITY_CACHE_SIZE", 4)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    policies = [RateLimitPolicy.parse(f"{n}/minute") for n in (10, 11, 12)]
    limiter = RateLimitMiddleware(app, default=policies[0])
    callers = [principal(f"user-{i}") for i in range(4)]  # verified once, each one object
    for policy in policies:
        plan = limiter._plan(policy)
        for caller in callers:
            context = RequestContext(principal=caller)
            scope = http_scope("GET", "/v1beta/models")
            scope[CONTEXT_KEY] = context
            assert limiter._identity(scope, context, plan) is not None
    memoised = sum(len(plan.buckets) for _, plan in limiter._plans.values())
    assert memoised <= 4
