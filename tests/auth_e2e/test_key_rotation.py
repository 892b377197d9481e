"""Key rotation and identity-provider failures, end to end over HTTP (security.md A29-A33).

The identity provider is the real authorization server of this package; it counts the hits
on its key set and metadata endpoints. The resource server is ``OAuth2Middleware`` around a
tiny Starlette app that counts the requests it gets, with a :class:`JWTValidator` whose
monotonic clock (key-set lifetime, refetch cool-down, failure back-off) moves only when a
test says so; wall-clock time stays real because the server signs real ``iat``/``exp``. The
last test runs the example gateway as deployed, configured by environment, on the real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from example_app.standin import ReceivedRequest, create_standin
from gemini_scale.auth.jwks import RETRY_AFTER_FAILURE
from gemini_scale.auth.jwt import Issuer, JWTValidator
from gemini_scale.auth.middleware import OAuth2Middleware
from tests.auth_e2e.authorization_server import (
    AuthorizationServer,
    request_token,
    unverified_segment,
)
from tests.gateway import build, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(10)]

AUDIENCE = "https://gemini-gateway.test"
SCOPE = "gemini.generate"
COOLDOWN = Issuer(issuer="https://x.test", audience="x").jwks_cooldown
JWKS_MAX_AGE = 300
#: How the IdP fails: no connection, an error status, or a 200 that is not a usable key set
#: (A33; the metadata endpoint answers the same).
OUTAGES = [
    "refused",
    "http-500",
    "html-200",
    "keys-not-a-list",
    "no-keys-member",
    "invalid-json",
    "key-without-kty",
    "valid-set-as-text-plain",
]


class SteppedClock:
    """Real wall-clock time; monotonic time that also moves when :meth:`advance` is called."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class ResourceServer:
    http: httpx.AsyncClient
    validator: JWTValidator
    clock: SteppedClock
    issuer: str
    calls: list[str] = field(default_factory=list)
    """Subjects of the requests that reached the app."""

    async def get(self, token: str) -> httpx.Response:
        return await self.http.get("/protected", headers={"authorization": f"Bearer {token}"})

    @property
    def key_fetches(self) -> int:
        return self.validator.key_cache(self.issuer).fetches

    @property
    def key_fetch_errors(self) -> int:
        return self.validator.key_cache(self.issuer).errors


@pytest.fixture
def idp() -> Iterator[AuthorizationServer]:
    with AuthorizationServer(audience=AUDIENCE, jwks_max_age=JWKS_MAX_AGE) as server:
        yield server


@contextlib.asynccontextmanager
async def resource_server(
    idp: AuthorizationServer, *, jwks_url: bool = False
) -> AsyncIterator[ResourceServer]:
    """The middleware with the default :class:`Issuer` settings; keys found by discovery,
    or at the configured ``jwks_url``."""
    calls: list[str] = []

    async def protected(request: Request) -> JSONResponse:
        calls.append(request.state.principal.subject)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/protected", protected)])
    clock = SteppedClock()
    async with httpx.AsyncClient(timeout=5) as idp_client:
        validator = JWTValidator(
            [
                Issuer(
                    issuer=idp.issuer,
                    audience=AUDIENCE,
                    jwks_url=idp.jwks_uri if jwks_url else None,
                )
            ],
            http_client=idp_client,
            clock=clock,
        )
        middleware = OAuth2Middleware(app, jwt=validator)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(middleware), base_url="http://resource"
            ) as http:
                yield ResourceServer(http, validator, clock, idp.issuer, calls)
        finally:
            await middleware.aclose()


@contextlib.contextmanager
def idp_down(idp: AuthorizationServer, how: str) -> Iterator[None]:
    """The key set and metadata unavailable or unusable (see ``OUTAGES``); tokens already
    issued stay valid."""
    if how == "refused":
        idp.stop()
        try:
            yield
        finally:
            idp.start()
        return
    json_bodies = {
        "keys-not-a-list": '{"keys": {}}',
        "no-keys-member": '{"nokeys": []}',
        "invalid-json": '{"keys": [',
        "key-without-kty": json.dumps(
            {"keys": [{k: v for k, v in key.items() if k != "kty"} for key in idp.jwks()["keys"]]}
        ),
    }
    if how == "http-500":
        outage = idp.outage(500)
    elif how == "html-200":
        outage = idp.outage(200)
    elif how == "valid-set-as-text-plain":
        outage = idp.outage(200, body=json.dumps(idp.jwks()), content_type="text/plain")
    else:
        outage = idp.outage(200, body=json_bodies[how], content_type="application/json")
    with outage:
        yield


def with_unknown_kid(token: str, key: RSAKey) -> str:
    """``token``'s claims (a fresh ``jti``) signed by a key the issuer never published,
    under a random ``kid``."""
    claims = {**unverified_segment(token, 1), "jti": secrets.token_urlsafe(12)}
    header = {"alg": "RS256", "typ": "at+jwt", "kid": secrets.token_urlsafe(8)}
    return jwt.encode(header, claims, key)


async def eventually(condition: Callable[[], bool], *, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not become true in time")
        await asyncio.sleep(0.01)


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def assert_unavailable(response: httpx.Response, token: str) -> int:
    """R503d: never 2xx or 500, a Retry-After, Google's envelope, no challenge."""
    assert response.status_code == 503, response.text
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["error"]["status"] == "UNAVAILABLE"
    assert "www-authenticate" not in response.headers
    assert token not in response.text
    return retry_after


async def test_a_new_kid_is_accepted_after_one_refetch(idp: AuthorizationServer) -> None:
    """A29: the cache holds kid1, the IdP rotates; concurrent kid2 requests share one fetch."""
    old = await request_token(idp, SCOPE)
    async with resource_server(idp) as rs:
        assert (await rs.get(old)).status_code == 200
        assert idp.hits("jwks") == 1

        new_kid = idp.rotate()
        new = await request_token(idp, SCOPE)
        assert unverified_segment(new, 0)["kid"] == new_kid
        rs.clock.advance(COOLDOWN + 1)  # the last fetch is older than the cool-down
        responses = await asyncio.gather(*(rs.get(new) for _ in range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        assert idp.hits("jwks") == 2

        # The old key is still published: its tokens keep working, with no fetch.
        assert (await rs.get(old)).status_code == 200
        assert (await rs.get(await request_token(idp, SCOPE))).status_code == 200
    assert idp.hits("jwks") == 2
    assert idp.hits("metadata") == 1
    assert len(rs.calls) == 23


async def test_a_retired_key_stops_working_once_the_new_set_is_fetched(
    idp: AuthorizationServer,
) -> None:
    """A token verified earlier (and cached as verified) is checked again when the key set
    changes, and refused when its key is gone."""
    old = await request_token(idp, SCOPE)
    async with resource_server(idp) as rs:
        assert (await rs.get(old)).status_code == 200
        idp.rotate(retire_previous=True)
        new = await request_token(idp, SCOPE)
        rs.clock.advance(COOLDOWN + 1)
        assert (await rs.get(new)).status_code == 200
        assert_invalid_token(await rs.get(old))
    assert idp.hits("jwks") == 2
    assert len(rs.calls) == 2


async def test_random_unknown_kids_cause_at_most_two_fetches(idp: AuthorizationServer) -> None:
    """A30: 50 tokens with random kids over two cool-down windows, interleaved with a valid
    token; the valid one keeps working and the key set is fetched at most once a window."""
    valid = await request_token(idp, SCOPE)
    unpublished = RSAKey.generate_key(2048, private=True)
    forged = [with_unknown_kid(valid, unpublished) for _ in range(50)]
    async with resource_server(idp) as rs:
        first = await asyncio.gather(rs.get(valid), *(rs.get(t) for t in forged[:25]))
        rs.clock.advance(COOLDOWN + 1)
        second = await asyncio.gather(*(rs.get(t) for t in forged[25:]), rs.get(valid))
        assert first[0].status_code == second[-1].status_code == 200
        for response in first[1:] + second[:-1]:
            assert_invalid_token(response)
        for forged_token in forged[:5]:  # sequentially too, within the second window
            assert_invalid_token(await rs.get(forged_token))
        assert 1 <= idp.hits("jwks") <= 2
        assert idp.hits("metadata") == 1
        assert rs.key_fetches == idp.hits("jwks")
        assert len(rs.calls) == 2


@pytest.mark.parametrize("how", OUTAGES)
async def test_an_idp_outage_after_a_fetch_keeps_the_cached_keys(
    idp: AuthorizationServer, how: str
) -> None:
    """A32/A33: with keys cached, the IdP going away (or answering junk) changes nothing
    for tokens signed by those keys, even once the key set is stale and refreshes fail."""
    tokens = [await request_token(idp, SCOPE) for _ in range(3)]
    unseen = await request_token(idp, SCOPE)  # old key, not in the verified-token cache
    async with resource_server(idp) as rs:
        assert (await rs.get(tokens[0])).status_code == 200
        with idp_down(idp, how):
            # A token never seen before: fully verified, with the cached keys.
            assert (await rs.get(tokens[1])).status_code == 200
            assert rs.key_fetches == 1

            rs.clock.advance(JWKS_MAX_AGE + 1)  # stale: the next use refreshes in background
            assert (await rs.get(tokens[2])).status_code == 200
            await eventually(lambda: rs.key_fetch_errors == 1)
            assert rs.key_fetches == 2
            for token in tokens:
                assert (await rs.get(token)).status_code == 200

            idp.rotate()  # meanwhile, the IdP rotated

        # Back up: after the failure back-off, the next use refreshes in the background and
        # picks up the rotation, so a token with the new kid needs no fetch of its own.
        generation = rs.validator.key_cache(idp.issuer).generation
        rs.clock.advance(RETRY_AFTER_FAILURE + 0.1)
        assert (await rs.get(unseen)).status_code == 200
        await eventually(lambda: rs.validator.key_cache(idp.issuer).generation == generation + 1)
        assert (await rs.get(await request_token(idp, SCOPE))).status_code == 200
        assert rs.key_fetches == 3
        assert rs.key_fetch_errors == 1
    assert len(rs.calls) == 8
    assert idp.hits("jwks") == (2 if how == "refused" else 3)  # the failed refresh arrived


@pytest.mark.parametrize("how", OUTAGES)
@pytest.mark.parametrize("jwks_url", [False, True], ids=["discovery", "jwks-url"])
async def test_a_cold_cache_with_the_idp_down_is_503_then_recovers(
    idp: AuthorizationServer, how: str, jwks_url: bool
) -> None:
    """A31: no key was ever fetched and the IdP is down: 503 with Retry-After (never 200,
    never 500), the app never called, one attempt shared by concurrent requests and none
    within the back-off; once the IdP is back, the first request after the back-off
    succeeds."""
    token = await request_token(idp, SCOPE)
    attempted = "jwks" if jwks_url else "metadata"  # discovery fails before any key fetch
    async with resource_server(idp, jwks_url=jwks_url) as rs:
        with idp_down(idp, how):
            responses = await asyncio.gather(*(rs.get(token) for _ in range(10)))
            retry_after = max(assert_unavailable(r, token) for r in responses)
            hits = {"metadata": idp.hits("metadata"), "jwks": idp.hits("jwks")}
            expected = {"metadata": 0, "jwks": 0}
            expected[attempted] = 0 if how == "refused" else 1
            assert hits == expected
            # Within the back-off, refusals cost no request to the IdP.
            assert_unavailable(await rs.get(token), token)
            assert {"metadata": idp.hits("metadata"), "jwks": idp.hits("jwks")} == hits
            rs.clock.advance(retry_after)
            assert_unavailable(await rs.get(token), token)  # still down: one more attempt
            assert rs.calls == []

        rs.clock.advance(retry_after)
        response = await rs.get(token)
        assert response.status_code == 200, response.text
    assert rs.calls == [idp.client.client_id]


@pytest.mark.parametrize("jwks_url", [False, True], ids=["discovery", "jwks-url"])
async def test_the_gateway_answers_503_without_its_idp_and_recovers(
    idp: AuthorizationServer, jwks_url: bool
) -> None:
    """The example gateway as deployed (environment only, real clock): while the IdP refuses
    connections and no key is cached, every request is 503 and Gemini is never called;
    once it is back, requests succeed within the back-off."""
    env = {
        "GEMINI_SCALE_OAUTH_ISSUER": idp.issuer,
        "GEMINI_SCALE_OAUTH_AUDIENCE": AUDIENCE,
        "GEMINI_SCALE_DEV_ISSUER": "0",
    }
    if jwks_url:
        env["GEMINI_SCALE_OAUTH_JWKS_URL"] = idp.jwks_uri
    token = await request_token(idp, SCOPE)
    headers = {"authorization": f"Bearer {token}"}
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    received: list[ReceivedRequest] = []
    app = build(env, standin=create_standin(received=received))
    async with running(app, scope=None) as gateway:
        with idp_down(idp, "refused"):
            for _ in range(3):
                assert_unavailable(await gateway.post(path, json=body, headers=headers), token)
            assert received == []

        deadline = time.monotonic() + RETRY_AFTER_FAILURE + 3
        while (response := await gateway.post(path, json=body, headers=headers)).status_code != 200:
            assert_unavailable(response, token)
            assert time.monotonic() < deadline, "the gateway did not recover"
            await asyncio.sleep(0.05)
    assert len(received) == 1
    assert idp.hits("jwks") == 1
