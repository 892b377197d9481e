"""Gemini token accounting: request estimates and usage read from streaming answers.

Answers come from the offline stand-in (served through ``StreamingASGITransport``, so the
chunks are the stand-in's own) and from bytes in the captured Gemini format
(research/gemini-api.md §1.3-§1.4). Every stream is fed split at every byte offset, in
both framings (CRLF, LF) and through both reading paths (events copied and parsed whole,
and events scanned incrementally, forced with a small ``max_buffer``).
"""

from __future__ import annotations

import json
import math
import random
import time
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import httpx
import pytest

import gemini_scale.ratelimit.usage as usage_module
from example_app.standin import create_standin, estimate_tokens
from gemini_scale.ratelimit.usage import (
    COUNTS,
    IN_PIECES,
    MEDIA_PART_TOKENS,
    AnswerUsage,
    UsageObserver,
    body_usage,
    estimate_request_tokens,
    usage_split,
    usage_tokens,
    whole_answer_usage,
)
from gemini_scale.upstream import StreamingASGITransport
from tests.sse import sse_events

MODEL_PATH = "/v1beta/models/gemini-2.5-flash"
PROMPT = {
    "contents": [{"role": "user", "parts": [{"text": "Tell me about rivers and mountains"}]}],
    "generationConfig": {"candidateCount": 2},
}
SSE = "text/event-stream"
JSON_TYPE = "application/json; charset=UTF-8"
#: Forces every stand-in event (about 430 bytes) through the incremental scanner, while
#: its usageMetadata member (about 130 bytes) still fits.
SMALL_BUFFER = 256
BUFFERS = [pytest.param(1 << 20, id="copied"), pytest.param(SMALL_BUFFER, id="scanned")]

# research/gemini-api.md §1.3 (simonw/llm-gemini#97): a thinking model, CRLF framing.
CAPTURE_THINKING = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Here you go!\\n\\n1.  **English:** '
    b'Hi\\n2.  **Spanish:** Hola\\n3.  **French:** Bonjour\\n4.  **German:** Hallo\\n5.  "}],'
    b'"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 5,'
    b'"candidatesTokenCount": 39,"totalTokenCount": 230,"promptTokensDetails": [{"modality": '
    b'"TEXT","tokenCount": 5}],"thoughtsTokenCount": 186},"modelVersion": '
    b'"models/gemini-2.5-flash-preview-05-20","responseId": "AdVRaMmDCYekqtsPrb_-iAw"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": "**Italian:** Ciao"}],"role": '
    b'"model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 5,'
    b'"candidatesTokenCount": 44,"totalTokenCount": 235,"promptTokensDetails": [{"modality": '
    b'"TEXT","tokenCount": 5}],"thoughtsTokenCount": 186},"modelVersion": '
    b'"models/gemini-2.5-flash-preview-05-20","responseId": "AdVRaMmDCYekqtsPrb_-iAw"}\r\n\r\n'
)
# research/gemini-api.md §1.4 (byte-exact live capture): the last frame has no parts.
CAPTURE_LIVE = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Four."}],"role": "model"},'
    b'"index": 0}],"usageMetadata": {"promptTokenCount": 51,"candidatesTokenCount": 2,'
    b'"totalTokenCount": 53},"modelVersion": "gemini-2.5-flash","responseId": '
    b'"ag4pavQTzLrj4Q-XkKnZBA"}\r\n\r\ndata: {"candidates": [{"content": {"role": "model"},'
    b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 51,'
    b'"candidatesTokenCount": 2,"totalTokenCount": 53},"modelVersion": "gemini-2.5-flash",'
    b'"responseId": "ag4pavQTzLrj4Q-XkKnZBA"}\r\n\r\n'
)
ERROR_EVENT = (
    b'data: {"error": {"code": 500, "message": "An internal error has occurred.", '
    b'"status": "INTERNAL"}}\r\n\r\n'
)


# -- helpers ------------------------------------------------------------------------------


async def standin_answer(path: str, body: Mapping[str, Any]) -> tuple[int, str, list[bytes]]:
    """Status, content type and the body chunks exactly as the stand-in sent them."""
    transport = StreamingASGITransport(create_standin())
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://standin") as client,
        client.stream("POST", path, json=body) as response,
    ):
        chunks = [chunk async for chunk in response.aiter_raw()]
        return response.status_code, response.headers["content-type"], chunks


def observe(
    chunks: Sequence[bytes],
    content_type: str | None = SSE,
    *,
    finish: bool = True,
    status: int = 200,
    **options: Any,
) -> UsageObserver:
    observer = UsageObserver(**options)
    observer.start(status, content_type)
    for chunk in chunks:
        observer.feed(chunk)
    if finish:
        observer.finish()
    return observer


def to_lf(raw: bytes) -> bytes:
    """The same stream in LF framing (payloads hold no raw CR or LF)."""
    return raw.replace(b"\r\n", b"\n")


def sse_expectations(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Per event of a CRLF or LF stream: the offset where it ends and its JSON."""
    sep = b"\r\n\r\n" if b"\r\n" in raw else b"\n\n"
    ends, offset = [], 0
    for frame in raw.split(sep)[:-1]:
        offset += len(frame) + len(sep)
        assert frame.startswith(b"data: ")
        ends.append((offset, json.loads(frame[len(b"data: ") :])))
    assert offset == len(raw)
    return ends


def array_expectations(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Per element of a JSON array: the offset just after its closing brace and its JSON."""
    decoder = json.JSONDecoder()
    text = raw.decode()
    assert text.startswith("[")
    ends: list[tuple[int, dict[str, Any]]] = []
    pos = 1
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return ends
        element, pos = decoder.raw_decode(text, pos)
        ends.append((len(text[:pos].encode()), element))


def last_total(events: Sequence[Mapping[str, Any]]) -> int | None:
    totals = [e["usageMetadata"]["totalTokenCount"] for e in events if "usageMetadata" in e]
    return totals[-1] if totals else None


def splits(raw: bytes) -> Iterator[list[bytes]]:
    """The stream cut in two at every offset."""
    for cut in range(len(raw) + 1):
        yield [raw[:cut], raw[cut:]]


@pytest.fixture
async def sse_raw() -> bytes:
    status, content_type, chunks = await standin_answer(
        f"{MODEL_PATH}:streamGenerateContent?alt=sse", PROMPT
    )
    assert (status, content_type) == (200, SSE)
    assert len(chunks) >= 5
    raw = b"".join(chunks)
    assert len(sse_events(raw)) == len(chunks)  # Gemini's strict framing, one event a chunk
    return raw


@pytest.fixture
async def array_raw() -> bytes:
    status, content_type, chunks = await standin_answer(
        f"{MODEL_PATH}:streamGenerateContent", PROMPT
    )
    assert (status, content_type) == (200, JSON_TYPE)
    return b"".join(chunks)


@pytest.fixture
async def json_raw() -> bytes:
    status, content_type, chunks = await standin_answer(f"{MODEL_PATH}:generateContent", PROMPT)
    assert (status, content_type) == (200, JSON_TYPE)
    return b"".join(chunks)


# -- estimate_request_tokens --------------------------------------------------------------


def text_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def test_estimate_is_prompt_chars_over_four_plus_the_default_output() -> None:
    assert estimate_request_tokens(text_body("Tell me about rivers")) == 5 + 1024
    assert estimate_request_tokens(text_body("x" * 21)) == 6 + 1024  # ceil, per part
    assert estimate_request_tokens(text_body("abc"), default_output_tokens=10) == 1 + 10


def test_estimate_counts_every_text_part_and_the_system_instruction() -> None:
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "a" * 8}, {"text": "b" * 5}]},
            {"role": "model", "parts": [{"text": "c" * 4}]},
        ],
        "systemInstruction": {"role": "user", "parts": [{"text": "d" * 12}]},
    }
    expected = 2 + 2 + 1 + 3
    assert estimate_request_tokens(body, default_output_tokens=0) == expected
    snake = {"contents": body["contents"], "system_instruction": body["systemInstruction"]}
    assert estimate_request_tokens(snake, default_output_tokens=0) == expected


def test_estimate_accepts_a_single_content_and_a_single_part() -> None:
    body = {"contents": {"parts": {"text": "a" * 40}}}
    assert estimate_request_tokens(body, default_output_tokens=0) == 10


@pytest.mark.parametrize("key", ["inlineData", "inline_data", "fileData", "file_data"])
def test_estimate_charges_a_fixed_cost_per_media_part(key: str) -> None:
    media = {key: {"mimeType": "image/png", "data": "iVBORw0KGgo" * 1000}}
    body = {"contents": [{"parts": [{"text": "What is this?"}, media, media]}]}
    assert estimate_request_tokens(body, default_output_tokens=0) == 4 + 2 * MEDIA_PART_TOKENS


def test_estimate_charges_function_parts_and_tools_by_json_size() -> None:
    call = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
    response = {"functionResponse": {"name": "get_weather", "response": {"temp": 21.5}}}
    tools = [{"functionDeclarations": [{"name": "get_weather", "description": "x" * 400}]}]
    body = {"contents": [{"parts": [call]}, {"parts": [response]}], "tools": tools}
    expected = sum(math.ceil(len(json.dumps(value)) / 4) for value in (call, response, tools))
    estimate = estimate_request_tokens(body, default_output_tokens=0)
    assert expected <= estimate <= expected * 1.25


@pytest.mark.parametrize("config_key", ["generationConfig", "generation_config"])
@pytest.mark.parametrize("max_key", ["maxOutputTokens", "max_output_tokens"])
@pytest.mark.parametrize("count_key", ["candidateCount", "candidate_count"])
def test_estimate_output_is_max_output_tokens_times_candidates(
    config_key: str, max_key: str, count_key: str
) -> None:
    body = text_body("abcd", **{config_key: {max_key: 64, count_key: 3}})
    assert estimate_request_tokens(body) == 1 + 64 * 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (64, 64),
        (64.0, 64),  # the SDK sends integral floats ("topK": 20.0)
        (63.2, 64),
        ("64", 64),  # proto3 JSON accepts numeric strings
        (10**12, 2**31 - 1),  # clamped to int32
        (10**400, 2**31 - 1),
        (0, 1024),  # Google reads 0 as unset
        (-5, 1024),
        (True, 1024),
        (None, 1024),
        ("many", 1024),
        ("9" * 5000, 1024),
        ([64], 1024),
        ({"n": 64}, 1024),
        (math.nan, 1024),
        (math.inf, 1024),
    ],
)
def test_estimate_reads_max_output_tokens_robustly(value: Any, expected: int) -> None:
    body = text_body("", generationConfig={"maxOutputTokens": value})
    assert estimate_request_tokens(body) == expected


@pytest.mark.parametrize("count", [0, -1, "two", None, [2], 2.5])
def test_estimate_reads_candidate_count_robustly(count: Any) -> None:
    body = text_body("", generationConfig={"maxOutputTokens": 100, "candidateCount": count})
    assert estimate_request_tokens(body) == (300 if count == 2.5 else 100)


def test_estimate_default_output_is_per_candidate_and_capped() -> None:
    body = text_body("abcd", generationConfig={"candidateCount": 2})
    assert estimate_request_tokens(body, default_output_tokens=100) == 1 + 200
    big = text_body("abcd", generationConfig={"maxOutputTokens": 100_000, "candidateCount": 2})
    assert estimate_request_tokens(big, max_output_cap=65_536) == 1 + 2 * 65_536
    assert estimate_request_tokens(body, max_output_cap=10) == 1 + 20


def test_estimate_ignores_a_config_that_is_not_an_object() -> None:
    assert estimate_request_tokens(text_body("abcd", generationConfig=[1, 2])) == 1 + 1024
    assert estimate_request_tokens(text_body("abcd", generationConfig="x")) == 1 + 1024


@pytest.mark.parametrize("method", ["countTokens", "models/gemini-2.5-flash:countTokens"])
def test_count_tokens_has_no_output_allowance(method: str) -> None:
    body = text_body("a" * 40)
    assert estimate_request_tokens(body, method=method) == 10
    assert estimate_request_tokens(body) == 10 + 1024  # without the method it looks like generate


@pytest.mark.parametrize("key", ["generateContentRequest", "generate_content_request"])
def test_count_tokens_wrapper_is_counted_without_output(key: str) -> None:
    inner = text_body("a" * 40, systemInstruction={"parts": [{"text": "b" * 8}]})
    inner["generationConfig"] = {"maxOutputTokens": 500}
    body = {key: {"model": "models/gemini-2.5-flash", **inner}}
    assert estimate_request_tokens(body) == 12
    assert estimate_request_tokens(body, method="countTokens") == 12


def test_embeddings_have_no_output_allowance() -> None:
    one = {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a" * 40}]}}
    assert estimate_request_tokens(one) == 10
    assert estimate_request_tokens(one, method="embedContent") == 10
    titled = {**one, "taskType": "RETRIEVAL_DOCUMENT", "title": "b" * 8}
    assert estimate_request_tokens(titled) == 12
    batch = {"requests": [one, titled, "junk", {"content": None}]}
    assert estimate_request_tokens(batch) == 22
    assert estimate_request_tokens(batch, method="batchEmbedContents") == 22


@pytest.mark.parametrize(
    "body",
    [
        text_body("Tell me about rivers"),
        text_body("中文字符" * 10, systemInstruction={"parts": [{"text": "Be terse."}]}),
        {
            "contents": [
                {"parts": [{"text": "Describe"}, {"inlineData": {"mimeType": "image/png"}}]},
                {"role": "model", "parts": [{"text": "A cat."}]},
                {"parts": [{"fileData": {"fileUri": "files/x", "mimeType": "video/mp4"}}]},
            ]
        },
    ],
)
async def test_estimate_of_the_prompt_equals_the_standins_count(body: dict[str, Any]) -> None:
    status, _, chunks = await standin_answer(f"{MODEL_PATH}:countTokens", body)
    assert status == 200
    total = json.loads(b"".join(chunks))["totalTokens"]
    assert estimate_request_tokens(body, method="countTokens") == total
    assert estimate_request_tokens(body, default_output_tokens=7) == total + 7
    texts = [p["text"] for c in body["contents"] for p in c["parts"] if "text" in p]
    assert total >= sum(estimate_tokens(t) for t in texts)


HOSTILE_BODIES: list[Any] = [
    None,
    [],
    "contents",
    42,
    {"contents": None},
    {"contents": "hello"},
    {"contents": 5},
    {"contents": [None, 1, "x", [], {"parts": None}, {"parts": "text"}, {"parts": [1, None]}]},
    {"contents": [{"parts": [{"text": 5}, {"text": None}, {"text": ["a"]}, {"inlineData": 0}]}]},
    {"contents": [{"parts": [{1: "non-string key", None: [1.5, True]}]}]},
    {"systemInstruction": 7, "system_instruction": "x", "tools": 3},
    {"generateContentRequest": "x"},
    {"generateContentRequest": {"contents": {"parts": 1}}},
    {"requests": "x"},
    {"requests": [None, {"content": 1}, {"content": {"parts": {"text": 7}}}]},
    {"content": [1, 2]},
    {"generationConfig": {"maxOutputTokens": {"a": 1}, "candidateCount": [1]}},
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
@pytest.mark.parametrize(
    "method", [None, "generateContent", "countTokens", "embedContent", "batchEmbedContents"]
)
def test_estimate_never_raises_on_wrong_types(body: Any, method: str | None) -> None:
    tokens = estimate_request_tokens(body, method=method)
    assert isinstance(tokens, int)
    assert tokens >= 1


def test_estimate_is_at_least_one() -> None:
    assert estimate_request_tokens({}, default_output_tokens=0) == 1
    assert estimate_request_tokens(None, method="countTokens") == 1


def deep(levels: int) -> Any:
    value: Any = {"leaf": "x" * 10}
    for _ in range(levels):
        value = {"nested": [value]}
    return value


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"contents": [{"parts": [{"text": "ab"}] * 10_000}]}, id="10k-parts"),
        pytest.param({"contents": [{"parts": [{"text": "ab"}]}] * 200_000}, id="200k-contents"),
        pytest.param(
            {"contents": [{"parts": [{"functionResponse": {"response": deep(1000)}}]}]},
            id="depth-1000",
        ),
        pytest.param({"tools": [[[[list(range(100_000))] * 50]]]}, id="huge-tools"),
        pytest.param({"tools": [{str(i): i for i in range(100_000)}] * 20}, id="wide-dicts"),
        pytest.param({"requests": [{"content": {"parts": [{"text": "a"}]}}] * 300_000}, id="batch"),
    ],
)
def test_estimate_bounds_its_work_on_huge_bodies(body: dict[str, Any]) -> None:
    started = time.perf_counter()
    tokens = estimate_request_tokens(body, default_output_tokens=0)
    elapsed = time.perf_counter() - started
    assert tokens >= 1
    assert elapsed < 1.0  # bounded work: about 10 ms here; unbounded would take seconds


def test_estimate_counts_everything_within_the_bound() -> None:
    body = {"contents": [{"parts": [{"text": "abcd"}] * 10_000}]}
    assert estimate_request_tokens(body, default_output_tokens=0) == 10_000


def _plain_or_not(rng: random.Random) -> dict[str, Any]:
    """A generate body near the usual shape, with the odd member that makes it unusual."""
    texts = ["", "abc", "abcd", "héllo wörld", "x" * 97]
    contents: list[Any] = [
        {"role": "user", "parts": [{"text": rng.choice(texts)} for _ in range(rng.randint(0, 3))]}
        for _ in range(rng.randint(0, 3))
    ]
    body: dict[str, Any] = {"contents": contents}
    oddities: list[tuple[str, Any]] = [
        ("generationConfig", {"maxOutputTokens": rng.choice([1, 64, 2**40, 0, -3, 2.5, "7"])}),
        ("generationConfig", {"candidateCount": rng.choice([1, 3, 0, True, None])}),
        ("generation_config", {"max_output_tokens": 5, "candidate_count": 2}),
        ("generationConfig", rng.choice([None, [], "x", {}])),
        ("systemInstruction", {"parts": [{"text": "be brief"}]}),
        ("system_instruction", None),
        ("tools", rng.choice([[], [{"functionDeclarations": [{"name": "f"}]}]])),
        ("contents", rng.choice([{"parts": [{"text": "solo"}]}, [{"parts": {"text": "x"}}]])),
        ("contents", [{"parts": [{"inlineData": {"data": "AA=="}}, {"text": "hi"}]}]),
        ("contents", [{"parts": [{"text": 5}]}, "not a content"]),
    ]
    for key, value in rng.sample(oddities, rng.randint(0, 2)):
        body[key] = value
    return body


@pytest.mark.parametrize("seed", range(4))
def test_the_usual_request_is_priced_as_the_walker_prices_it(seed: int) -> None:
    """The shortcut for plain text generate requests gives what the general walk gives."""
    rng = random.Random(seed)
    for _ in range(500):
        body = _plain_or_not(rng)
        cap = rng.choice([None, 10, 10_000])
        for method in ("generateContent", "streamGenerateContent", "countTokens", None):
            for count in COUNTS:
                walked = usage_module._estimate(body, 1024, cap, method, count)
                expected = min(max(walked, 1), 2**53 - 1)
                assert estimate_request_tokens(
                    body, default_output_tokens=1024, max_output_cap=cap, method=method,
                    count=count,
                ) == expected, (body, cap, method, count)
    assert usage_module._plain_generate(
        {"contents": [{"parts": [{"text": "abcd"}]}]}, 8, None, "generateContent", "total"
    ) == 9  # the shortcut is taken for the usual request


@pytest.mark.parametrize("shortcut", [True, False])
def test_the_estimate_prices_only_what_the_count_settles(shortcut: bool) -> None:
    """A limiter settling on input tokens reserves the prompt alone; on output tokens, the
    output allowance alone (countTokens and embeddings have none: the floor of 1)."""
    body = text_body("x" * 400, generationConfig={"maxOutputTokens": 64, "candidateCount": 2})
    if not shortcut:
        body["tools"] = [{"functionDeclarations": []}]  # the general walk
    total = estimate_request_tokens(body, method="generateContent")
    given_input = estimate_request_tokens(body, method="generateContent", count="input")
    given_output = estimate_request_tokens(body, method="generateContent", count="output")
    assert given_output == 128
    assert given_input + given_output == total
    assert given_input >= 100  # 400 characters, and the tools when given
    for method in ("countTokens", "embedContent", "batchEmbedContents"):
        assert estimate_request_tokens(body, method=method, count="output") == 1
        assert estimate_request_tokens(body, method=method, count="input") == (
            estimate_request_tokens(body, method=method)
        )


class ExplodingMapping(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("hostile")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("hostile")

    def __len__(self) -> int:
        return 1


def test_estimate_survives_a_mapping_that_raises() -> None:
    assert estimate_request_tokens(ExplodingMapping(), default_output_tokens=99) == 99
    body = {"contents": [{"parts": [ExplodingMapping()]}]}
    assert estimate_request_tokens(body, default_output_tokens=5) == 5


# -- usage_tokens -------------------------------------------------------------------------


USAGE = {
    "promptTokenCount": 5,
    "candidatesTokenCount": 44,
    "thoughtsTokenCount": 186,
    "totalTokenCount": 235,
}


def test_usage_tokens_per_count() -> None:
    assert usage_tokens(USAGE) == 235
    assert usage_tokens(USAGE, "input") == 5
    assert usage_tokens(USAGE, "output") == 230
    tool = {**USAGE, "toolUsePromptTokenCount": 10}
    assert usage_tokens(tool, "input") == 15


def test_usage_tokens_total_falls_back_to_the_sum() -> None:
    no_total = {k: v for k, v in USAGE.items() if k != "totalTokenCount"}
    assert usage_tokens(no_total) == 5 + 44 + 186
    snake = {"prompt_token_count": 5, "candidates_token_count": 3, "thoughts_token_count": 2}
    assert usage_tokens(snake) == 10
    assert usage_tokens(snake, "output") == 5


def test_usage_tokens_of_a_blocked_prompt_and_of_nothing() -> None:
    blocked = {"promptTokenCount": 7, "totalTokenCount": 7}
    assert usage_tokens(blocked, "output") == 0
    assert usage_tokens(blocked, "input") == 7
    assert usage_tokens({}) is None
    assert usage_tokens({"promptTokensDetails": []}, "output") is None
    assert usage_tokens({"totalTokenCount": "12", "promptTokenCount": True}) is None
    assert usage_tokens({"totalTokenCount": 12.0}) == 12


# -- SSE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_buffer", BUFFERS)
@pytest.mark.parametrize("framing", ["crlf", "lf"])
def test_sse_split_at_every_offset(sse_raw: bytes, framing: str, max_buffer: int) -> None:
    raw = sse_raw if framing == "crlf" else to_lf(sse_raw)
    events = [event for _, event in sse_expectations(raw)]
    expected = last_total(events)
    assert expected is not None
    for chunks in splits(raw):
        observer = observe(chunks, max_buffer=max_buffer)
        assert (observer.tokens, observer.events) == (expected, len(events)), chunks
        assert observer.complete
        assert not observer.overflow
        assert not observer.error_seen
    assert observer.usage == events[-1]["usageMetadata"]


@pytest.mark.parametrize("max_buffer", BUFFERS)
@pytest.mark.parametrize("framing", ["crlf", "lf"])
def test_sse_random_chunkings_and_one_byte_at_a_time(
    sse_raw: bytes, framing: str, max_buffer: int
) -> None:
    raw = sse_raw if framing == "crlf" else to_lf(sse_raw)
    expected = last_total([event for _, event in sse_expectations(raw)])
    rng = random.Random(1234)
    chunkings = [[raw[i : i + 1] for i in range(len(raw))]]
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(2, 40)))
        chunkings.append([raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)])
    for chunks in chunkings:
        observer = observe(chunks, max_buffer=max_buffer)
        assert observer.tokens == expected
        assert observer.complete


@pytest.mark.parametrize("max_buffer", BUFFERS)
@pytest.mark.parametrize("framing", ["crlf", "lf"])
def test_sse_truncated_at_every_offset(sse_raw: bytes, framing: str, max_buffer: int) -> None:
    """A cut stream reports the usage of the last whole event; complete only on a boundary."""
    raw = sse_raw if framing == "crlf" else to_lf(sse_raw)
    ends = sse_expectations(raw)
    # A CR ends a line by itself, so "...}\r\n\r" already ends a CRLF event (the LF that
    # should follow is the second half of that line ending).
    slack = 1 if framing == "crlf" else 0
    for cut in range(len(raw) + 1):
        done = [event for end, event in ends if cut >= end - slack]
        observer = observe([raw[:cut]], finish=False, max_buffer=max_buffer)
        assert observer.tokens == last_total(done), cut
        assert observer.events == len(done)
        assert not observer.complete  # finish() was not called: a disconnect
        observer.finish()
        on_boundary = cut == 0 or any(end - slack <= cut <= end for end, _ in ends)
        assert observer.complete == on_boundary, cut


@pytest.mark.parametrize("max_buffer", BUFFERS)
def test_sse_disconnect_after_two_chunks_keeps_the_usage_so_far(
    sse_raw: bytes, max_buffer: int
) -> None:
    ends = sse_expectations(sse_raw)
    observer = observe([sse_raw[: ends[1][0]]], finish=False, max_buffer=max_buffer)
    assert observer.tokens == ends[1][1]["usageMetadata"]["totalTokenCount"]
    assert observer.tokens < ends[-1][1]["usageMetadata"]["totalTokenCount"]
    assert not observer.complete


@pytest.mark.parametrize("max_buffer", BUFFERS)
@pytest.mark.parametrize("framing", ["crlf", "lf"])
@pytest.mark.parametrize(
    ("count", "expected"), [("total", 235), ("input", 5), ("output", 44 + 186)]
)
def test_captured_gemini_stream_every_offset_and_count(
    framing: str, count: str, expected: int, max_buffer: int
) -> None:
    raw = CAPTURE_THINKING if framing == "crlf" else to_lf(CAPTURE_THINKING)
    for chunks in splits(raw):
        observer = observe(chunks, count=count, max_buffer=max_buffer)
        assert (observer.tokens, observer.events, observer.complete) == (expected, 2, True)


@pytest.mark.parametrize("max_buffer", BUFFERS)
def test_captured_live_stream_with_a_partless_last_frame(max_buffer: int) -> None:
    for chunks in splits(CAPTURE_LIVE):
        observer = observe(chunks, max_buffer=max_buffer)
        assert (observer.tokens, observer.events, observer.complete) == (53, 2, True)


@pytest.mark.parametrize(
    "chunks",
    [
        [b'data: {"usageMetadata": {"totalTokenCount": 9}}\r', b"\n\r\n"],
        [b'data: {"usageMetadata": {"totalTokenCount": 9}}\r\n', b"\r\n"],
        [b'data: {"usageMetadata": {"totalTokenCount": 9}}\r\n\r', b"\n"],
        [b'data: {"usageMetadata": {"totalTokenCount": 9}}\n', b"\n"],
        [b"da", b"ta", b":", b" ", b'{"usageMetadata": {"totalTokenCount": 9}}', b"\n\n"],
    ],
)
def test_sse_event_split_inside_its_terminator(chunks: list[bytes]) -> None:
    observer = observe(chunks)
    assert (observer.tokens, observer.events, observer.complete) == (9, 1, True)


def test_sse_usage_comes_from_the_last_event_that_carried_it() -> None:
    raw = (
        b'data: {"usageMetadata": {"totalTokenCount": 10}}\r\n\r\n'
        b'data: {"usageMetadata": {"totalTokenCount": 25}}\r\n\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"text": "more"}]}}]}\r\n\r\n'
    )
    observer = observe([raw])
    assert (observer.tokens, observer.events) == (25, 3)


def test_sse_without_usage_is_none_until_an_event_has_it() -> None:
    first = b'data: {"candidates": [{"content": {"parts": [{"text": "Hello"}]}}]}\r\n\r\n'
    observer = observe([first, first], finish=False)
    assert (observer.tokens, observer.usage, observer.events) == (None, None, 2)
    observer.feed(b'data: {"usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 20}}')
    assert observer.events == 2  # not dispatched yet: no blank line
    observer.feed(b"\r\n\r\n")
    observer.finish()
    assert (observer.tokens, observer.events, observer.complete) == (20, 3, True)


@pytest.mark.parametrize("max_buffer", BUFFERS)
def test_sse_error_event_mid_stream(max_buffer: int) -> None:
    raw = CAPTURE_LIVE[: CAPTURE_LIVE.index(b"\r\n\r\n") + 4] + ERROR_EVENT
    for chunks in splits(raw):
        observer = observe(chunks, max_buffer=max_buffer)
        assert observer.error_seen
        assert (observer.tokens, observer.events, observer.complete) == (53, 2, True)
    assert not observe([CAPTURE_LIVE], max_buffer=max_buffer).error_seen


def test_sse_framing_details() -> None:
    raw = (
        b": a comment\r\n"
        b"event: message\r\nid: 7\r\nretry: 10\r\n"
        b'data: {"usageMetadata":\r\n'
        b'data: {"totalTokenCount": 7}}\r\n\r\n'
        b'data:{"usageMetadata": {"totalTokenCount": 8}}\n\n'  # no space after the colon
        b"data\n\n"  # a field without a colon: an empty data value
        b"\r\n\r\n\n\n"  # blank lines without data dispatch nothing
    )
    for max_buffer in (1 << 20, 32):
        for chunks in splits(raw):
            observer = observe(chunks, max_buffer=max_buffer)
            assert (observer.tokens, observer.events, observer.complete) == (8, 3, True)


@pytest.mark.parametrize("max_buffer", BUFFERS)
def test_sse_ignores_usage_and_errors_nested_in_model_output(max_buffer: int) -> None:
    """Only the response's own members count, whatever the model writes (B21)."""
    fake = {"usageMetadata": {"totalTokenCount": 1}, "error": {"code": 1}}
    event = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": 'q " b \\ } ] { [ , : "usageMetadata": {} \r\n\r\ndata: é 中 \\'},
                        {"functionCall": {"name": "f", "args": fake}},
                        {"text": '\\"\\\\"'},
                    ],
                    "role": "model",
                },
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 11, "totalTokenCount": 18},
        "modelVersion": "gemini-2.5-flash",
        "zzz": [fake, {"usageMetadata": {"totalTokenCount": 2}}],
    }
    payload = json.dumps(event, separators=(",", ": "), ensure_ascii=False).encode()
    raw = b"data: " + payload + b"\r\n\r\n"
    assert len(raw) > max_buffer or max_buffer > 1000
    for chunks in splits(raw):
        observer = observe(chunks, max_buffer=max_buffer)
        assert (observer.tokens, observer.error_seen, observer.complete) == (18, False, True)


@pytest.mark.parametrize("max_buffer", [1 << 20, 24])
def test_sse_top_level_arrays_and_garbage_carry_no_usage(max_buffer: int) -> None:
    raw = (
        b'data: [{"usageMetadata": {"totalTokenCount": 3}}]\r\n\r\n'
        b"data: not json\r\n\r\n"
        b'data: {"usageMetadata": {"totalTokenCount": 4}\r\n\r\n'  # never closes
        b'data: {"usageMetadata": {"totalTokenCount": 5}} trailing\r\n\r\n'
    )
    observer = observe([raw], max_buffer=max_buffer)
    assert observer.events == 4
    if max_buffer == 24:
        assert observer.tokens == 5  # the scanner reads the object and ignores what follows
    else:
        assert observer.tokens is None  # json.loads rejects the whole event


@pytest.mark.parametrize("kind", ["sse", "json"])
def test_nesting_too_deep_for_json_loads_is_scanned(kind: str) -> None:
    args = "[" * 5000 + "]" * 5000  # model-written function args, legal JSON
    payload = (
        '{"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {"a": '
        + args
        + '}}}]}}], "usageMetadata": {"totalTokenCount": 12}}'
    ).encode()
    with pytest.raises(RecursionError):
        json.loads(payload)
    raw = b"data: " + payload + b"\r\n\r\n" if kind == "sse" else payload
    assert len(raw) < 16 * 1024  # small enough to be copied, too deep to be parsed
    observer = observe([raw, raw] if kind == "sse" else [raw], SSE if kind == "sse" else None)
    expected_events = 2 if kind == "sse" else 1
    assert (observer.tokens, observer.events, observer.complete) == (12, expected_events, True)
    assert not observer.overflow


def test_sse_overflow_of_a_usage_member_is_flagged_and_skipped() -> None:
    details = [{"modality": "TEXT", "tokenCount": 1}] * 20
    big = {"usageMetadata": {"totalTokenCount": 40, "promptTokensDetails": details}}
    small = {"usageMetadata": {"totalTokenCount": 50}}
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in (big, small))
    observer = observe([raw], finish=False, max_buffer=64)
    assert observer.overflow
    assert (observer.tokens, observer.events) == (50, 2)
    only_big = observe([raw[: raw.index(b"\r\n\r\n") + 4]], max_buffer=64)
    assert (only_big.tokens, only_big.overflow, only_big.complete) == (None, True, True)


def test_big_events_are_scanned_with_bounded_memory() -> None:
    image = "iVBORw0KGgo" * 400_000  # 4.4 MB of base64
    event = {
        "candidates": [{"content": {"parts": [{"inlineData": {"data": image}}]}, "index": 0}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1290},
    }
    raw = b"data: " + json.dumps(event).encode() + b"\r\n\r\n"
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    observer = UsageObserver()
    observer.start(200, SSE)
    tracemalloc.start()
    try:
        for chunk in chunks:
            observer.feed(chunk)
        observer.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (observer.tokens, observer.complete, observer.overflow) == (1295, True, False)
    assert peak < 128 * 1024


def test_feeding_is_linear_in_the_body_size() -> None:
    """8 MiB in 512-byte chunks: each chunk is looked at once (a rescan would take minutes)."""
    text = "x" * (8 << 20)
    raw = b'data: {"candidates": [{"content": {"parts": [{"text": "' + text.encode() + b'"}]}}],'
    raw += b'"usageMetadata": {"totalTokenCount": 3}}\r\n\r\n'
    chunks = [raw[i : i + 512] for i in range(0, len(raw), 512)]
    started = time.perf_counter()
    observer = observe(chunks)
    assert time.perf_counter() - started < 2.0  # about 50 ms
    assert observer.tokens == 3


def test_each_event_is_parsed_once(sse_raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    events = len(sse_expectations(sse_raw))
    calls: list[int] = []
    real_loads = usage_module._loads

    def counting_loads(raw: Any) -> Any:
        calls.append(len(raw))
        return real_loads(raw)

    monkeypatch.setattr(usage_module, "_loads", counting_loads)  # what the observer calls
    for max_buffer in (1 << 20, SMALL_BUFFER):
        calls.clear()
        observer = observe([sse_raw[i : i + 1] for i in range(len(sse_raw))], max_buffer=max_buffer)
        assert observer.events == events
        assert len(calls) == events


# -- JSON and JSON-array bodies -----------------------------------------------------------


@pytest.mark.parametrize("max_buffer", BUFFERS)
@pytest.mark.parametrize("kind", ["auto", "json", "sse"])
def test_json_body_split_at_every_offset(json_raw: bytes, kind: str, max_buffer: int) -> None:
    expected = json.loads(json_raw)["usageMetadata"]
    for chunks in splits(json_raw):
        observer = observe(chunks, JSON_TYPE, kind=kind, max_buffer=max_buffer)
        assert (observer.tokens, observer.events, observer.complete) == (
            expected["totalTokenCount"],
            1,
            True,
        )
        assert observer.usage == expected


def test_json_usage_is_read_when_the_body_completes(json_raw: bytes) -> None:
    observer = observe([json_raw], JSON_TYPE, finish=False)
    assert observer.tokens is None
    observer.finish()
    assert observer.tokens == json.loads(json_raw)["usageMetadata"]["totalTokenCount"]


@pytest.mark.parametrize("max_buffer", BUFFERS)
def test_truncated_json_body_has_no_usage(json_raw: bytes, max_buffer: int) -> None:
    for cut in range(0, len(json_raw), 7):
        observer = observe([json_raw[:cut]], JSON_TYPE, max_buffer=max_buffer)
        assert (observer.tokens, observer.complete) == (None, cut == 0), cut


@pytest.mark.parametrize("count", ["total", "input", "output"])
def test_json_count_variants(count: Literal["total", "input", "output"]) -> None:
    body = json.dumps({"candidates": [], "usageMetadata": USAGE}, indent=2).encode()
    assert observe([body], JSON_TYPE, count=count).tokens == usage_tokens(USAGE, count)


def test_json_without_usage_is_none() -> None:
    body = json.dumps({"embedding": {"values": [0.1] * 3072}}).encode()
    observer = observe([body], JSON_TYPE)
    assert (observer.tokens, observer.complete, observer.error_seen) == (None, True, False)
    big = json.dumps({"embeddings": [{"values": [0.25] * 3072}] * 40}).encode()
    assert len(big) > 64 * 1024  # scanned, not copied
    observer = observe([big[i : i + 8192] for i in range(0, len(big), 8192)], JSON_TYPE)
    assert (observer.tokens, observer.complete, observer.overflow) == (None, True, False)


async def test_json_error_answer_is_seen() -> None:
    status, content_type, chunks = await standin_answer(
        "/v1beta/models/no-such-model:streamGenerateContent?alt=sse", PROMPT
    )
    assert status == 404
    for kind in ("auto", "sse", "json"):
        observer = observe(chunks, content_type, status=status, kind=kind)
        assert (observer.error_seen, observer.tokens, observer.complete) == (True, None, True)
        assert observer.status == 404


@pytest.mark.parametrize(("kind", "step"), [("auto", 1), ("json_array", 5), ("json", 5)])
def test_json_array_split_at_every_offset(array_raw: bytes, kind: str, step: int) -> None:
    """The array is always read incrementally (``max_buffer`` only bounds usage members)."""
    elements = [element for _, element in array_expectations(array_raw)]
    assert len(elements) >= 5
    for chunks in list(splits(array_raw))[::step]:
        observer = observe(chunks, JSON_TYPE, kind=kind)
        assert (observer.tokens, observer.events, observer.complete) == (
            last_total(elements),
            len(elements),
            True,
        )


def test_json_array_truncated_at_every_offset(array_raw: bytes) -> None:
    ends = array_expectations(array_raw)
    for cut in range(len(array_raw) + 1):
        done = [element for end, element in ends if cut >= end]
        observer = observe([array_raw[:cut]], JSON_TYPE)
        assert (observer.tokens, observer.events) == (last_total(done), len(done)), cut
        assert observer.complete == (cut in (0, len(array_raw))), cut


@pytest.mark.parametrize("tail", [b"xx", b'[{"usageMetadata": {"totalTokenCount": 1}}]',
                                  b"]", b",", b" \r\n\tx"])
def test_json_array_with_more_after_its_end_is_not_complete(array_raw: bytes, tail: bytes) -> None:
    """Only blank space may follow the ``]``; the usage is read as before either way."""
    elements = [element for _, element in array_expectations(array_raw)]
    expected = (last_total(elements), len(elements))
    for chunks in [*list(splits(array_raw + tail))[::3], [array_raw, b" \n", tail]]:
        observer = observe(chunks, JSON_TYPE)
        assert (observer.tokens, observer.events, observer.complete) == (*expected, False)
    for chunks in [[array_raw + b" \r\n\t"], [array_raw, b"\n", b" "]]:
        observer = observe(chunks, JSON_TYPE)
        assert (observer.tokens, observer.events, observer.complete) == (*expected, True)


def test_a_scanned_json_body_with_more_after_its_end_is_not_complete() -> None:
    big = json.dumps({"embeddings": [{"values": [0.25] * 3072}] * 40}).encode()
    assert len(big) > 64 * 1024  # scanned, not copied
    for tail, complete in [(b"x", False), (b"{}", False), (b"\r\n", True)]:
        chunks = [big[i : i + 8192] for i in range(0, len(big), 8192)]
        observer = observe([*chunks, tail], JSON_TYPE)
        assert (observer.tokens, observer.complete, observer.overflow) == (None, complete, False)


def test_json_array_error_element_and_nested_traps() -> None:
    raw = json.dumps(
        [
            {"usageMetadata": {"totalTokenCount": 4}, "x": [{"usageMetadata": {"n": 1}}]},
            {"candidates": [{"content": {"parts": [{"text": '] } , " \\'}]}}]},
            {"error": {"code": 503, "status": "UNAVAILABLE"}},
        ],
        indent=2,
    ).encode()
    for chunks in splits(raw):
        observer = observe(chunks, JSON_TYPE)
        assert (observer.tokens, observer.events, observer.error_seen) == (4, 3, True)
        assert observer.complete


# -- content types and calling conventions ------------------------------------------------


def test_content_type_decides_sse_or_nothing() -> None:
    event = b'data: {"usageMetadata": {"totalTokenCount": 6}}\r\n\r\n'
    assert observe([event], "text/event-stream; charset=utf-8").tokens == 6
    assert observe([event], None).tokens == 6  # unknown type: SSE is the other format
    for content_type in ("application/json", "text/plain"):
        observer = observe([event], content_type)
        assert (observer.tokens, observer.complete) == (None, True)
    assert observe([event], "application/json", kind="sse").tokens == 6
    assert observe([event], SSE, kind="json").tokens is None


def test_without_start_the_body_decides() -> None:
    observer = UsageObserver()
    observer.feed(b'\r\n  {"usageMetadata": {"totalTokenCount": 2}}')
    observer.finish()
    assert (observer.tokens, observer.status) == (2, None)


def test_feed_accepts_buffers_and_ignores_empty_and_late_chunks() -> None:
    observer = UsageObserver()
    observer.start(200, SSE)
    observer.feed(b"")
    observer.feed(bytearray(b'data: {"usageMetadata": '))
    observer.feed(memoryview(b'{"totalTokenCount": 3}}\r\n\r\n'))
    observer.finish()
    observer.finish()
    observer.feed(b'data: {"usageMetadata": {"totalTokenCount": 99}}\r\n\r\n')
    assert (observer.tokens, observer.events, observer.complete) == (3, 1, True)


def test_empty_body_is_complete_and_has_no_usage() -> None:
    observer = observe([], SSE)
    assert (observer.tokens, observer.events, observer.complete) == (None, 0, True)
    assert not UsageObserver().complete


@pytest.mark.parametrize("options", [{"kind": "xml"}, {"count": "all"}, {"max_buffer": 0}], ids=str)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"kind|count|max_buffer"):
        UsageObserver(**options)


@pytest.mark.parametrize("content_type", [SSE, JSON_TYPE, None])
def test_random_bytes_never_raise(content_type: str | None) -> None:
    rng = random.Random(99)
    alphabet = b'{}[]",:\\ \r\ndata: usageMetadataerror0123456789'
    for _ in range(300):
        size = rng.randint(0, 400)
        raw = bytes(rng.choice(alphabet) for _ in range(size))
        if rng.random() < 0.5:
            raw = rng.choice([b"data: ", b"{", b"["]) + raw
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, 5)))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        for max_buffer in (1 << 20, 8):
            observer = observe(chunks, content_type, max_buffer=max_buffer)
            assert observer.tokens is None or observer.tokens >= 0
            assert not observer.overflow or max_buffer == 8


def test_an_internal_error_stops_observing_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A subclass, not a patched class: a method patched on a mypyc-compiled class is not
    # what its compiled methods call.
    class Broken(UsageObserver):
        def _feed(self, chunk: bytes) -> None:
            raise RuntimeError("bug")

    observer = Broken()
    observer.feed(b"data: {}\r\n\r\n")
    observer.feed(b"data: {}\r\n\r\n")
    assert observer.overflow
    assert observer.tokens is None
    assert "usage observer failed" in caplog.text


# -- the quick readings: usage_split and body_usage ---------------------------------------

_COUNT_VALUES: tuple[Any, ...] = (None, 0, 7, -3, 2.5, float("nan"), "12", True, 10**30)
_COUNT_NAMES = (
    ("promptTokenCount", "prompt_token_count"),
    ("toolUsePromptTokenCount", "tool_use_prompt_token_count"),
    ("candidatesTokenCount", "candidates_token_count"),
    ("thoughtsTokenCount", "thoughts_token_count"),
    ("totalTokenCount", "total_token_count"),
)


def test_usage_split_is_usage_tokens_for_input_and_output() -> None:
    """Every shape of usageMetadata (both spellings, odd values, missing counts): the quick
    path gives exactly what the general one gives."""
    rng = random.Random(7)
    for _ in range(5000):
        usage: dict[str, Any] = {}
        for camel, snake in _COUNT_NAMES:
            for name in (camel, snake):
                if rng.random() < 0.4:
                    usage[name] = rng.choice(_COUNT_VALUES)
        expected = (usage_tokens(usage, "input"), usage_tokens(usage, "output"))
        assert usage_split(usage) == expected, usage


_ANSWER_BODIES = [
    b'{"candidates": [], "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 9}}',
    b'{"usage_metadata": {"prompt_token_count": 4, "candidates_token_count": 5}}',
    b'{"usageMetadata": {"totalTokenCount": NaN}, "x": 1}',  # json.loads only
    b'{"usageMetadata": {"promptTokenCount": 123456789012345678901234567890}}',
    b'{"usageMetadata": {}}',
    b'{"usageMetadata": {"promptTokenCount": 1}, "error": {"code": 500}}',
    b'{"error": {"code": 429}}',
    b'{"usageMetadata": ' + b"[" * 3000 + b"]" * 3000 + b"}",  # too deep for json.loads
    b'{"usageMetadata": {"totalTokenCount": 5}',  # cut short
    b'data: {"usageMetadata": {"totalTokenCount": 6}}\r\n\r\n',
    b'[{"usageMetadata": {"totalTokenCount": 8}}]',
    b"",
    b'{"text": "' + b"x" * 40000 + b'", "usageMetadata": {"totalTokenCount": 11}}',
    # The last "usageMetadata" is not the answer's own: a key with an escaped quote, a
    # member nested in the candidates after it, text in a string.
    b'{"usageMetadata": {"totalTokenCount": 5}, "x\\"usageMetadata": {"totalTokenCount": 9}}',
    b'{"usageMetadata": {"totalTokenCount": 5}, "x\\\\\\"usageMetadata": {"totalTokenCount": 9}}',
    b'{"usageMetadata": {"totalTokenCount": 5}, "candidates": [{"args": {"usageMetadata": '
    b'{"totalTokenCount": 9}}}]}',
    b'{"usageMetadata": {"totalTokenCount": 5}, "text": "\\"usageMetadata"}',
    b'{"usageMetadata": {"totalTokenCount": 5}, "modelVersion": "m", "responseId": "r"}',
    b'{"usage_metadata": {"totalTokenCount": 9}, "usageMetadata": null}',
]


@pytest.mark.parametrize("body", _ANSWER_BODIES)
def test_body_usage_reads_what_the_observer_reads(body: bytes) -> None:
    observer = UsageObserver()
    observer.start(200, "application/json")
    observer.feed(body)
    observer.finish()
    assert body_usage(body, "application/json") == observer.usage


@pytest.mark.parametrize("body", _ANSWER_BODIES)
def test_a_whole_answer_is_read_as_the_observer_reads_it_or_left_to_it(body: bytes) -> None:
    """``whole_answer_usage`` (the metrics layer's reading when no limiter reads) finds the
    usage the observer finds, or says the body needs the observer."""
    observer = UsageObserver()
    observer.start(200, "application/json")
    observer.feed_last(body)
    found = whole_answer_usage(body)
    if found is IN_PIECES:  # not a JSON object, cut short, too deep...: the observer's
        assert body != _ANSWER_BODIES[0]  # never the usual answer
        return
    usage = found if type(found) is dict and usage_tokens(found) is not None else None
    assert usage == observer.usage


@pytest.mark.parametrize("padding", [0, 40_000])
def test_a_null_usage_metadata_is_read_as_none_whatever_the_answers_size(padding: int) -> None:
    """``usageMetadata`` present wins over ``usage_metadata``, null or not: the same reading
    for a small answer (parsed) and a big one (scanned)."""
    body = (b'{"text": "' + b"x" * padding + b'", "usage_metadata": {"totalTokenCount": 9}, '
            b'"usageMetadata": null}')
    observer = UsageObserver()
    observer.start(200, "application/json")
    observer.feed_last(body)
    answer = AnswerUsage()
    answer.start(200, [(b"content-type", b"application/json")])
    answer.feed(body, False)
    assert (observer.usage, answer.tokens) == (None, None)
    assert whole_answer_usage(body) in (None, IN_PIECES)  # (a big one: the observer's)


def test_a_sum_of_counts_is_capped_as_each_count_is() -> None:
    """Settlement amounts must stay exact in a Lua number (2**53 - 1), sums included."""
    cap = 2**53 - 1
    usage = {"promptTokenCount": 3.5, "candidatesTokenCount": cap, "thoughtsTokenCount": cap}
    assert usage_tokens(usage, "total") == cap
    assert usage_tokens(usage, "output") == cap
    huge = {"promptTokenCount": cap - 1, "toolUsePromptTokenCount": cap - 1,
            "candidatesTokenCount": 1, "thoughtsTokenCount": 0}
    assert usage_split(huge) == (cap, 1) == (usage_tokens(huge, "input"),
                                              usage_tokens(huge, "output"))


def test_an_unknown_count_is_refused_when_the_reader_is_made() -> None:
    with pytest.raises(ValueError, match="unknown count"):
        AnswerUsage("outputs")  # type: ignore[arg-type]


def test_body_usage_takes_a_content_type_outside_latin_1() -> None:
    body = b'data: {"usageMetadata": {"totalTokenCount": 7}}\r\n\r\n'
    assert body_usage(body, "text/event-stream; name=\u2603") == {"totalTokenCount": 7}


def test_feed_last_is_feed_then_finish() -> None:
    body = b'{"usageMetadata": {"promptTokenCount": 2, "totalTokenCount": 5}}'
    for chunks in ([body], [body[:10], body[10:]], [b"", body]):
        one, two = UsageObserver(), UsageObserver()
        for observer in (one, two):
            observer.start(200, "application/json")
        for chunk in chunks[:-1]:
            one.feed(chunk)
            two.feed(chunk)
        one.feed_last(chunks[-1])
        two.feed(chunks[-1])
        two.finish()
        assert (one.usage, one.tokens, one.complete, one.events) == (
            two.usage, two.tokens, two.complete, two.events
        )


def _reference_usage(body: bytes) -> Any:
    """What a whole parse finds: the document's own usageMetadata when it has counts."""
    usage = json.loads(body).get("usageMetadata")
    return usage if isinstance(usage, dict) and usage_tokens(usage) is not None else None


def _decoy() -> dict[str, Any]:
    return {"usageMetadata": {"totalTokenCount": 999, "promptTokenCount": 998}}


@pytest.mark.parametrize("size", [0, 200, 40_000, 300_000])
def test_only_the_documents_own_usage_member_counts(size: int) -> None:
    """The quick reading takes the last ``"usageMetadata"`` only when it is the document's
    own: decoys nested in a function call's arguments, in text, after the real member or
    instead of it are never read."""
    rng = random.Random(size)
    text = "x" * size
    real = {"promptTokenCount": 4, "candidatesTokenCount": 5, "totalTokenCount": 9}
    shapes: list[dict[str, Any]] = [
        {"candidates": [{"content": {"parts": [{"text": text}]}}], "usageMetadata": real},
        {"candidates": [{"content": {"parts": [{"functionCall": {"args": _decoy()}}]}}],
         "usageMetadata": real, "modelVersion": "m"},
        {"candidates": [{"content": {"parts": [{"functionCall": {"args": _decoy()}}]}}]},
        {"usageMetadata": real, "candidates": [{"content": {"parts": [
            {"text": text}, {"functionCall": {"args": _decoy()}}]}}]},
        {"candidates": [{"content": {"parts": [
            {"text": '"usageMetadata": {"totalTokenCount": 7}}'}]}}], "usageMetadata": real},
        {"candidates": [], "note": "usageMetadata", "usageMetadata": real,
         "x": {"y": [1, {"z": 2}]}},
        {"candidates": [{"content": {"parts": [{"text": text}]}}], "usageMetadata": real,
         "extra": _decoy()},
        {"usageMetadata": real, "error": {"code": 500, "usageMetadata": {"totalTokenCount": 1}}},
    ]
    for shape in shapes:
        for indent in (None, 1):
            body = json.dumps(shape, indent=indent).encode()
            expected = _reference_usage(body)
            assert body_usage(body) == expected, body[-300:]
            observer = UsageObserver()
            observer.start(200, "application/json")
            observer.feed_last(body)
            assert observer.usage == expected
            assert observer.error_seen == ("error" in shape)
            split = rng.randrange(1, len(body))
            stepped = observe([body[:split], body[split:]])
            assert stepped.usage == expected
