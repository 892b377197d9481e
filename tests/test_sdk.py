"""The official google-genai SDK works through the gateway on v1 and v1beta."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import types

from tests.gateway import build, dev_token, running


@pytest.fixture(params=["v1", "v1beta"])
async def sdk(request: pytest.FixtureRequest) -> AsyncIterator[genai.Client]:
    async with running(build()) as client:
        token = await dev_token(client)
        sdk_client = genai.Client(
            api_key="unused-the-gateway-holds-the-key",
            http_options=types.HttpOptions(
                base_url="http://gateway",
                api_version=request.param,
                headers={"Authorization": f"Bearer {token}"},
                httpx_async_client=client,
            ),
        )
        yield sdk_client


async def test_generate_content(sdk: genai.Client) -> None:
    response = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="Hello")
    assert response.text
    assert response.usage_metadata is not None
    assert response.usage_metadata.total_token_count


async def test_generate_content_stream(sdk: genai.Client) -> None:
    stream = await sdk.aio.models.generate_content_stream(
        model="gemini-2.5-flash", contents="Tell me a story"
    )
    texts = [chunk.text async for chunk in stream]
    assert len(texts) >= 2
    assert "".join(t or "" for t in texts)


async def test_count_tokens(sdk: genai.Client) -> None:
    response = await sdk.aio.models.count_tokens(model="gemini-2.5-flash", contents="How many?")
    assert response.total_tokens


async def test_embed_content(sdk: genai.Client) -> None:
    response = await sdk.aio.models.embed_content(
        model="gemini-embedding-001", contents=["one", "two"]
    )
    assert response.embeddings is not None
    assert len(response.embeddings) == 2
    assert response.embeddings[0].values


async def test_models_list(sdk: genai.Client) -> None:
    pager = await sdk.aio.models.list()
    names = [model.name async for model in pager]
    assert "models/gemini-2.5-flash" in names


async def test_upstream_errors_surface_as_sdk_errors(sdk: genai.Client) -> None:
    from google.genai import errors

    with pytest.raises(errors.ClientError) as caught:
        await sdk.aio.models.generate_content(model="gemini-0.1-nope", contents="x")
    assert caught.value.code == 404
