"""The offline stand-in speaks Gemini's exact wire format (research/gemini-api.md §1, §3, §6).

Driven through real HTTP (httpx over StreamingASGITransport) and through the official
``google-genai`` SDK on both ``v1`` and ``v1beta``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import httpx
import pytest
from google import genai
from google.genai import errors, types
from starlette.requests import Request
from starlette.responses import Response

from example_app.standin import (
    DEFAULT_MODELS,
    ReceivedRequest,
    create_standin,
    estimate_tokens,
)
from gemini_scale.upstream import StreamingASGITransport
from tests.sse import sse_events

SSE_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
GENERATE_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
PROMPT = {"contents": [{"parts": [{"text": "Tell me about rivers"}], "role": "user"}]}
JSON_TYPE = "application/json; charset=UTF-8"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(create_standin()), base_url="http://standin"
    ) as client:
        yield client


@pytest.fixture(params=["v1", "v1beta"])
async def sdk(request: pytest.FixtureRequest) -> AsyncIterator[genai.Client]:
    async with httpx.AsyncClient(transport=StreamingASGITransport(create_standin())) as http:
        client = genai.Client(
            api_key="test-key",
            http_options=types.HttpOptions(
                base_url="http://testserver", api_version=request.param, httpx_async_client=http
            ),
        )
        try:
            yield client
        finally:
            client.close()
            await client.aio.aclose()


# -- the official SDK, v1 and v1beta ------------------------------------------------------


async def test_sdk_generate_content(sdk: genai.Client) -> None:
    response = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="Hello")
    assert response.text
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage.prompt_token_count == estimate_tokens("Hello")
    assert usage.candidates_token_count == estimate_tokens(response.text)
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.model_version == "gemini-2.5-flash"
    assert response.response_id


async def test_sdk_stream_concatenates_to_the_same_text(sdk: genai.Client) -> None:
    whole = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="Hi there")
    stream = await sdk.aio.models.generate_content_stream(
        model="gemini-2.5-flash", contents="Hi there"
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 2
    assert "".join(chunk.text or "" for chunk in chunks) == whole.text
    assert {chunk.response_id for chunk in chunks} == {whole.response_id}
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.total_token_count == whole.usage_metadata.total_token_count


async def test_sdk_count_tokens(sdk: genai.Client) -> None:
    result = await sdk.aio.models.count_tokens(
        model="gemini-2.5-flash", contents="How many tokens?"
    )
    assert result.total_tokens == estimate_tokens("How many tokens?")


async def test_sdk_embed_content(sdk: genai.Client) -> None:
    result = await sdk.aio.models.embed_content(
        model="gemini-embedding-001",
        contents=["first", "second"],
        config=types.EmbedContentConfig(output_dimensionality=8),
    )
    assert result.embeddings is not None
    assert [len(e.values or []) for e in result.embeddings] == [8, 8]
    assert result.embeddings[0].values != result.embeddings[1].values


async def test_sdk_lists_every_model_across_pages(sdk: genai.Client) -> None:
    pager = await sdk.aio.models.list(config={"page_size": 2})
    names = [model.name async for model in pager]
    assert names == [model["name"] for model in DEFAULT_MODELS]
    model = await sdk.aio.models.get(model="gemini-2.5-pro")
    assert model.display_name == "Gemini 2.5 Pro"
    assert model.input_token_limit == 1048576


async def test_sdk_raises_not_found_for_unknown_model(sdk: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as caught:
        await sdk.aio.models.generate_content(model="gemini-pro", contents="x")
    assert caught.value.code == 404
    assert caught.value.status == "NOT_FOUND"


# -- wire format ----------------------------------------------------------------------------


async def test_same_request_gives_same_bytes(http: httpx.AsyncClient) -> None:
    first = await http.post(GENERATE_PATH, json=PROMPT)
    second = await http.post(GENERATE_PATH, json=PROMPT)
    other = await http.post(
        GENERATE_PATH, json={"contents": [{"parts": [{"text": "Something else"}]}]}
    )
    assert first.status_code == second.status_code == other.status_code == 200
    assert first.content == second.content
    text = first.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert text != other.json()["candidates"][0]["content"]["parts"][0]["text"]


async def test_generate_is_googles_pretty_json_with_googles_headers(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post(GENERATE_PATH, json=PROMPT)
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_TYPE
    assert response.headers["vary"] == "Origin, X-Origin, Referer"
    body = response.json()
    assert response.content == json.dumps(body, indent=2).encode()
    candidate = body["candidates"][0]
    assert list(candidate) == ["content", "finishReason", "index"]
    assert candidate["content"]["role"] == "model"
    assert set(body) == {"candidates", "usageMetadata", "modelVersion", "responseId"}


async def test_sse_framing_is_exactly_googles(http: httpx.AsyncClient) -> None:
    response = await http.post(SSE_PATH, params={"alt": "sse"}, json=PROMPT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["content-disposition"] == "attachment"
    assert "content-length" not in response.headers
    raw = response.content
    for banned in (b"event:", b"[DONE]", b"\n:", b"id:"):
        assert banned not in raw
    events = sse_events(raw)
    assert len(events) >= 2
    # Google's separators: ", " nowhere between members, ": " after every key.
    for frame, event in zip(raw.split(b"\r\n\r\n"), events, strict=False):
        assert frame == b"data: " + json.dumps(event, separators=(",", ": ")).encode()
    assert len({event["responseId"] for event in events}) == 1
    counts = [event["usageMetadata"]["candidatesTokenCount"] for event in events]
    assert counts == sorted(counts)
    assert all("finishReason" not in e["candidates"][0] for e in events[:-1])
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    whole = (await http.post(GENERATE_PATH, json=PROMPT)).json()
    text = "".join(
        part["text"] for e in events for part in e["candidates"][0]["content"].get("parts", [])
    )
    assert text == whole["candidates"][0]["content"]["parts"][0]["text"]
    assert events[-1]["usageMetadata"] == whole["usageMetadata"]


async def test_stream_without_alt_sse_is_one_json_array(http: httpx.AsyncClient) -> None:
    response = await http.post(SSE_PATH, json=PROMPT)
    sse = await http.post(SSE_PATH, params={"alt": "sse"}, json=PROMPT)
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_TYPE
    items = response.json()
    assert isinstance(items, list)
    assert response.content == json.dumps(items, indent=2).encode()
    assert items == sse_events(sse.content)


async def test_stream_arrives_in_several_body_chunks(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", SSE_PATH, params={"alt": "sse"}, json=PROMPT) as response:
        pieces = [piece async for piece in response.aiter_raw()]
    assert len(pieces) >= 2
    assert all(piece.endswith(b"\r\n\r\n") for piece in pieces)


async def test_unknown_model_is_googles_exact_404(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1beta/models/x:generateContent", json=PROMPT)
    assert response.status_code == 404
    assert response.headers["content-type"] == JSON_TYPE
    message = (
        "models/x is not found for API version v1beta, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their "
        "supported methods."
    )
    expected = {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}}
    assert response.content == json.dumps(expected, indent=2).encode()


async def test_unsupported_method_for_model_is_404(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/models/gemini-embedding-001:generateContent", json=PROMPT)
    assert response.status_code == 404
    assert "not supported for generateContent" in response.json()["error"]["message"]
    assert "API version v1," in response.json()["error"]["message"]


async def test_malformed_json_is_invalid_json_payload(http: httpx.AsyncClient) -> None:
    response = await http.post(
        GENERATE_PATH, content=b'{"contents": [oops]}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"].startswith("Invalid JSON payload received. ")
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"


async def test_missing_contents_is_invalid_argument(http: httpx.AsyncClient) -> None:
    response = await http.post(GENERATE_PATH, json={"generationConfig": {}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error == {
        "code": 400,
        "message": "* GenerateContentRequest.contents: contents is not specified\n",
        "status": "INVALID_ARGUMENT",
    }


async def test_snake_case_fields_and_float_ints_are_accepted(http: httpx.AsyncClient) -> None:
    response = await http.post(
        GENERATE_PATH,
        json={
            "contents": PROMPT["contents"],
            "generation_config": {"max_output_tokens": 5.0, "candidate_count": 2.0, "topK": 20.0},
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert len(body["candidates"]) == 2
    assert [c["index"] for c in body["candidates"]] == [0, 1]
    assert all(c["finishReason"] == "MAX_TOKENS" for c in body["candidates"])
    for candidate in body["candidates"]:
        text = candidate["content"]["parts"][0]["text"]
        assert estimate_tokens(text) <= 5
    assert body["usageMetadata"]["candidatesTokenCount"] <= 10


async def test_non_integral_int_field_is_rejected(http: httpx.AsyncClient) -> None:
    response = await http.post(
        GENERATE_PATH, json={**PROMPT, "generationConfig": {"maxOutputTokens": 1.5}}
    )
    assert response.status_code == 400
    assert "TYPE_INT32" in response.json()["error"]["message"]


async def test_count_tokens_accepts_both_request_forms(http: httpx.AsyncClient) -> None:
    path = "/v1beta/models/gemini-2.5-flash:countTokens"
    plain = await http.post(path, json=PROMPT)
    wrapped = await http.post(
        path,
        json={
            "generateContentRequest": {
                "model": "models/gemini-2.5-flash",
                **PROMPT,
                "systemInstruction": {"parts": [{"text": "be brief"}]},
            }
        },
    )
    assert plain.status_code == wrapped.status_code == 200
    base = estimate_tokens("Tell me about rivers")
    assert plain.json()["totalTokens"] == base
    assert wrapped.json()["totalTokens"] == base + estimate_tokens("be brief")


async def test_embeddings_are_deterministic_unit_vectors(http: httpx.AsyncClient) -> None:
    single = await http.post(
        "/v1/models/gemini-embedding-001:embedContent",
        json={"content": {"parts": [{"text": "embed me"}]}},
    )
    batch = await http.post(
        "/v1/models/gemini-embedding-001:batchEmbedContents",
        json={
            "requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": t}]}}
                for t in ("embed me", "other")
            ]
        },
    )
    assert single.status_code == batch.status_code == 200
    values = single.json()["embedding"]["values"]
    assert len(values) == 3072
    assert math.isclose(math.fsum(v * v for v in values), 1.0, rel_tol=1e-5)
    embeddings = batch.json()["embeddings"]
    assert embeddings[0]["values"] == values
    assert embeddings[1]["values"] != values


async def test_models_paging_and_get(http: httpx.AsyncClient) -> None:
    first = await http.get("/v1/models", params={"pageSize": 3})
    assert first.status_code == 200
    page = first.json()
    assert len(page["models"]) == 3
    second = await http.get(
        "/v1/models", params={"pageSize": 3, "pageToken": page["nextPageToken"]}
    )
    rest = second.json()
    assert "nextPageToken" not in rest
    names = [m["name"] for m in page["models"] + rest["models"]]
    assert names == [m["name"] for m in DEFAULT_MODELS]
    bad = await http.get("/v1/models", params={"pageToken": "garbage!"})
    assert bad.status_code == 400
    got = await http.get("/v1alpha/models/gemini-embedding-001")
    assert got.json() == dict(DEFAULT_MODELS[-1])
    missing = await http.get("/v1beta/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["status"] == "NOT_FOUND"


async def test_unknown_version_and_path_are_google_404s(http: httpx.AsyncClient) -> None:
    for path in ("/v2/models", "/nothing/here", "/v1beta/models/gemini-2.5-flash:dance"):
        response = await http.request("GET" if "dance" not in path else "POST", path)
        assert response.status_code == 404
        assert response.json()["error"]["status"] == "NOT_FOUND"


# -- hooks ------------------------------------------------------------------------------------


async def test_fail_with_status_gives_googles_429() -> None:
    app = create_standin(fail_with=429)
    async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://s") as c:
        response = await c.post(GENERATE_PATH, json=PROMPT)
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["status"] == "RESOURCE_EXHAUSTED"
        types_ = [detail["@type"].rsplit(".", 1)[1] for detail in error["details"]]
        assert types_ == ["QuotaFailure", "Help", "RetryInfo"]
        quota = error["details"][0]["violations"][0]["quotaDimensions"]
        assert quota["model"] == "gemini-2.5-flash"
        app.state.fail_with = None
        assert (await c.post(GENERATE_PATH, json=PROMPT)).status_code == 200


async def test_fail_with_callable_chooses_per_request() -> None:
    def choose(request: Request) -> int | Response | None:
        if "countTokens" in request.url.path:
            return 503
        if request.method == "GET":
            return Response(b"<html>proxy error</html>", status_code=502)
        return None

    app = create_standin(fail_with=choose)
    async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://s") as c:
        assert (await c.post(GENERATE_PATH, json=PROMPT)).status_code == 200
        overloaded = await c.post("/v1/models/gemini-2.5-flash:countTokens", json=PROMPT)
        assert overloaded.status_code == 503
        assert overloaded.json()["error"]["message"] == (
            "The model is overloaded. Please try again later."
        )
        html = await c.get("/v1/models")
        assert (html.status_code, html.content) == (502, b"<html>proxy error</html>")


async def test_api_keys_are_checked_like_google() -> None:
    received: list[ReceivedRequest] = []
    app = create_standin(api_keys=["good"], received=received)
    async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://s") as c:
        missing = await c.get("/v1/models")
        wrong = await c.get("/v1/models", headers={"x-goog-api-key": "bad"})
        right = await c.get("/v1/models", headers={"x-goog-api-key": "good"})
        by_query = await c.get("/v1/models", params={"key": "good"})
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert wrong.status_code == 400
    assert wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert right.status_code == by_query.status_code == 200
    assert [r.header("x-goog-api-key") for r in received] == [None, "bad", "good", None]
