"""A withdrawn signing key stops working for tokens in the verified-token cache too, and the
dev issuer answers 400 (never 500) to text no token can carry.

A token answered from the verified-token cache needs no key, but once the issuer's key set is
stale its use starts the same background refresh a first-seen token would (single-flight,
throttled after a failure, never waited for); when the new set no longer holds the token's
key, the token is verified again and refused. With a fresh key set a cached token costs no
fetch at all.

The unit tests use the fake IdP of ``tests.auth.fake_idp`` (``httpx.MockTransport``, every
request counted) and a ``FakeClock``; the end-to-end ones use the real authorization server
of ``tests.auth_e2e`` over HTTP with the stepped monotonic clock of its rotation tests, and the
example gateway in-process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from gemini_scale.auth.errors import InvalidTokenError
from gemini_scale.auth.jwks import RETRY_AFTER_FAILURE
from gemini_scale.auth.jwt import JWTValidator
from tests.auth.conftest import FETCH_TIMEOUT, Build
from tests.auth.fake_idp import FakeIdP
from tests.auth.tokens import ISSUER, TokenFactory, jwks, rsa_signer
from tests.auth_e2e.authorization_server import AuthorizationServer, request_token
from tests.auth_e2e.test_key_rotation import AUDIENCE as E2E_AUDIENCE
from tests.auth_e2e.test_key_rotation import (
    JWKS_MAX_AGE,
    SCOPE,
    assert_invalid_token,
    eventually,
    resource_server,
)
from tests.clock import FakeClock
from tests.gateway import build as build_gateway
from tests.gateway import running

RS = rsa_signer("kid1")
RS2 = rsa_signer("kid2", slot=2)
NO_KEY = "No signing key of the issuer matches the access token."
TTL = 600.0  # Issuer.jwks_ttl's default: the fake IdP sends no Cache-Control


@pytest.fixture
def tokens(clock: FakeClock) -> TokenFactory:
    return TokenFactory(RS, clock=clock, lifetime=3600)


async def settle() -> None:
    """Let background fetches (MockTransport answers at once) run to completion."""
    for _ in range(20):
        await asyncio.sleep(0)


async def refusal(validator: JWTValidator, token: str) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        await validator.verify(token)
    return caught.value.description


# ------------------------------------------------------------------------------------------
# Cached tokens and a stale key set (fake IdP, fake clock)
# ------------------------------------------------------------------------------------------


async def test_a_cached_token_refreshes_a_stale_set_and_its_withdrawn_key_stops_working(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    """Only the cached token arrives: its use after the set's lifetime starts the refresh
    that a first-seen token would, and once the set without its key is in, it is refused."""
    token = tokens.mint()
    assert await validator.verify(token)
    idp.set_signers(RS2)  # the IdP withdraws kid1
    clock.advance(TTL - 1)
    assert await validator.verify(token)  # fresh set: answered from the cache, no fetch
    await settle()
    assert idp.jwks_hits == 1

    clock.advance(2)  # stale now
    assert await validator.verify(token)  # served from the keys at hand, never waits...
    assert validator.stats.cache_hits == 2
    await settle()
    assert idp.jwks_hits == 2  # ...but the refresh ran
    assert await refusal(validator, token) == NO_KEY
    assert await refusal(validator, token) == NO_KEY
    await settle()
    assert idp.jwks_hits == 2  # refusing costs no fetch (the cool-down holds)
    assert validator.stats.signatures == 1


async def test_concurrent_cached_tokens_share_one_refresh_and_never_wait_for_it(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    cached = [tokens.mint() for _ in range(5)]
    for token in cached:
        assert await validator.verify(token)
    gate = asyncio.Event()
    idp.script("/jwks", gate=gate)  # the refresh is held until released
    idp.set_signers(RS2)
    clock.advance(TTL + 1)
    started = time.perf_counter()
    principals = await asyncio.gather(*(validator.verify(t) for t in cached * 20))
    assert all(principals)
    assert time.perf_counter() - started < FETCH_TIMEOUT / 2
    await settle()
    assert idp.jwks_hits == 2  # one refresh in flight for 100 stale hits
    gate.set()
    await settle()
    for token in cached:
        assert await refusal(validator, token) == NO_KEY
    assert idp.jwks_hits == 2


async def test_cached_tokens_are_stale_if_error_while_refreshes_fail(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    """An IdP that cannot be reached never turns a good cached token into a failure; the
    refresh is retried about once a second, as for first-seen tokens, and the withdrawal
    takes effect as soon as one succeeds."""
    token = tokens.mint()
    assert await validator.verify(token)
    idp.script("/jwks", status=500)
    idp.set_signers(RS2)
    clock.advance(TTL + 1)
    for _ in range(10):
        assert await validator.verify(token)
        await settle()
        clock.advance(0.25)
    assert 2 <= idp.jwks_hits - 1 <= 3  # 2.5 s of hits: about one attempt a second
    cache = validator.key_cache(ISSUER)
    assert cache.errors == idp.jwks_hits - 1
    assert cache.last_error == "the response status was 500"

    idp.reset()
    clock.advance(RETRY_AFTER_FAILURE)
    assert await validator.verify(token)  # still served: the refresh runs in the background
    await settle()
    assert await refusal(validator, token) == NO_KEY


async def test_an_unchanged_key_set_keeps_cached_tokens_cached(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    """A refresh that finds the same keys changes nothing for cached tokens, and the set is
    fresh again: no further fetches and no further signature checks."""
    token = tokens.mint()
    assert await validator.verify(token)
    clock.advance(TTL + 1)
    assert await validator.verify(token)
    await settle()
    assert idp.jwks_hits == 2
    for _ in range(50):
        assert await validator.verify(token)
        clock.advance(1)
    await settle()
    assert idp.jwks_hits == 2
    assert validator.stats.signatures == 1
    assert validator.stats.cache_hits == 51


async def test_a_key_kept_through_a_rotation_keeps_its_cached_tokens_working(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    token = tokens.mint()
    assert await validator.verify(token)
    idp.set_signers(RS, RS2)  # a new key next to the old one
    clock.advance(TTL + 1)
    assert await validator.verify(token)
    await settle()
    assert idp.jwks_hits == 2
    assert await validator.verify(token)  # verified again against the new set, and kept
    assert await validator.verify(token)
    assert validator.stats.signatures == 2


async def test_a_static_key_set_never_goes_stale_for_cached_tokens(
    build: Build, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    validator = build(jwks_url=None, jwks=jwks(RS))
    token = tokens.mint()
    assert await validator.verify(token)
    clock.advance(3000)
    assert await validator.verify(token)
    await settle()
    assert idp.jwks_hits == 0
    assert validator.stats.cache_hits == 1


# ------------------------------------------------------------------------------------------
# End to end: the real authorization server over HTTP, the middleware in front of an app
# ------------------------------------------------------------------------------------------


@pytest.fixture
def authorization_server() -> Iterator[AuthorizationServer]:
    with AuthorizationServer(audience=E2E_AUDIENCE, jwks_max_age=JWKS_MAX_AGE) as server:
        yield server


@pytest.mark.slow
@pytest.mark.timeout(10)
async def test_a_retired_key_stops_working_for_a_cached_token_with_no_new_token(
    authorization_server: AuthorizationServer,
) -> None:
    """The IdP retires the key of a token the resource server has cached; no other token
    arrives. Once the key set's ``max-age`` is over, the token's next use refreshes the set
    and from then on the token is answered 401 ``invalid_token``."""
    idp = authorization_server
    old = await request_token(idp, SCOPE)
    async with resource_server(idp) as rs:
        assert (await rs.get(old)).status_code == 200
        idp.rotate(retire_previous=True)
        assert (await rs.get(old)).status_code == 200  # the set is fresh: cached, no fetch
        assert idp.hits("jwks") == 1

        rs.clock.advance(JWKS_MAX_AGE + 1)
        assert (await rs.get(old)).status_code == 200  # stale: refreshed in the background
        await eventually(lambda: rs.key_fetches == 2 and rs.validator.key_cache(
            rs.issuer).generation == 2)
        assert_invalid_token(await rs.get(old))
        assert_invalid_token(await rs.get(old))
        assert (await rs.get(await request_token(idp, SCOPE))).status_code == 200
    assert idp.hits("jwks") == 2
    assert len(rs.calls) == 4


# ------------------------------------------------------------------------------------------
# The example gateway's dev issuer: text a token cannot carry is the caller's error
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"sub": "\\ud800"}',
        '{"sub": "alice\\udfff"}',
        '{"scope": "gemini.read \\udfff"}',
        '{"tenant": "\\ud800"}',
        '{"sub": "alice", "scope": "gemini.generate", "tenant": "\\udc80acme"}',
    ],
    ids=["sub", "sub-trailing", "scope", "tenant", "tenant-with-valid-others"],
)
async def test_the_dev_issuer_refuses_lone_surrogates_with_400(
    body: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(build_gateway(), scope=None) as gateway:
        response = await gateway.post(
            "/dev/token", content=body, headers={"content-type": "application/json"}
        )
        minted = await gateway.post("/dev/token", json={"sub": "alice", "tenant": "acme"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert "access_token" not in response.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert minted.status_code == 200  # the endpoint still works


async def test_the_dev_issuer_refuses_deeply_nested_json_with_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(build_gateway(), scope=None) as gateway:
        response = await gateway.post(
            "/dev/token", content="[" * 10_000, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
