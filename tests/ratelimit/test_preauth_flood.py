"""security.md A41, pre-auth flood protection, through the example gateway.

One client address floods the gateway with well-formed but bogus tokens: ES256 tokens that
name the dev issuer and its key id with valid claims (so each one costs a signature
verification) and RS256 tokens under an unknown key id (decoded, then refused). The
per-address limit (``GEMINI_SCALE_IP_RATE_LIMIT``) runs before OAuth2Middleware: once it is
reached the flood is answered 429 and the JWT validator's counters stop rising, i.e. no
more decoding and no more signature checks. A second address keeps its normal answers.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from fastapi import FastAPI

from example_app.dev_issuer import DEV_ISSUER
from gemini_scale import JWTValidator, OAuth2Middleware, StreamingASGITransport
from tests.auth.tokens import TokenFactory, ec_signer, rsa_signer
from tests.clock import FakeClock
from tests.gateway import build, lifespan
from tests.ratelimit.helpers import details_of, error_of

IP_LIMIT = 20
GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}


def validator(app: FastAPI) -> JWTValidator:
    """The gateway's JWT validator (its ``stats`` count decodes and signature checks)."""
    node: Any = app.middleware_stack
    while not isinstance(node, OAuth2Middleware):
        node = node.app
    found = node._jwt
    assert isinstance(found, JWTValidator)
    return found


def bogus_tokens(app: FastAPI, n: int) -> list[str]:
    dev = app.state.dev_issuer
    clock = FakeClock(time.time())
    # The dev issuer's key id, signed by another key: passes every check but the signature.
    es256 = TokenFactory(
        ec_signer(kid=dev.key.kid), issuer=DEV_ISSUER, audience=dev.audience, clock=clock
    )
    rs256 = TokenFactory(
        rsa_signer(kid="attacker-rsa"), issuer=DEV_ISSUER, audience=dev.audience, clock=clock
    )
    return [(es256 if i % 2 == 0 else rs256).mint() for i in range(n)]


def client_at(app: FastAPI, host: str) -> httpx.AsyncClient:
    transport = StreamingASGITransport(app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


async def test_a41_the_flood_is_refused_before_any_signature_verification() -> None:
    app = build({"GEMINI_SCALE_IP_RATE_LIMIT": f"{IP_LIMIT}/hour"})
    tokens = bogus_tokens(app, 3 * IP_LIMIT)
    async with lifespan(app), client_at(app, "10.0.0.1") as flood, client_at(
        app, "10.0.0.2"
    ) as other:
        stats = validator(app).stats
        good = app.state.dev_issuer.mint(subject="honest")
        statuses = []
        counters = []
        for n, token in enumerate(tokens):
            response = await flood.post(
                GENERATE, json=BODY, headers={"authorization": f"Bearer {token}"}
            )
            statuses.append(response.status_code)
            counters.append((stats.decoded, stats.signatures))
            if n == IP_LIMIT:
                refused = response
            if n % 10 == 0:  # the other address is served normally throughout
                ok = await other.post(
                    GENERATE, json=BODY, headers={"authorization": f"Bearer {good}"}
                )
                assert ok.status_code == 200
                anonymous = await other.post(GENERATE, json=BODY)
                assert anonymous.status_code == 401

    assert statuses == [401] * IP_LIMIT + [429] * (2 * IP_LIMIT)
    # Up to the limit every bogus token was decoded, and the ES256 ones signature-checked.
    decoded, signatures = counters[IP_LIMIT - 1]
    assert decoded >= IP_LIMIT
    assert signatures >= IP_LIMIT // 2
    # From then on the counters stand still (the other address's token is cached after its
    # first use, so its requests add nothing either).
    assert set(counters[IP_LIMIT - 1 :]) == {(decoded, signatures)}
    [quota] = details_of(error_of(refused), "QuotaFailure")
    assert quota["violations"][0]["quotaDimensions"]["key"] == "client_ip"
    assert int(refused.headers["retry-after"]) >= 1
    assert "www-authenticate" not in refused.headers  # refused before authentication


async def test_unique_forwarded_headers_do_not_grow_the_address_memo() -> None:
    """The per-address limiter remembers buckets by what decides them. A client that is not
    a trusted proxy sends a new, large ``X-Forwarded-For`` on every request: it is ignored
    for its address, and must not become one remembered entry per request either."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from gemini_scale import IPRateLimitMiddleware

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/", ok)])
    limiter = IPRateLimitMiddleware(inner, limit="100000/hour", trusted_proxies=["10.0.0.0/8"])
    transport = httpx.ASGITransport(app=limiter, client=("203.0.113.9", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for i in range(300):
            forwarded = f"198.51.100.{i % 250}, " + "x" * 2000 + f", {i}"
            response = await client.get("/", headers={"x-forwarded-for": forwarded})
            assert response.status_code == 200
    assert len(limiter._addresses) == 1  # one peer, one bucket, one entry
