"""The example gateway's response cache, end to end: what it caches for whom, hits that
charge no tokens, invalidation through ``DELETE /admin/cache``, and the google-genai SDK
getting the same results from a miss and a hit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import types

from example_app.standin import create_standin
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send
from tests.gateway import build, dev_token, running

MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
COUNT = f"/v1beta/models/{MODEL}:countTokens"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"


@dataclass
class CountingStandin:
    """The offline stand-in, counting the upstream calls per path."""

    app: ASGIApp = field(default_factory=create_standin)
    calls: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls.append(scope["path"])
        await self.app(scope, receive, send)

    def count(self, suffix: str) -> int:
        return sum(1 for path in self.calls if path.endswith(suffix))


@asynccontextmanager
async def gateway(
    env: Mapping[str, str] | None = None, scope: str = "gemini.generate gemini.read"
) -> AsyncIterator[tuple[httpx.AsyncClient, CountingStandin]]:
    standin = CountingStandin()
    async with running(build(env, standin=standin), scope=scope) as client:
        yield client, standin


def prompt(text: str = "Hello there", **config: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        body["generationConfig"] = config
    return body


async def other_caller(client: httpx.AsyncClient) -> dict[str, str]:
    """Credentials of another principal (the dev issuer's default subject is ``dev-user``)."""
    response = await client.post(
        "/dev/token", json={"scope": "gemini.generate gemini.read", "sub": "bob"}
    )
    assert response.status_code == 200
    return {"authorization": f"Bearer {response.json()['access_token']}"}


async def test_the_model_list_is_shared_by_every_caller() -> None:
    async with gateway() as (client, standin):
        first = await client.get("/v1beta/models")
        assert first.status_code == 200
        # A relayed JSON answer is complete before its headers leave: tagged and "stored".
        assert first.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
        second = await client.get("/v1beta/models", headers=await other_caller(client))
        assert second.status_code == 200
        assert second.headers["cache-status"].startswith("gemini-scale; hit")
        assert second.content == first.content
        assert second.headers["etag"] == first.headers["etag"]
        assert "age" in second.headers
        again = await client.get("/v1beta/models", headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304
        assert again.content == b""
        assert standin.count("/models") == 1


async def test_head_on_the_model_routes_answers_alike_cold_and_cached() -> None:
    """HEAD is a GET without its body, whether the cache holds the GET's answer or not (it
    goes upstream as a GET)."""
    async with gateway() as (client, standin):
        for path in ("/v1beta/models", f"/v1beta/models/{MODEL}"):
            cold = await client.head(path)
            assert cold.status_code == 200, (path, cold.text)
            assert cold.content == b""
            assert cold.headers["cache-status"] == "gemini-scale; fwd=miss"
            filled = await client.get(path)
            assert filled.headers["cache-status"].endswith("stored")
            cached = await client.head(path)
            assert cached.status_code == 200
            assert cached.content == b""
            assert cached.headers["cache-status"].startswith("gemini-scale; hit")
            assert cached.headers["content-type"] == cold.headers["content-type"]
        assert standin.calls == [
            "/v1beta/models", "/v1beta/models", f"/v1beta/models/{MODEL}",
            f"/v1beta/models/{MODEL}",
        ]


@pytest.mark.parametrize("control", [b"no-store", b"private", b"max-age=0"])
async def test_what_the_upstream_forbids_is_not_stored(control: bytes) -> None:
    """The upstream's Cache-Control reaches the cache (and the client)."""
    standin = create_standin()

    async def forbidding(scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"cache-control", control)]
            await send(message)

        await standin(scope, receive, marked)

    async with running(build(standin=forbidding)) as client:
        first = await client.get("/v1beta/models")
        second = await client.get("/v1beta/models")
    assert first.status_code == second.status_code == 200
    assert first.headers["cache-control"] == control.decode()
    assert second.headers["cache-status"] == "gemini-scale; fwd=miss"


async def test_token_counts_are_cached_per_caller() -> None:
    async with gateway() as (client, standin):
        body = prompt("count me")
        assert "fwd=miss" in (await client.post(COUNT, json=body)).headers["cache-status"]
        hit = await client.post(COUNT, json=body)
        assert hit.headers["cache-status"].startswith("gemini-scale; hit")
        other = await client.post(COUNT, json=body, headers=await other_caller(client))
        assert "fwd=miss" in other.headers["cache-status"]  # another caller's entry
        assert standin.count(":countTokens") == 2


@pytest.mark.parametrize(
    ("mode", "config", "cached"),
    [
        ("deterministic", {"temperature": 0}, True),
        ("deterministic", {"temperature": 0.7}, False),
        ("deterministic", {}, False),  # Gemini's default temperature is not 0
        ("all", {"temperature": 0.7}, True),
        ("off", {"temperature": 0}, False),
    ],
)
async def test_generation_is_cached_as_the_setting_allows(
    mode: str, config: dict[str, Any], cached: bool
) -> None:
    async with gateway({"GEMINI_SCALE_CACHE_GENERATION": mode}) as (client, standin):
        for _ in range(2):
            response = await client.post(GENERATE, json=prompt(**config))
            assert response.status_code == 200
        assert standin.count(":generateContent") == (1 if cached else 2)
        assert response.headers["cache-status"].startswith("gemini-scale; hit") == cached


async def test_hits_charge_the_request_but_no_tokens() -> None:
    env = {"GEMINI_SCALE_TOKEN_LIMIT": "2000/minute", "GEMINI_SCALE_RATE_LIMIT": "12/minute"}
    async with gateway(env) as (client, standin):
        body = prompt(temperature=0, maxOutputTokens=1000)  # reserves about 1000 tokens
        statuses = [(await client.post(GENERATE, json=body)).status_code for _ in range(12)]
        assert statuses == [200] * 12  # 12 x 1000 tokens would not fit 2000 if hits paid
        assert standin.count(":generateContent") == 1
        refused = await client.post(GENERATE, json=body)
        assert refused.status_code == 429  # but each hit was one request of 12
        assert "requests" in refused.json()["error"]["message"]


async def test_a_stream_is_replayed_byte_for_byte() -> None:
    async with gateway() as (client, standin):
        body = prompt("Tell me a story", temperature=0)
        first = await client.post(STREAM, json=body)
        second = await client.post(STREAM, json=body)
        assert first.status_code == second.status_code == 200
        assert first.headers["content-type"].startswith("text/event-stream")
        assert second.headers["cache-status"].startswith("gemini-scale; hit")
        assert second.content == first.content
        assert first.content.count(b"data: ") >= 2
        assert standin.count(":streamGenerateContent") == 1


async def test_admin_invalidation_needs_the_admin_scope() -> None:
    async with gateway() as (client, _):
        refused = await client.delete("/admin/cache", params={"all": "true"})
        assert refused.status_code == 403
        assert "insufficient_scope" in refused.headers["www-authenticate"]


@pytest.mark.parametrize(
    "params",
    [{"tag": ""}, {"model": ""}, {"entry": "x}:lock"}, {"entry": "ABC"}, {"all": "2"}],
)
async def test_admin_invalidation_refuses_what_names_nothing(params: dict[str, str]) -> None:
    async with gateway(scope="gemini.admin") as (client, _):
        refused = await client.delete("/admin/cache", params=params)
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "JSON payload" not in message  # a query parameter is not the payload


async def test_admin_invalidates_by_model_and_everything() -> None:
    scope = "gemini.generate gemini.read gemini.admin"
    async with gateway(scope=scope) as (client, standin):
        body = prompt("count me")
        await client.post(COUNT, json=body)
        await client.get("/v1beta/models")
        dropped = await client.delete("/admin/cache", params={"model": MODEL})
        assert dropped.status_code == 200
        assert dropped.json()["invalidated"] == 1
        assert "fwd=miss" in (await client.post(COUNT, json=body)).headers["cache-status"]
        # The model list carries no model tag: still a hit, until everything goes.
        assert (await client.get("/v1beta/models")).headers["cache-status"].startswith(
            "gemini-scale; hit"
        )
        assert (await client.delete("/admin/cache", params={"all": "true"})).status_code == 200
        assert "fwd=miss" in (await client.get("/v1beta/models")).headers["cache-status"]
        assert standin.count(":countTokens") == 2
        nothing = await client.delete("/admin/cache")
        assert nothing.status_code == 400
        assert nothing.json()["error"]["status"] == "INVALID_ARGUMENT"


async def test_admin_invalidates_a_retired_models_entries_by_its_old_name() -> None:
    # The gateway serves a retired name by its successor, so its entries carry the
    # successor's tag: naming either drops them.
    scope = "gemini.generate gemini.read gemini.admin"
    retired = "/v1beta/models/gemini-1.5-flash:countTokens"
    async with gateway(scope=scope) as (client, standin):
        body = prompt("count me")
        await client.post(retired, json=body)
        assert (await client.post(retired, json=body)).headers["cache-status"].startswith(
            "gemini-scale; hit"
        )
        dropped = await client.delete("/admin/cache", params={"model": "gemini-1.5-flash"})
        assert dropped.json()["tags"] == ["model:gemini-2.5-flash"]
        assert "fwd=miss" in (await client.post(retired, json=body)).headers["cache-status"]
        assert standin.count(":countTokens") == 2


async def test_a_zero_ttl_turns_the_cache_off() -> None:
    scope = "gemini.generate gemini.read gemini.admin"
    async with gateway({"GEMINI_SCALE_CACHE_TTL": "0"}, scope=scope) as (client, standin):
        for _ in range(2):
            response = await client.get("/v1beta/models")
            assert "cache-status" not in response.headers
        assert standin.count("/models") == 2
        assert (await client.delete("/admin/cache", params={"all": "true"})).status_code == 400


SDK = tuple[genai.Client, CountingStandin]


@pytest.fixture(params=["v1", "v1beta"])
async def sdk(request: pytest.FixtureRequest) -> AsyncIterator[SDK]:
    async with gateway() as (client, standin):
        token = await dev_token(client)
        yield genai.Client(
            api_key="unused-the-gateway-holds-the-key",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                api_version=request.param,
                headers={"Authorization": f"Bearer {token}"},
                httpx_async_client=client,
            ),
        ), standin


async def test_the_sdk_gets_the_same_answer_from_a_miss_and_a_hit(
    sdk: SDK,
) -> None:
    client, standin = sdk
    config = types.GenerateContentConfig(temperature=0)
    miss = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    hit = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    assert hit.model_dump(exclude={"sdk_http_response"}) == miss.model_dump(
        exclude={"sdk_http_response"}
    )
    assert standin.count(":generateContent") == 1


async def test_the_sdk_gets_the_same_stream_from_a_miss_and_a_hit(
    sdk: SDK,
) -> None:
    client, standin = sdk
    config = types.GenerateContentConfig(temperature=0)
    chunks = []
    for _ in range(2):
        stream = await client.aio.models.generate_content_stream(
            model=MODEL, contents="Tell me a story", config=config
        )
        chunks.append([c.model_dump(exclude={"sdk_http_response"}) async for c in stream])
    assert len(chunks[0]) >= 2
    assert chunks[1] == chunks[0]
    assert standin.count(":streamGenerateContent") == 1
