"""Key sets, their cache and discovery: security.md A28-A33, rotation, bounded fetching.

The fake IdP (``httpx.MockTransport``) counts every request; time is a ``FakeClock`` except
where a real timeout is the point (hangs), and those use timeouts of a fraction of a second.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gemini_scale.auth.discovery import Discovery, metadata_urls
from gemini_scale.auth.errors import IdentityProviderUnavailableError, InvalidTokenError
from gemini_scale.auth.jwks import (
    SIGNATURE_ALGORITHMS,
    DocumentError,
    JWKSCache,
    b64url_decode,
    cache_ttl,
    fetch_json,
    loads_json,
    parse_jwks,
)
from gemini_scale.auth.jwt import Issuer, JWTValidator
from gemini_scale.errors import ConfigurationError
from tests.auth.conftest import Build
from tests.auth.fake_idp import FakeIdP, FakeNetwork
from tests.auth.tokens import (
    AUDIENCE,
    DROP,
    ISSUER,
    FakeClock,
    TokenFactory,
    b64url,
    ec_signer,
    ed25519_signer,
    jwks,
    public_jwk,
    rsa_signer,
)

RS = rsa_signer("kid1")
RS2 = rsa_signer("kid2", slot=2)
EC = ec_signer("ec1")
ED = ed25519_signer("ed1")
NO_KEY = "No signing key of the issuer matches the access token."
FETCH_TIMEOUT = 0.2


@pytest.fixture
def tokens(clock: FakeClock) -> TokenFactory:
    return TokenFactory(RS, clock=clock)


async def settle() -> None:
    """Let background fetches (MockTransport answers at once) run to completion."""
    for _ in range(20):
        await asyncio.sleep(0)


async def refusal(validator: JWTValidator, token: str) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        await validator.verify(token)
    return caught.value.description


def junk_token(tokens: TokenFactory, kid: str) -> str:
    """Well formed, valid claims, a kid nobody has, a random signature."""
    token = tokens.mint(header={"kid": kid})
    return token.rsplit(".", 1)[0] + "." + b64url(secrets.token_bytes(256))


# ------------------------------------------------------------------------------------------
# Parsing: A28 (hostile contents), strict decoding
# ------------------------------------------------------------------------------------------


def _fake_rsa(bits: int) -> dict[str, Any]:
    modulus = (1 << (bits - 1)) | secrets.randbits(bits - 1) | 1
    return {"kty": "RSA", "kid": f"rsa-{bits}", "n": b64url(modulus.to_bytes(bits // 8, "big")),
            "e": "AQAB"}


SKIPPED_KEYS: dict[str, Any] = {
    "oct": {"kty": "oct", "kid": "hmac", "k": b64url(b"secret-secret-secret")},
    "unknown-kty": {"kty": "ML-DSA", "kid": "pq", "pub": "AAAA"},
    "no-kty": {"kid": "x", "n": RS.jwk["n"], "e": "AQAB"},
    "kty-not-string": {"kty": ["RSA"], "n": RS.jwk["n"], "e": "AQAB"},
    "private-rsa": {**RS.jwk, "kid": "leaked", "d": "c2VjcmV0LWQtdmFsdWU"},
    "private-ec": {**EC.jwk, "kid": "leaked-ec", "d": "c2VjcmV0LWQtdmFsdWU"},
    "use-enc": {**RS.jwk, "kid": "enc", "use": "enc"},
    "use-not-string": {**RS.jwk, "kid": "use", "use": ["sig"]},
    "key-ops-encrypt": {**RS.jwk, "kid": "ops", "key_ops": ["encrypt"]},
    "key-ops-string": {**RS.jwk, "kid": "ops2", "key_ops": "verify"},
    "kid-not-string": {**RS.jwk, "kid": 7},
    "alg-hs256": {**RS.jwk, "kid": "hs", "alg": "HS256"},
    "alg-of-other-family": {**RS.jwk, "kid": "es-on-rsa", "alg": "ES256"},
    "alg-unknown": {**RS.jwk, "kid": "oaep", "alg": "RSA-OAEP"},
    "rsa-1024": {**public_jwk(rsa_signer(slot=9, bits=1024).public), "kid": "weak"},
    "rsa-16384": _fake_rsa(16384),
    "rsa-bad-n": {"kty": "RSA", "kid": "bad-n", "n": "!!!", "e": "AQAB"},
    "rsa-even-e": {**RS.jwk, "kid": "even-e", "e": "Ag"},
    "ec-secp256k1": {**EC.jwk, "kid": "k1", "crv": "secp256k1"},
    "ec-off-curve": {**EC.jwk, "kid": "off", "y": EC.jwk["x"]},
    "ec-no-crv": {k: v for k, v in EC.jwk.items() if k != "crv"},
    "okp-x25519": {"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64url(bytes(32))},
    "okp-ed448": {"kty": "OKP", "crv": "Ed448", "kid": "448", "x": b64url(bytes(57))},
    "okp-short": {"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": b64url(bytes(7))},
    "not-an-object": "RSA",
    "null": None,
}


def test_a28_usable_keys_are_kept() -> None:
    snapshot = parse_jwks(jwks(RS, EC, ED), max_keys=100)
    assert [key.kid for key in snapshot.keys] == ["kid1", "ec1", "ed1"]
    assert snapshot.skipped == 0
    rs256 = SIGNATURE_ALGORITHMS["RS256"]
    assert snapshot.find("kid1", rs256) is snapshot.keys[0]
    assert snapshot.find("ec1", rs256) is None  # exact kid, but the wrong key type
    assert snapshot.find(None, rs256) is None  # no kid: only a one-key set will do
    assert parse_jwks(jwks(RS), max_keys=1).find(None, rs256) is not None


@pytest.mark.parametrize("name", list(SKIPPED_KEYS))
def test_a28_unusable_keys_are_skipped_not_fatal(name: str) -> None:
    snapshot = parse_jwks({"keys": [SKIPPED_KEYS[name], RS.jwk]}, max_keys=100)
    assert [key.kid for key in snapshot.keys] == ["kid1"]
    assert snapshot.skipped == 1


def test_a28_duplicate_kids_pick_the_key_that_fits() -> None:
    same_kid = {**EC.jwk, "kid": "kid1"}
    snapshot = parse_jwks({"keys": [same_kid, RS.jwk]}, max_keys=100)
    assert snapshot.find("kid1", SIGNATURE_ALGORITHMS["RS256"]) is snapshot.keys[1]
    assert snapshot.find("kid1", SIGNATURE_ALGORITHMS["ES256"]) is snapshot.keys[0]


@pytest.mark.parametrize(
    "document",
    [
        [RS.jwk],
        {"keys": {}},
        {"nokeys": []},
        {"keys": "RS"},
        {"keys": []},
        {"keys": [SKIPPED_KEYS["oct"], SKIPPED_KEYS["private-rsa"]]},
        {"keys": [RS.jwk] * 101},
        None,
    ],
    ids=["array", "keys-object", "no-keys", "keys-string", "empty", "nothing-usable",
         "too-many", "null"],
)
def test_a28_a33_unusable_documents_are_errors(document: Any) -> None:
    with pytest.raises(DocumentError):
        parse_jwks(document, max_keys=100)


def test_a28_key_count_is_checked_before_any_key_is_parsed() -> None:
    started = time.perf_counter()
    with pytest.raises(DocumentError, match="too many"):
        parse_jwks({"keys": [RS.jwk] * 10_000}, max_keys=100)
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(
    ("segment", "decoded"),
    [("", b""), ("AA", b"\x00"), ("AAA", b"\x00\x00"), ("AAAA", b"\x00" * 3), ("-_8", b"\xfb\xff")],
)
def test_b64url_decodes_canonical_input(segment: str, decoded: bytes) -> None:
    assert b64url_decode(segment) == decoded


@pytest.mark.parametrize(
    "segment", ["AA==", "AA=", "+/8", "A", "AAAAA", "AB", "AAB", "A A", "AA\n", "AÀ"]
)
def test_b64url_refuses_padding_other_alphabets_and_non_canonical_bits(segment: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(segment)


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf{}",
        '{"a": 1}'.encode("utf-16"),
        '{"a": 1}'.encode("utf-32"),
        b'{"a": 1, "a": 2}',
        b'{"o": {"a": 1, "a": 1}}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1} x',
        b'{"a": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=["bom", "utf16", "utf32", "dup", "nested-dup", "nan", "inf", "-inf", "trailing",
         "bad-utf8", "deep"],
)
def test_loads_json_is_strict(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every refusal is a ValueError
        loads_json(data)


def test_loads_json_accepts_plain_utf8_json() -> None:
    assert loads_json(' {"a": ["\u00e9", 1.5, null]} '.encode()) == {"a": ["é", 1.5, None]}


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        (None, 600.0),
        ("max-age=120", 120.0),
        ("public, max-age=300", 300.0),
        ('max-age="300"', 300.0),
        ("MAX-AGE=200, must-revalidate", 200.0),
        ("max-age=5", 60.0),
        ("max-age=0", 60.0),
        ("max-age=1000000000", 86_400.0),
        ("no-cache", 600.0),
        ("max-age=abc", 600.0),
        ("s-maxage=100", 600.0),
    ],
)
def test_ttl_comes_from_max_age_clamped(cache_control: str | None, ttl: float) -> None:
    headers = httpx.Headers({} if cache_control is None else {"cache-control": cache_control})
    assert cache_ttl(headers, 600.0) == ttl


def test_a28_private_parts_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = "c2VjcmV0LWQtdmFsdWU"
    with caplog.at_level(logging.DEBUG):
        parse_jwks({"keys": [RS.jwk, {**EC.jwk, "kid": "leaked", "d": secret}]}, max_keys=10)
        with pytest.raises(DocumentError) as caught:
            parse_jwks({"keys": [{**RS.jwk, "d": secret}]}, max_keys=10)
    assert secret not in caplog.text
    assert secret not in str(caught.value)


# ------------------------------------------------------------------------------------------
# Bounded fetching
# ------------------------------------------------------------------------------------------


def _serve(response: Callable[[httpx.Request], Any]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(response))


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/jwk-set+json",
     "Application/JSON"],
)
async def test_fetch_accepts_json_media_types(content_type: str) -> None:
    async with _serve(lambda _: httpx.Response(200, json={"keys": []},
                                               headers={"content-type": content_type})) as client:
        fetched = await fetch_json(client, "https://as.example/jwks", time_limit=1,
                                   max_bytes=1000)
    assert fetched.body == {"keys": []}


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (httpx.Response(500, json={}), "status was 500"),
        (httpx.Response(302, headers={"location": "https://evil.example/jwks"}), "status was 302"),
        (httpx.Response(200, text="<html>ok</html>", headers={"content-type": "text/html"}),
         "not JSON"),
        (httpx.Response(200, text=json.dumps(jwks(RS)), headers={"content-type": "text/plain"}),
         "not JSON"),
        (httpx.Response(200, content=b"{}"), "not JSON"),  # no content type at all
        (httpx.Response(200, content=b"{oops", headers={"content-type": "application/json"}),
         "not valid JSON"),
        (httpx.Response(200, content=b"x" * 2000, headers={"content-type": "application/json"}),
         "too large"),
    ],
    ids=["500", "redirect", "html", "text-plain", "no-type", "bad-json", "too-large"],
)
async def test_fetch_refuses_bad_responses(response: httpx.Response, reason: str) -> None:
    async with _serve(lambda _: response) as client:
        with pytest.raises(DocumentError, match=reason):
            await fetch_json(client, "https://as.example/jwks", time_limit=1, max_bytes=1000)


async def test_fetch_stops_reading_a_stream_past_the_limit() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b" " * 1024

    async with _serve(lambda _: httpx.Response(
        200, content=endless(), headers={"content-type": "application/json"}
    )) as client:
        with pytest.raises(DocumentError, match="too large"):
            await fetch_json(client, "https://as.example/jwks", time_limit=1, max_bytes=10_000)
    assert sent <= 11


async def test_fetch_is_bounded_in_time() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError  # pragma: no cover

    started = time.perf_counter()
    async with _serve(hang) as client:
        with pytest.raises(DocumentError, match="timed out"):
            await fetch_json(client, "https://as.example/jwks", time_limit=0.05, max_bytes=10)
    assert time.perf_counter() - started < 1


async def test_fetch_maps_transport_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with _serve(refuse) as client:
        with pytest.raises(DocumentError, match="ConnectError"):
            await fetch_json(client, "https://as.example/jwks", time_limit=1, max_bytes=10)


# ------------------------------------------------------------------------------------------
# The cache behind the validator: A28-A33, rotation
# ------------------------------------------------------------------------------------------


async def test_a28_hostile_sets_keep_the_previous_good_one(validator: JWTValidator,
                                                           tokens: TokenFactory,
                                                           idp: FakeIdP) -> None:
    assert await validator.verify(tokens.mint())
    cache = validator.key_cache(ISSUER)
    good = cache.snapshot
    hostile: list[dict[str, Any]] = [
        {"body": {"keys": [RS.jwk] * 10_000}},
        {"body": b" " * (600 * 1024)},
        {"body": {"keys": [_fake_rsa(16384)]}},
        {"body": {"keys": [SKIPPED_KEYS["oct"], SKIPPED_KEYS["unknown-kty"]]}},
        {"body": {"keys": [SKIPPED_KEYS["private-rsa"]]}},
    ]
    for errors, behaviour in enumerate(hostile, start=1):
        idp.script("/jwks", **behaviour)
        assert await cache.refresh() is False
        assert cache.snapshot is good
        assert cache.errors == errors
        assert await validator.verify(tokens.mint())


async def test_a28_max_keys_is_configurable(build: Build, idp: FakeIdP,
                                            tokens: TokenFactory) -> None:
    idp.set_signers(RS, RS2, EC)
    validator = build(validator={"max_jwks_keys": 2})
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(tokens.mint())
    assert validator.key_cache(ISSUER).last_error == "the JWK Set has too many keys"


async def test_a29_rotation_single_flight(validator: JWTValidator, tokens: TokenFactory,
                                          idp: FakeIdP, clock: FakeClock) -> None:
    assert await validator.verify(tokens.mint())
    assert idp.jwks_hits == 1
    gate = asyncio.Event()
    idp.set_signers(RS, RS2)
    idp.script("/jwks", gate=gate)
    clock.advance(31)  # past the cool-down since the first fetch
    rotated = TokenFactory(RS2, clock=clock)
    tasks = [asyncio.create_task(validator.verify(rotated.mint())) for _ in range(100)]
    await settle()
    assert idp.jwks_hits == 2  # one request in flight, everybody waiting on it
    gate.set()
    principals = await asyncio.gather(*tasks)
    assert len(principals) == 100
    assert idp.jwks_hits == 2
    assert await validator.verify(tokens.mint())  # kid1 still works


async def test_a29_a_waiter_going_away_does_not_cancel_the_shared_fetch(
    validator: JWTValidator, idp: FakeIdP, clock: FakeClock
) -> None:
    gate = asyncio.Event()
    idp.script("/jwks", gate=gate)
    factory = TokenFactory(RS, clock=clock)
    leaving = asyncio.create_task(validator.verify(factory.mint()))
    staying = asyncio.create_task(validator.verify(factory.mint()))
    await settle()
    leaving.cancel()
    await settle()
    gate.set()
    assert await staying
    assert leaving.cancelled()
    assert idp.jwks_hits == 1


async def test_a30_random_kids_cannot_drive_fetches(validator: JWTValidator,
                                                    tokens: TokenFactory, idp: FakeIdP,
                                                    clock: FakeClock) -> None:
    assert await validator.verify(tokens.mint())
    valid = [tokens.mint() for _ in range(20)]
    fetches_at: list[float] = []
    for index in range(1000):
        before = idp.jwks_hits
        assert await refusal(validator, junk_token(tokens, secrets.token_hex(8))) == NO_KEY
        if idp.jwks_hits != before:
            fetches_at.append(clock.time())
        if index % 10 == 0:
            assert await validator.verify(valid[index // 50])
        clock.advance(0.06)  # 1000 requests over 60 s: two cool-down windows
    assert len(fetches_at) <= 2
    assert all(b - a >= 30 for a, b in itertools.pairwise(fetches_at))
    assert validator.key_cache(ISSUER).generation == 1  # the same set: nothing evicted


async def test_a30_concurrent_junk_shares_one_fetch(validator: JWTValidator,
                                                    tokens: TokenFactory, idp: FakeIdP,
                                                    clock: FakeClock) -> None:
    assert await validator.verify(tokens.mint())
    clock.advance(31)
    gate = asyncio.Event()
    idp.script("/jwks", gate=gate)
    tasks = [asyncio.create_task(validator.verify(junk_token(tokens, secrets.token_hex(8))))
             for _ in range(200)]
    await settle()
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(outcome, InvalidTokenError) for outcome in outcomes)
    assert idp.jwks_hits == 2


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"status": 503, "body": b"<html>down</html>", "content_type": "text/html"},
        {"status": 200, "body": b"<html>maintenance</html>", "content_type": "text/html"},
        {"error": httpx.ConnectError},
        {"error": httpx.ReadTimeout},
        {"hang": True},
    ],
    ids=["500", "503-html", "200-html", "refused", "read-timeout", "hang"],
)
async def test_a31_cold_cache_and_idp_down(validator: JWTValidator, tokens: TokenFactory,
                                           idp: FakeIdP, clock: FakeClock,
                                           failure: dict[str, Any]) -> None:
    idp.script("/jwks", **failure)
    started = time.perf_counter()
    with pytest.raises(IdentityProviderUnavailableError) as caught:
        await validator.verify(tokens.mint())
    assert time.perf_counter() - started < FETCH_TIMEOUT + 0.5
    assert caught.value.status_code == 503
    assert caught.value.retry_after >= 1
    assert idp.jwks_hits == 1
    # Within the retry interval: refused at once, without asking the IdP again.
    clock.advance(0.5)
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(tokens.mint())
    assert idp.jwks_hits == 1
    # The IdP recovers: the next request after the interval succeeds.
    idp.reset()
    clock.advance(0.6)
    assert await validator.verify(tokens.mint())
    assert idp.jwks_hits == 2
    assert validator.key_cache(ISSUER).errors == 1


async def test_a31_cold_cache_with_discovery_down(build: Build, tokens: TokenFactory,
                                                  idp: FakeIdP, clock: FakeClock,
                                                  network: FakeNetwork) -> None:
    validator = build(discover=True)
    for path in (idp.oauth_metadata_path, idp.oidc_metadata_path):
        idp.script(path, status=500)
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(tokens.mint())
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(tokens.mint())
    assert len(network.requests) == 2  # both metadata documents, once
    idp.reset()
    clock.advance(1.1)
    assert await validator.verify(tokens.mint())


async def test_a32_warm_cache_survives_a_hanging_idp(validator: JWTValidator,
                                                     tokens: TokenFactory, idp: FakeIdP,
                                                     clock: FakeClock) -> None:
    assert await validator.verify(tokens.mint())
    idp.script("/jwks", hang=True)
    clock.advance(601)  # the set is stale now
    started = time.perf_counter()
    for _ in range(20):
        assert await validator.verify(tokens.mint())  # served from the stale set at once
    assert time.perf_counter() - started < FETCH_TIMEOUT / 2
    await settle()
    assert idp.jwks_hits == 2  # one background refresh, hanging
    # Unknown kids join that one request and wait at most the fetch timeout.
    rotated = TokenFactory(RS2, clock=clock)
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(validator.verify(rotated.mint()) for _ in range(10)), return_exceptions=True
    )
    assert time.perf_counter() - started < FETCH_TIMEOUT + 0.5
    assert all(isinstance(outcome, IdentityProviderUnavailableError) for outcome in outcomes)
    assert idp.jwks_hits == 2
    # Known keys keep working, and the failed refresh is not retried within a second.
    clock.advance(0.5)
    assert await validator.verify(tokens.mint())
    await settle()
    assert idp.jwks_hits == 2
    cache = validator.key_cache(ISSUER)
    assert cache.errors == 1
    assert cache.last_error == "the request timed out"


async def test_a32_stale_keys_are_served_while_refreshes_fail(validator: JWTValidator,
                                                              tokens: TokenFactory,
                                                              idp: FakeIdP,
                                                              clock: FakeClock) -> None:
    assert await validator.verify(tokens.mint())
    idp.script("/jwks", status=500)
    clock.advance(601)
    for _ in range(10):
        assert await validator.verify(tokens.mint())
        await settle()
        clock.advance(0.25)
    # 2.5 s of traffic against a failing IdP: about one attempt per second, not ten.
    assert 2 <= idp.jwks_hits - 1 <= 3
    idp.reset()
    clock.advance(1)
    assert await validator.verify(tokens.mint())
    await settle()
    assert validator.key_cache(ISSUER).last_error is not None
    hits = idp.jwks_hits
    clock.advance(300)  # fresh again: no more fetches
    assert await validator.verify(tokens.mint())
    await settle()
    assert idp.jwks_hits == hits


@pytest.mark.parametrize(
    "poison",
    [
        {"body": b"<html><body>Welcome</body></html>", "content_type": "text/html"},
        {"body": {"keys": {}}},
        {"body": {"nokeys": []}},
        {"body": b"{not json"},
        {"body": {"keys": [{k: v for k, v in RS2.jwk.items() if k != "kty"}]}},
        {"body": json.dumps(jwks(RS2)).encode(), "content_type": "text/plain"},
        {"body": {"keys": []}},
        {"body": b"null"},
        {"body": [RS2.jwk]},
        {"status": 404},
        {"status": 500, "body": jwks(RS2)},
        {"status": 200, "headers": {"content-length": str(10**9)}},
    ],
    ids=["html-200", "keys-object", "nokeys", "invalid-json", "no-kty", "text-plain",
         "empty-keys", "null", "array", "404", "500-with-keys", "huge-length"],
)
async def test_a33_a_bad_response_never_replaces_good_keys(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, poison: dict[str, Any]
) -> None:
    assert await validator.verify(tokens.mint())
    cache = validator.key_cache(ISSUER)
    good, generation = cache.snapshot, cache.generation
    idp.script("/jwks", **poison)
    assert await cache.refresh() is False
    assert cache.snapshot is good
    assert cache.generation == generation
    assert cache.errors == 1
    assert await validator.verify(tokens.mint())


async def test_ttl_follows_cache_control(build: Build, idp: FakeIdP, tokens: TokenFactory,
                                         clock: FakeClock) -> None:
    idp.jwks_cache_control = "public, max-age=120"
    validator = build(jwks_ttl=900)
    assert await validator.verify(tokens.mint())
    clock.advance(119)
    assert await validator.verify(tokens.mint())
    await settle()
    assert idp.jwks_hits == 1
    clock.advance(2)
    assert await validator.verify(tokens.mint())
    await settle()
    assert idp.jwks_hits == 2


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [(None, 900.0), ("max-age=5", 60.0), ("max-age=999999999", 86_400.0)],
)
async def test_ttl_default_and_clamps(build: Build, idp: FakeIdP, tokens: TokenFactory,
                                      clock: FakeClock, cache_control: str | None,
                                      fresh_for: float) -> None:
    idp.jwks_cache_control = cache_control
    validator = build(jwks_ttl=900, max_token_age=None, max_lifetime=None)
    long_lived = TokenFactory(RS, clock=clock, lifetime=200_000)
    token = long_lived.mint()
    assert await validator.verify(token)
    clock.advance(fresh_for - 1)
    assert await validator.verify(long_lived.mint())
    await settle()
    assert idp.jwks_hits == 1
    clock.advance(2)
    assert await validator.verify(long_lived.mint())
    await settle()
    assert idp.jwks_hits == 2


async def test_rotation_end_to_end(validator: JWTValidator, tokens: TokenFactory,
                                   idp: FakeIdP, clock: FakeClock) -> None:
    old_token = tokens.mint(claims={"exp": int(clock.time()) + 3600})
    assert await validator.verify(old_token)
    # The IdP publishes kid2 next to kid1 and starts signing with it.
    idp.set_signers(RS, RS2)
    clock.advance(60)
    new_tokens = TokenFactory(RS2, clock=clock)
    assert await validator.verify(new_tokens.mint())
    assert idp.jwks_hits == 2
    assert await validator.verify(old_token)  # still cached, the key set only grew...
    assert validator.stats.signatures == 3  # ...but the cached entry was verified again
    # kid1 is withdrawn; once the set is refreshed, kid1 tokens stop working, cached or not.
    idp.set_signers(RS2)
    clock.advance(601)
    assert await validator.verify(new_tokens.mint())
    await settle()
    assert idp.jwks_hits == 3
    assert await refusal(validator, old_token) == NO_KEY
    assert await refusal(validator, tokens.mint()) == NO_KEY
    assert await validator.verify(new_tokens.mint())


async def test_an_unknown_kid_inside_the_cooldown_is_refused_without_a_fetch(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    assert await validator.verify(tokens.mint())
    idp.set_signers(RS, RS2)
    rotated = TokenFactory(RS2, clock=clock)
    assert await refusal(validator, rotated.mint()) == NO_KEY
    assert idp.jwks_hits == 1
    clock.advance(30)
    assert await validator.verify(rotated.mint())
    assert idp.jwks_hits == 2


async def test_cooldown_is_per_issuer_setting(build: Build, tokens: TokenFactory,
                                              idp: FakeIdP) -> None:
    validator = build(jwks_cooldown=0)
    assert await validator.verify(tokens.mint())
    idp.set_signers(RS, RS2)
    assert await validator.verify(TokenFactory(RS2, clock=tokens.clock).mint())
    assert idp.jwks_hits == 2


async def test_a_kidless_token_never_refetches(validator: JWTValidator, tokens: TokenFactory,
                                               idp: FakeIdP, clock: FakeClock) -> None:
    idp.set_signers(RS, EC)
    assert await validator.verify(tokens.mint())
    clock.advance(60)
    assert await refusal(validator, tokens.mint(header={"kid": DROP})) == NO_KEY
    assert idp.jwks_hits == 1



async def test_a_static_key_set_never_fetches(build: Build, tokens: TokenFactory,
                                              network: FakeNetwork, clock: FakeClock) -> None:
    validator = build(jwks=jwks(RS), jwks_url=None)
    clock.advance(10 * 86_400)
    fresh = TokenFactory(RS, clock=clock)
    assert await validator.verify(fresh.mint())
    assert await refusal(validator, TokenFactory(RS2, clock=clock).mint()) == NO_KEY
    assert network.requests == []
    with pytest.raises(ConfigurationError):
        JWKSCache.static({"keys": [SKIPPED_KEYS["oct"]]}, clock=clock)


async def test_aclose_cancels_a_hanging_fetch(build: Build, tokens: TokenFactory,
                                              idp: FakeIdP) -> None:
    validator = build(validator={"fetch_timeout": 30})
    idp.script("/jwks", hang=True)
    waiting = asyncio.create_task(validator.verify(tokens.mint()))
    await settle()
    assert idp.jwks_hits == 1
    started = time.perf_counter()
    await validator.aclose()
    assert time.perf_counter() - started < 1
    with pytest.raises(IdentityProviderUnavailableError):
        await waiting


async def test_aclose_leaves_an_injected_client_open(validator: JWTValidator,
                                                     client: httpx.AsyncClient,
                                                     tokens: TokenFactory) -> None:
    assert await validator.verify(tokens.mint())
    await validator.aclose()
    assert not client.is_closed


async def test_a_validator_without_a_client_opens_nothing_until_needed() -> None:
    validator = JWTValidator([Issuer(issuer=ISSUER, audience=AUDIENCE)])
    await validator.aclose()  # nothing was created, nothing to close


# ------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "urls"),
    [
        ("https://as.example/", ("https://as.example/.well-known/oauth-authorization-server",
                                 "https://as.example/.well-known/openid-configuration")),
        ("https://as.example", ("https://as.example/.well-known/oauth-authorization-server",
                                "https://as.example/.well-known/openid-configuration")),
        ("https://login.example/tenant/v2",
         ("https://login.example/.well-known/oauth-authorization-server/tenant/v2",
          "https://login.example/tenant/v2/.well-known/openid-configuration")),
        ("http://localhost:8080/dev/",
         ("http://localhost:8080/.well-known/oauth-authorization-server/dev",
          "http://localhost:8080/dev/.well-known/openid-configuration")),
    ],
)
def test_metadata_urls(issuer: str, urls: tuple[str, str]) -> None:
    assert metadata_urls(issuer) == urls


@pytest.mark.parametrize(
    "issuer", ["urn:example", "as.example", "https://as.example/?x=1", "https://as.example/#f",
               "ftp://as.example/", "https:///path"]
)
def test_metadata_urls_refuse_non_urls(issuer: str) -> None:
    with pytest.raises(ConfigurationError):
        metadata_urls(issuer)


async def test_discovery_prefers_rfc8414_and_fetches_once(build: Build, tokens: TokenFactory,
                                                          idp: FakeIdP, network: FakeNetwork,
                                                          clock: FakeClock) -> None:
    validator = build(discover=True)
    assert await validator.verify(tokens.mint())
    clock.advance(601)  # the key set expires; the metadata does not
    assert await validator.verify(tokens.mint())
    await settle()
    assert network.urls == [
        "https://as.example/.well-known/oauth-authorization-server",
        idp.jwks_url,
        idp.jwks_url,
    ]
    discovery = validator.discovery(ISSUER)
    assert discovery is not None
    metadata = await discovery.metadata()
    assert metadata.jwks_uri == idp.jwks_url
    assert metadata.introspection_endpoint == idp.introspection_url
    assert metadata.document["issuer"] == ISSUER
    assert validator.discovery(ISSUER) is discovery
    assert build().discovery(ISSUER) is None  # an explicit jwks_url needs none


async def test_discovery_falls_back_to_openid_configuration(build: Build,
                                                            tokens: TokenFactory,
                                                            idp: FakeIdP,
                                                            network: FakeNetwork) -> None:
    idp.script(idp.oauth_metadata_path, status=404)
    validator = build(discover=True)
    assert await validator.verify(tokens.mint())
    assert network.urls == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
        idp.jwks_url,
    ]


@pytest.mark.parametrize(
    "metadata",
    [
        {"issuer": "https://as.example", "jwks_uri": "https://as.example/jwks"},
        {"issuer": "https://evil.example/", "jwks_uri": "https://as.example/jwks"},
        {"jwks_uri": "https://as.example/jwks"},
        {"issuer": ISSUER},
        {"issuer": ISSUER, "jwks_uri": "http://as.example/jwks"},
        {"issuer": ISSUER, "jwks_uri": "file:///etc/passwd"},
        {"issuer": ISSUER, "jwks_uri": ["https://as.example/jwks"]},
    ],
    ids=["no-slash", "other-issuer", "no-issuer", "no-jwks-uri", "http-downgrade", "file",
         "list"],
)
async def test_discovery_refuses_bad_metadata(build: Build, tokens: TokenFactory,
                                              idp: FakeIdP, network: FakeNetwork,
                                              metadata: dict[str, Any]) -> None:
    idp.metadata = metadata
    validator = build(discover=True)
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(tokens.mint())
    assert idp.jwks_url not in network.urls
    assert len(network.urls) == 2  # both documents tried, no keys fetched from anywhere


async def test_discovery_single_flight_and_retry_interval(client: httpx.AsyncClient,
                                                          idp: FakeIdP, network: FakeNetwork,
                                                          clock: FakeClock) -> None:
    gate = asyncio.Event()
    idp.script(idp.oauth_metadata_path, gate=gate, status=500)
    idp.script(idp.oidc_metadata_path, status=500)
    discovery = Discovery(ISSUER, client=lambda: client, clock=clock, fetch_timeout=1)
    waiters = [asyncio.create_task(discovery.metadata()) for _ in range(20)]
    await settle()
    gate.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(outcome, IdentityProviderUnavailableError) for outcome in outcomes)
    assert len(network.requests) == 2
    with pytest.raises(IdentityProviderUnavailableError) as caught:
        await discovery.metadata()
    assert caught.value.retry_after == 1
    assert len(network.requests) == 2
    idp.reset()
    clock.advance(1)
    assert (await discovery.jwks_uri()) == idp.jwks_url
    assert discovery.fetches == 3
    await discovery.aclose()


async def test_discovery_of_an_issuer_with_a_path(clock: FakeClock) -> None:
    issuer = "https://login.example/tenant-9/v2.0"
    idp = FakeIdP(issuer, signers=(EC,))
    network = FakeNetwork(idp)
    async with network.client() as client:
        validator = JWTValidator([Issuer(issuer=issuer, audience=AUDIENCE)], http_client=client,
                                 clock=clock)
        assert await validator.verify(TokenFactory(EC, issuer=issuer, clock=clock).mint())
        await validator.aclose()
    assert network.urls[0] == (
        "https://login.example/.well-known/oauth-authorization-server/tenant-9/v2.0"
    )


def test_a_validator_outlives_an_event_loop_with_a_fetch_in_flight() -> None:
    idp = FakeIdP(signers=(RS,))
    network = FakeNetwork(idp)
    clock = FakeClock()
    client = network.client()
    validator = JWTValidator([Issuer(issuer=ISSUER, audience=AUDIENCE, jwks_url=idp.jwks_url)],
                             http_client=client, clock=clock)
    token = TokenFactory(RS, clock=clock).mint()
    idp.script("/jwks", gate=asyncio.Event())  # never released in the first loop
    first = asyncio.new_event_loop()
    with pytest.raises(TimeoutError):
        first.run_until_complete(asyncio.wait_for(validator.verify(token), 0.05))
    first.close()  # the shared fetch is still pending on the closed loop
    idp.reset()

    async def second_loop() -> None:
        assert await validator.verify(token)
        await validator.aclose()
        await client.aclose()

    asyncio.run(second_loop())
    assert idp.jwks_hits == 2
