"""The example gateway, configured only by environment, accepts access tokens that a real
OAuth 2.0 authorization server (authlib) issued over HTTP with the client-credentials grant,
finding the keys by RFC 8414 discovery or at a configured JWKS URL."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from google import genai
from google.genai import types

from example_app.standin import ReceivedRequest, create_standin
from tests.auth_e2e.authorization_server import (
    AuthorizationServer,
    request_token,
    unverified_segment,
)
from tests.gateway import build, running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(10)]

AUDIENCE = "https://gemini-gateway.test"
OTHER_AUDIENCE = "https://another-service.test"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"
RFC9068_CLAIMS = {"iss", "exp", "aud", "sub", "client_id", "iat", "jti"}


@pytest.fixture
def idp() -> Iterator[AuthorizationServer]:
    with AuthorizationServer(audience=AUDIENCE, resources=(OTHER_AUDIENCE,)) as server:
        yield server


def gateway_env(idp: AuthorizationServer, *, jwks_url: bool = False) -> dict[str, str]:
    env = {
        "GEMINI_SCALE_OAUTH_ISSUER": idp.issuer,
        "GEMINI_SCALE_OAUTH_AUDIENCE": AUDIENCE,
        "GEMINI_SCALE_DEV_ISSUER": "0",
    }
    if jwks_url:
        env["GEMINI_SCALE_OAUTH_JWKS_URL"] = idp.jwks_uri
    return env


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_challenge(response: httpx.Response, code: int, status: str, error: str) -> str:
    assert response.status_code == code, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["error"]["status"] == status
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="gemini-scale"')
    assert f'error="{error}"' in challenge
    return challenge


async def test_authlib_issues_rfc9068_access_tokens(idp: AuthorizationServer) -> None:
    """What the gateway is given: typed, signed with a published key, all required claims."""
    token = await request_token(idp, "gemini.generate")
    header, claims = unverified_segment(token, 0), unverified_segment(token, 1)
    assert header == {"typ": "at+jwt", "alg": "RS256", "kid": idp.published_kids[0]}
    assert claims.keys() >= RFC9068_CLAIMS
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == claims["client_id"] == idp.client.client_id
    assert claims["scope"] == "gemini.generate"
    assert claims["exp"] - claims["iat"] == idp.token_lifetime


@pytest.mark.parametrize("jwks_url", [False, True], ids=["discovery", "jwks-url"])
async def test_a_client_credentials_token_generates_content(
    idp: AuthorizationServer, jwks_url: bool
) -> None:
    received: list[ReceivedRequest] = []
    token = await request_token(idp, "gemini.generate")
    app = build(gateway_env(idp, jwks_url=jwks_url), standin=create_standin(received=received))
    async with running(app, scope=None) as gateway:
        response = await gateway.post(GENERATE, json=PROMPT, headers=bearer(token))
        again = await gateway.post(GENERATE, json=PROMPT, headers=bearer(token))

    assert response.status_code == 200, response.text
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert again.status_code == 200
    # The keys were fetched once, from discovery's jwks_uri or the configured URL.
    assert idp.hits("jwks") == 1
    assert idp.hits("metadata") == (0 if jwks_url else 1)
    # The client's token never travels upstream (DESIGN.md §3, A35).
    assert received
    assert all(request.header("authorization") is None for request in received)


async def test_model_listing_needs_the_read_scope(idp: AuthorizationServer) -> None:
    generate_only = await request_token(idp, "gemini.generate")
    reader = await request_token(idp, "gemini.read")
    async with running(build(gateway_env(idp)), scope=None) as gateway:
        refused = await gateway.get("/v1beta/models", headers=bearer(generate_only))
        listed = await gateway.get("/v1beta/models", headers=bearer(reader))
        cannot_generate = await gateway.post(GENERATE, json=PROMPT, headers=bearer(reader))

    challenge = assert_challenge(refused, 403, "PERMISSION_DENIED", "insufficient_scope")
    assert 'scope="gemini.read"' in challenge
    assert generate_only not in refused.text
    assert listed.status_code == 200, listed.text
    assert "models/gemini-2.5-flash" in {model["name"] for model in listed.json()["models"]}
    challenge = assert_challenge(cannot_generate, 403, "PERMISSION_DENIED", "insufficient_scope")
    assert 'scope="gemini.generate"' in challenge


async def test_a_token_for_another_audience_is_an_invalid_token(
    idp: AuthorizationServer,
) -> None:
    received: list[ReceivedRequest] = []
    token = await request_token(idp, "gemini.generate gemini.read", resource=OTHER_AUDIENCE)
    assert unverified_segment(token, 1)["aud"] == OTHER_AUDIENCE
    app = build(gateway_env(idp), standin=create_standin(received=received))
    async with running(app, scope=None) as gateway:
        response = await gateway.post(GENERATE, json=PROMPT, headers=bearer(token))

    assert_challenge(response, 401, "UNAUTHENTICATED", "invalid_token")  # RFC 9068 §4
    assert token not in response.text
    assert OTHER_AUDIENCE not in response.text
    assert received == []


async def test_authlibs_default_lifetime_exceeds_the_default_cap() -> None:
    """authlib's default client-credentials lifetime (864 000 s, ten days) is longer than
    ``Issuer.max_lifetime`` (one day): such tokens are refused, which is why the server
    above issues 300 s tokens. This pins the interoperability trap, not a preference."""
    with AuthorizationServer(audience=AUDIENCE, token_lifetime=None) as idp:
        token = await request_token(idp, "gemini.generate")
        claims = unverified_segment(token, 1)
        assert claims["exp"] - claims["iat"] == 864_000
        async with running(build(gateway_env(idp)), scope=None) as gateway:
            response = await gateway.post(GENERATE, json=PROMPT, headers=bearer(token))
    assert_challenge(response, 401, "UNAUTHENTICATED", "invalid_token")


@pytest.mark.parametrize("version", ["v1", "v1beta"])
async def test_the_sdk_works_with_a_real_token(idp: AuthorizationServer, version: str) -> None:
    token = await request_token(idp, "gemini.generate gemini.read")
    async with running(build(gateway_env(idp)), scope=None) as gateway:
        sdk = genai.Client(
            api_key="unused",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                api_version=version,
                headers={"Authorization": f"Bearer {token}"},
                httpx_async_client=gateway,
            ),
        )
        generated = await sdk.aio.models.generate_content(
            model="gemini-2.5-flash", contents="Hello"
        )
        stream = await sdk.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Tell me a story"
        )
        chunks = [chunk.text async for chunk in stream]
        counted = await sdk.aio.models.count_tokens(model="gemini-2.5-flash", contents="Hi")
        pager = await sdk.aio.models.list()
        names = [model.name async for model in pager]

    assert generated.text
    assert "".join(text or "" for text in chunks)
    assert counted.total_tokens
    assert "models/gemini-2.5-flash" in names
    assert idp.hits("jwks") == 1
