"""The official google-genai SDK gets identical results from a miss and a hit, streamed and
not, through CacheMiddleware in front of the offline Gemini stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import types

from example_app.standin import create_standin
from gemini_scale import StreamingASGITransport
from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from tests.cache.support import FakeAuth

RULES = {
    "GET /{version}/models": CachePolicy(ttl=60, scope="shared"),
    "/{version}/models/{name}": CachePolicy(
        ttl=60, methods=frozenset({"GET", "POST"}), streams=True
    ),
}
DETERMINISTIC = types.GenerateContentConfig(temperature=0)


def content(response: types.GenerateContentResponse) -> dict[str, Any]:
    """What the SDK parsed, without the HTTP headers (``Cache-Status`` and ``Age`` differ)."""
    return response.model_dump(exclude={"sdk_http_response"})


@pytest.fixture(params=["v1", "v1beta"])
async def sdk(request: pytest.FixtureRequest) -> AsyncIterator[tuple[genai.Client, list[Any]]]:
    received: list[Any] = []
    app = FakeAuth(CacheMiddleware(create_standin(received=received), rules=RULES))
    async with httpx.AsyncClient(transport=StreamingASGITransport(app),
                                 base_url="http://gateway") as client:
        yield genai.Client(
            api_key="unused",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                api_version=request.param,
                headers={"x-test-sub": "alice"},
                httpx_async_client=client,
            ),
        ), received


async def test_generate_content_miss_and_hit(sdk: tuple[genai.Client, list[Any]]) -> None:
    client, received = sdk
    answers = [
        await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents="Hello", config=DETERMINISTIC)
        for _ in range(2)
    ]
    assert answers[0].text
    assert content(answers[0]) == content(answers[1])
    assert answers[1].sdk_http_response is not None
    assert answers[1].sdk_http_response.headers is not None
    assert answers[1].sdk_http_response.headers["cache-status"] == "gemini-scale; hit"
    assert len(received) == 1


async def test_generate_content_stream_miss_and_hit(sdk: tuple[genai.Client, list[Any]]) -> None:
    client, received = sdk
    runs = []
    for _ in range(2):
        stream = await client.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="Tell me a story", config=DETERMINISTIC)
        runs.append([content(chunk) async for chunk in stream])
    assert len(runs[0]) >= 2
    assert runs[0] == runs[1]
    assert len(received) == 1


async def test_count_tokens_embeddings_and_models(sdk: tuple[genai.Client, list[Any]]) -> None:
    client, received = sdk
    for _ in range(2):
        counted = await client.aio.models.count_tokens(model="gemini-2.5-flash", contents="Hm?")
        embedded = await client.aio.models.embed_content(
            model="gemini-embedding-001", contents=["one", "two"])
        listed = [model.name async for model in await client.aio.models.list()]
        assert counted.total_tokens
        assert embedded.embeddings is not None
        assert len(embedded.embeddings) == 2
        assert "models/gemini-2.5-flash" in listed
    assert len(received) == 3  # each answered once upstream, then from cache
