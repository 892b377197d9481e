"""Authentication in the example gateway: scopes per route, challenges, public routes, and
the google-genai SDK with and without a token."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import Request
from google import genai
from google.genai import errors, types

from example_app.standin import ReceivedRequest, create_standin
from tests.cache.support import http_scope
from tests.gateway import build, dev_token, lifespan, running

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"


def assert_refused(response: httpx.Response, code: int, status: str) -> None:
    assert response.status_code == code, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["error"]["status"] == status


async def test_no_token_is_a_bare_challenge_and_reaches_nothing() -> None:
    received: list[ReceivedRequest] = []
    async with running(build(standin=create_standin(received=received)), scope=None) as client:
        response = await client.post(GENERATE, json=PROMPT)
    assert_refused(response, 401, "UNAUTHENTICATED")
    assert response.headers["www-authenticate"] == 'Bearer realm="gemini-scale"'
    assert received == []


async def test_a_bad_token_is_invalid_token() -> None:
    async with running(build(), scope=None) as client:
        response = await client.post(
            GENERATE, json=PROMPT, headers={"authorization": "Bearer a.b.c"}
        )
    assert_refused(response, 401, "UNAUTHENTICATED")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert "a.b.c" not in response.text


@pytest.mark.parametrize(
    ("scope", "method", "path", "allowed"),
    [
        ("gemini.read", "GET", "/v1/models", True),
        ("gemini.read", "POST", GENERATE, False),
        ("gemini.generate", "POST", GENERATE, True),
        ("gemini.generate", "GET", "/v1beta/models/gemini-2.5-flash", False),
    ],
)
async def test_scopes_per_route(scope: str, method: str, path: str, allowed: bool) -> None:
    async with running(build(), scope=scope) as client:
        response = await client.request(method, path, json=PROMPT if method == "POST" else None)
    if allowed:
        assert response.status_code == 200
    else:
        assert_refused(response, 403, "PERMISSION_DENIED")
        challenge = response.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert "scope=" in challenge


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
async def test_public_routes_need_no_token(path: str) -> None:
    async with running(build(), scope=None) as client:
        assert (await client.get(path)).status_code == 200


async def test_openapi_declares_the_bearer_scheme() -> None:
    async with running(build(), scope=None) as client:
        document = (await client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"].lower() == "bearer"


async def test_the_principal_reaches_the_app_as_request_user() -> None:
    from gemini_scale import Principal, current_principal, requires_scopes

    app = build()

    @app.get("/whoami")
    @requires_scopes("gemini.read")
    async def whoami(request: Request) -> dict[str, object]:
        principal: Principal = await current_principal(request, None)
        return {
            "user": request.user.display_name,
            "scopes": request.auth.scopes,
            "subject": principal.subject,
            "state": request.state.principal.subject,
        }

    async with running(app, scope="gemini.read") as client:
        body = (await client.get("/whoami")).json()
    assert body == {
        "user": "dev-user",
        "scopes": ["gemini.read"],
        "subject": "dev-user",
        "state": "dev-user",
    }


@pytest.mark.parametrize("version", ["v1", "v1beta"])
async def test_the_sdk_without_a_token_raises_its_own_401(version: str) -> None:
    async with running(build(), scope=None) as client:
        sdk = genai.Client(
            api_key="unused",
            http_options=types.HttpOptions(
                base_url="http://gateway", api_version=version, httpx_async_client=client
            ),
        )
        with pytest.raises(errors.ClientError) as caught:
            await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert caught.value.code == 401


async def test_the_sdk_with_a_token_works() -> None:
    async with running(build(), scope=None) as client:
        token = await dev_token(client)
        sdk = genai.Client(
            api_key="unused",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                headers={"Authorization": f"Bearer {token}"},
                httpx_async_client=client,
            ),
        )
        response = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert response.text


async def test_service_accounts_with_api_keys() -> None:
    from gemini_scale import APIKeys

    key = "svc-0123456789abcdef0123456789abcdef"
    env = {"GEMINI_SCALE_CLIENT_API_KEYS": f"{APIKeys.hash_key(key)}=batch-job:gemini.generate"}
    async with running(build(env), scope=None) as client:
        ok = await client.post(GENERATE, json=PROMPT, headers={"x-goog-api-key": key})
        wrong = await client.post(GENERATE, json=PROMPT, headers={"x-goog-api-key": "nope-1234"})
        no_scope = await client.get("/v1/models", headers={"x-goog-api-key": key})
    assert ok.status_code == 200
    assert_refused(wrong, 401, "UNAUTHENTICATED")
    assert_refused(no_scope, 403, "PERMISSION_DENIED")


def test_a_bad_api_key_table_names_the_variable() -> None:
    from gemini_scale import ConfigurationError, load_settings

    with pytest.raises(ConfigurationError, match="GEMINI_SCALE_CLIENT_API_KEYS"):
        load_settings({"GEMINI_SCALE_DEV_ISSUER": "1", "GEMINI_SCALE_CLIENT_API_KEYS": "plain=x"})


@pytest.mark.parametrize("path", [GENERATE, "/v1/models/gemini-2.5-flash:generateContent"])
async def test_a_bad_token_with_a_form_body_is_refused_before_the_body_is_read(
    path: str,
) -> None:
    """A form body may carry a second token (RFC 6750 §2), but only a request whose header
    token holds is worth reading: a bad one is refused at once, whatever body it declares
    (no layer buffers megabytes for a caller that is not authenticated)."""
    app = build()
    sent: list[dict[str, object]] = []
    first = True

    async def receive() -> dict[str, object]:
        nonlocal first
        if first:  # one MiB of 15 declared, then the client stalls
            first = False
            return {"type": "http.request", "body": b"a" * (1 << 20), "more_body": True}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = http_scope("POST", path, headers={
        "authorization": "Bearer a.b.c",
        "content-type": "application/x-www-form-urlencoded",
        "content-length": str(15 << 20),
    })
    async with lifespan(app):
        await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent[0]["status"] == 401
