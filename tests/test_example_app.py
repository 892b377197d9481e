"""The example gateway end to end: the Gemini surface on /v1 and /v1beta, errors, health."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.gateway import build, dev_token, free_port, running
from tests.sse import sse_events

GENERATE = {"contents": [{"role": "user", "parts": [{"text": "Hello gateway"}]}]}


@pytest.mark.parametrize("version", ["v1", "v1beta"])
async def test_generate_content_is_gemini_shaped_and_deterministic(version: str) -> None:
    async with running(build()) as client:
        path = f"/{version}/models/gemini-2.5-flash:generateContent"
        first = await client.post(path, json=GENERATE)
        second = await client.post(path, json=GENERATE)
    assert first.status_code == 200
    body = first.json()
    assert body["candidates"][0]["content"]["parts"][0]["text"]
    assert body["usageMetadata"]["totalTokenCount"] > 0
    assert body["candidates"] == second.json()["candidates"]


async def test_stream_is_gemini_sse_framing() -> None:
    async with running(build()) as client:
        response = await client.post(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", json=GENERATE
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert len(sse_events(response.content)) >= 2


async def test_stream_without_alt_sse_is_a_json_array() -> None:
    async with running(build()) as client:
        response = await client.post(
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent", json=GENERATE
        )
    assert response.status_code == 200
    chunks = response.json()
    assert isinstance(chunks, list)
    assert len(chunks) >= 2


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/models/gemini-2.5-flash:countTokens", GENERATE, "totalTokens"),
        (
            "/v1beta/models/gemini-embedding-001:embedContent",
            {"content": {"parts": [{"text": "x"}]}},
            "embedding",
        ),
        (
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            {
                "requests": [
                    {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "x"}]}}
                ]
            },
            "embeddings",
        ),
    ],
)
async def test_other_model_methods(path: str, body: dict[str, object], key: str) -> None:
    async with running(build()) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 200
    assert key in response.json()


async def test_models_list_and_get() -> None:
    async with running(build()) as client:
        listing = await client.get("/v1beta/models")
        one = await client.get("/v1/models/gemini-2.5-flash")
    assert listing.status_code == 200
    assert any(m["name"] == "models/gemini-2.5-flash" for m in listing.json()["models"])
    assert one.json()["name"] == "models/gemini-2.5-flash"


def assert_envelope(response: httpx.Response, code: int, status: str) -> None:
    assert response.status_code == code, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == "no-store"
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (code, status)
    assert "Traceback" not in response.text


async def test_bad_requests_get_google_envelopes() -> None:
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    app = build({"GEMINI_SCALE_MAX_BODY_BYTES": "2048"})
    async with running(app) as client:
        malformed = await client.post(
            path, content=b"{oops", headers={"content-type": "application/json"}
        )
        wrong_type = await client.post(path, content=b"{}", headers={"content-type": "text/plain"})
        oversized = await client.post(path, json={"contents": [{"parts": [{"text": "x" * 5000}]}]})
        unknown_model = await client.post(
            "/v1beta/models/gemini-0.1-nope:generateContent", json=GENERATE
        )
        unknown_method = await client.post("/v1beta/models/gemini-2.5-flash:explode", json=GENERATE)
        bad_model = await client.post("/v1beta/models/%20bad%3D:generateContent", json=GENERATE)
        wrong_method = await client.delete("/v1beta/models")
    assert_envelope(malformed, 400, "INVALID_ARGUMENT")
    assert_envelope(wrong_type, 415, "INVALID_ARGUMENT")
    assert_envelope(oversized, 413, "INVALID_ARGUMENT")
    assert_envelope(unknown_model, 404, "NOT_FOUND")
    assert_envelope(unknown_method, 404, "NOT_FOUND")
    assert_envelope(bad_model, 400, "INVALID_ARGUMENT")
    assert_envelope(wrong_method, 405, "INVALID_ARGUMENT")


async def test_valid_json_the_model_cannot_take_is_a_400_not_a_500() -> None:
    # A lone surrogate escape and nesting the body check accepts (1000 levels) both parse;
    # the offline stand-in answers them as Google does, never with a crash.
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    surrogate = b'{"contents": [{"parts": [{"text": "\\ud800"}]}]}'
    deep = (b'{"contents": [{"parts": [{"text": "deep"}]}], "tools": '
            + b"[" * 1000 + b"]" * 1000 + b"}")
    async with running(build()) as client:
        for body in (surrogate, deep):
            answer = await client.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert_envelope(answer, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("path", [
    "/v1/models/", "/v1beta/models/", "/v1/models/gemini-2.5-flash:generateContent/",
])
async def test_a_trailing_slash_is_not_found_never_a_redirect(path: str) -> None:
    async with running(build()) as client:
        answer = await client.request(
            "POST" if path.endswith("Content/") else "GET", path, json=GENERATE
        )
    assert "location" not in answer.headers
    assert_envelope(answer, 404, "NOT_FOUND")


async def test_upstream_down_is_503_unavailable() -> None:
    app = build({"GEMINI_SCALE_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}"})
    async with running(app) as client:
        response = await client.post("/v1/models/gemini-2.5-flash:generateContent", json=GENERATE)
    assert_envelope(response, 503, "UNAVAILABLE")
    assert int(response.headers["retry-after"]) >= 1


async def test_health_readiness_and_metrics() -> None:
    async with running(build()) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


async def test_readyz_is_503_when_the_store_is_down() -> None:
    app = build({"GEMINI_SCALE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    async with running(app) as client:
        response = await client.get("/readyz")
    assert_envelope(response, 503, "UNAVAILABLE")


async def test_dev_tokens_are_at_jwt_signed_by_the_published_keys() -> None:
    async with running(build({"GEMINI_SCALE_OAUTH_AUDIENCE": "my-api"})) as client:
        token = await dev_token(client, "gemini.generate")
        keys = (await client.get("/dev/jwks.json")).json()
        discovery = (await client.get("/dev/.well-known/openid-configuration")).json()
        refused = await client.post("/dev/token", json={"expires_in": 10**9})
    decoded = jwt.decode(token, KeySet.import_key_set(keys), algorithms=["ES256"])
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.claims["aud"] == "my-api"
    assert decoded.claims["scope"] == "gemini.generate"
    assert decoded.claims["iss"] == discovery["issuer"]
    assert 0 < decoded.claims["exp"] - decoded.claims["iat"] <= 3600
    assert discovery["jwks_uri"].endswith("/dev/jwks.json")
    assert_envelope(refused, 400, "INVALID_ARGUMENT")


async def test_the_dev_issuer_reads_no_more_than_a_token_request() -> None:
    """Anyone may call it, before any authentication: a big body is refused, not read."""
    big = json.dumps({"sub": "x" * 20_000}).encode()

    async def dribble() -> AsyncIterator[bytes]:  # chunked: no Content-Length
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async with running(build(), scope=None) as client:
        declared = await client.post("/dev/token", content=big)
        chunked = await client.post("/dev/token", content=dribble())
        small = await client.post("/dev/token", content=b'{"scope": "gemini.read"}')
    assert_envelope(declared, 413, "INVALID_ARGUMENT")
    assert_envelope(chunked, 413, "INVALID_ARGUMENT")
    assert small.status_code == 200


def test_the_body_deadline_is_outside_every_layer_that_reads_a_body() -> None:
    from gemini_scale import BodyTimeoutMiddleware, MetricsMiddleware, VersionMiddleware

    outermost = [m.cls for m in build().user_middleware][:3]  # outermost first
    assert outermost == [MetricsMiddleware, BodyTimeoutMiddleware, VersionMiddleware]


async def test_a_405_on_the_model_routes_allows_get() -> None:
    async with running(build()) as client:
        for path in ("/v1beta/models", "/v1beta/models/gemini-2.5-flash"):
            refused = await client.put(path, json={})
            assert refused.status_code == 405
            assert "GET" in refused.headers["allow"]


async def test_the_dev_issuer_is_off_unless_asked() -> None:
    app = build(
        {
            "GEMINI_SCALE_DEV_ISSUER": "0",
            "GEMINI_SCALE_OAUTH_ISSUER": "https://idp.example",
            "GEMINI_SCALE_OAUTH_AUDIENCE": "gemini-gateway",
        }
    )
    async with running(app, scope=None) as client:
        response = await client.post("/dev/token", json={})
    assert response.status_code == 401  # no such public route: callers must authenticate


async def test_the_dev_issuer_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    async with running(build()):
        pass
    assert any(r.levelname == "WARNING" and "demos only" in r.getMessage() for r in caplog.records)
