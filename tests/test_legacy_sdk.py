"""The retired ``google-generativeai`` SDK (0.8.x) works through the example gateway.

It talks REST (``transport="rest"``, synchronous ``requests``) to a real uvicorn server on
loopback, authenticated by a client API key sent as ``x-goog-api-key``. What it sends differs
from ``google-genai`` (research/gemini-api.md §5.3): always ``/v1beta``,
``$alt=json;enum-encoding=int`` on every call, a stream *without* ``alt=sse`` answered with a
JSON array, ``countTokens`` wrapping a ``generateContentRequest``, a single ``:embedContent``,
``models.list`` paged by ``pageSize``.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from example_app.standin import DEFAULT_MODELS, ReceivedRequest, create_standin, estimate_tokens
from gemini_scale import APIKeys
from tests.gateway import build
from tests.servers import LiveServer, serve

# Importing the SDK warns twice, and only then (nothing it does afterwards warns): its own
# end-of-support notice, and google-api-core's Python-version notice (first import of
# google.api_core only; the wording depends on the Python version and the date). Both are
# FutureWarnings raised during collection, where module marks do not apply.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"\s*All support for the `google.generativeai` package has ended",
        category=FutureWarning,
    )
    warnings.filterwarnings(
        "ignore",
        message=r"You are using a (non-supported )?Python version",
        category=FutureWarning,
        module=r"google\.api_core\.",
    )
    from google.api_core import exceptions as api_exceptions
    from google.generativeai import client as genai_client
    from google.generativeai import protos
    from google.generativeai.client import configure
    from google.generativeai.embedding import embed_content
    from google.generativeai.generative_models import GenerativeModel
    from google.generativeai.models import get_model, list_models
    from google.generativeai.types import (
        GenerateContentResponse,
        GenerationConfig,
        RequestOptions,
    )

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

API_KEY = "legacy-sdk-test-key-4f1c9a7e2b6d8053"
MODEL = "gemini-2.5-flash"
SYSTEM = "Answer briefly."
PROMPT = "Tell me about the weather in a few words."
#: Bounded calls, and no retries (the SDK's defaults: retry on 503 for up to 600 s).
CALL = RequestOptions(timeout=10.0)


@dataclass(frozen=True, slots=True)
class Gateway:
    server: LiveServer
    upstream: list[ReceivedRequest]
    """Every request the stand-in behind the gateway received (appended in the server's
    thread before it answers)."""

    def forwarded(self, since: int, method: str) -> ReceivedRequest:
        """The one ``:method`` call the upstream received after the first ``since``."""
        calls = [r for r in self.upstream[since:] if r.path.endswith(f":{method}")]
        assert len(calls) == 1, calls
        assert calls[0].path == f"/v1beta/models/{MODEL}:{method}"
        return calls[0]


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """The example gateway (offline stand-in upstream), accepting ``API_KEY`` with the
    scopes the Gemini routes need."""
    holder = "legacy-sdk:gemini.generate gemini.read"
    env = {"GEMINI_SCALE_CLIENT_API_KEYS": f"{APIKeys.hash_key(API_KEY)}={holder}"}
    upstream: list[ReceivedRequest] = []
    app = build(env=env, standin=create_standin(received=upstream))
    with serve(app) as server:
        yield Gateway(server, upstream)


@contextmanager
def configured(gateway: Gateway, api_key: str) -> Iterator[None]:
    """``genai.configure`` for ``gateway`` over REST; afterwards the SDK's module-global
    client configuration is restored and the clients it made are closed."""
    manager = genai_client._client_manager
    saved = (manager.client_config, manager.default_metadata, manager.clients)
    # The scheme is required: without one, the REST transport prefixes "https://".
    endpoint = gateway.server.url
    configure(api_key=api_key, transport="rest", client_options={"api_endpoint": endpoint})
    try:
        yield
    finally:
        for sdk_client in manager.clients.values():
            sdk_client.transport.close()  # its requests session and pooled connections
        manager.client_config, manager.default_metadata, manager.clients = saved


@pytest.fixture
def sdk(gateway: Gateway) -> Iterator[None]:
    with configured(gateway, API_KEY):
        yield


def model() -> GenerativeModel:
    return GenerativeModel(
        MODEL,
        system_instruction=SYSTEM,
        generation_config=GenerationConfig(max_output_tokens=256, temperature=0.1),
    )


def joined(response: GenerateContentResponse) -> str:
    """The text of a response or stream chunk (a chunk may carry no parts at all)."""
    return "".join(part.text for part in response.parts)


@pytest.mark.usefixtures("sdk")
def test_generate_content(gateway: Gateway) -> None:
    since = len(gateway.upstream)
    first = model().generate_content(PROMPT, request_options=CALL)
    forwarded = gateway.forwarded(since, "generateContent")
    second = model().generate_content(PROMPT, request_options=CALL)

    assert first.text.strip()
    assert first.text == second.text  # the stand-in is deterministic
    candidate = first.candidates[0]
    assert candidate.finish_reason == protos.Candidate.FinishReason.STOP
    usage = first.usage_metadata
    assert usage.prompt_token_count == estimate_tokens(SYSTEM) + estimate_tokens(PROMPT)
    assert usage.candidates_token_count == estimate_tokens(first.text)
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    body = json.loads(forwarded.body)
    assert body["generationConfig"] == {"maxOutputTokens": 256, "temperature": 0.1}
    assert body["systemInstruction"] == {"parts": [{"text": SYSTEM}]}
    assert forwarded.header("x-goog-api-key") is None  # the caller's key stays at the gateway


@pytest.mark.usefixtures("sdk")
def test_stream_generate_content(gateway: Gateway) -> None:
    whole = model().generate_content(PROMPT, request_options=CALL).text

    since = len(gateway.upstream)
    stream = model().generate_content(PROMPT, stream=True, request_options=CALL)
    chunks = [joined(chunk) for chunk in stream]

    # No alt=sse: the SDK reads the stream as one JSON array, chunk by chunk.
    assert "alt" not in dict(gateway.forwarded(since, "streamGenerateContent").query)

    assert len(chunks) >= 2
    assert all(chunks)
    assert "".join(chunks) == whole
    assert stream.text == whole  # the SDK's own accumulation of the chunks
    assert stream.candidates[0].finish_reason == protos.Candidate.FinishReason.STOP


@pytest.mark.usefixtures("sdk")
def test_count_tokens(gateway: Gateway) -> None:
    since = len(gateway.upstream)
    counted = model().count_tokens(PROMPT, request_options=CALL)

    body = json.loads(gateway.forwarded(since, "countTokens").body)
    assert set(body) == {"generateContentRequest"}
    # The wrapped form carries the system instruction, and the count includes it.
    assert counted.total_tokens > 0
    assert counted.total_tokens == estimate_tokens(SYSTEM) + estimate_tokens(PROMPT)
    generated = model().generate_content(PROMPT, request_options=CALL)
    assert counted.total_tokens == generated.usage_metadata.prompt_token_count


@pytest.mark.usefixtures("sdk")
def test_embed_content() -> None:
    def embed(text: str, dimensions: int | None = None) -> list[float]:
        result = embed_content(
            model="models/gemini-embedding-001",
            content=text,
            output_dimensionality=dimensions,
            request_options=CALL,
        )
        values: list[float] = result["embedding"]
        return values

    vector = embed("The quick brown fox")

    assert len(vector) == 3072
    assert all(isinstance(value, float) for value in vector)
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-4)
    assert embed("The quick brown fox") == vector
    assert embed("A lazy dog") != vector
    assert len(embed("The quick brown fox", dimensions=8)) == 8


@pytest.mark.usefixtures("sdk")
def test_list_models() -> None:
    expected = [str(entry["name"]) for entry in DEFAULT_MODELS]

    listed = list(itertools.islice(list_models(request_options=CALL), 50))
    # Two per page: the SDK follows nextPageToken through the gateway.
    paged = list(itertools.islice(list_models(page_size=2, request_options=CALL), 50))

    assert [m.name for m in listed] == expected
    assert [m.name for m in paged] == expected
    flash = next(m for m in listed if m.name == f"models/{MODEL}")
    assert "generateContent" in flash.supported_generation_methods
    assert flash.input_token_limit == 1048576


@pytest.mark.usefixtures("sdk")
def test_get_model() -> None:
    found = get_model(f"models/{MODEL}", request_options=CALL)

    assert found.name == f"models/{MODEL}"
    assert found.display_name == "Gemini 2.5 Flash"


def test_unknown_api_key_is_refused(gateway: Gateway) -> None:
    """The key above is what grants access: another one gets the gateway's 401."""
    with (
        configured(gateway, "not-a-key-the-gateway-knows"),
        pytest.raises(api_exceptions.Unauthorized, match="The API key is invalid") as caught,
    ):
        model().generate_content(PROMPT, request_options=CALL)
    assert caught.value.code == 401
