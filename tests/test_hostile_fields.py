"""Header numbers of any length and header pairs in either ASGI form, in every build.

A client or an upstream may send ``Cache-Control: max-age=`` or ``Content-Length`` with
hundreds or thousands of digits (``int()`` refuses past 4,300 digits; compiled code cannot
make a float of an integer past a float's range), and an ASGI app may send its header pairs
as 2-item lists. None of it may cost a 500 or a dropped answer.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gemini_scale import (
    CacheMiddleware,
    MemoryStore,
    Principal,
    RateLimitMiddleware,
    RateLimitPolicy,
)
from gemini_scale.header_values import bounded_decimal
from gemini_scale.policies import CachePolicy
from gemini_scale.types import Receive, Scope, Send

LONG = b"9" * 400  # past a float's range
VERY_LONG = b"9" * 5000  # past int()'s 4,300 digits
PATH = "/v1beta/models/m:streamGenerateContent"
GENERATE = "/v1beta/models/m:generateContent"
POST = frozenset({"POST"})
RULES = {
    "/v1beta/models/{model}:streamGenerateContent": CachePolicy(ttl=60, methods=POST),
    "/v1beta/models/{model}:generateContent": CachePolicy(ttl=60, methods=POST),
}
BODY = b'{"contents": [{"parts": [{"text": "hi"}]}]}'
ANSWER = b'{"candidates": [], "usageMetadata": {"totalTokenCount": 5}}'
STREAM = (b'data: {"candidates": [{"finishReason": "STOP"}], '
          b'"usageMetadata": {"totalTokenCount": 5}}\r\n\r\n')


@pytest.mark.parametrize(
    ("value", "ceiling", "expected"),
    [
        (b"0", 10, 0),
        (b"007", 10, 7),
        (b"11", 10, 10),
        (LONG, 2**31, 2**31),
        (VERY_LONG, 2**63, 2**63),
        (b"0" * 5000 + b"5", 10, 5),
        (b"9" * 18, 2**63, 10**18 - 1),  # the longest field read at once
        (b"9" * 19, 2**31, 2**31),
        (b"0" * 17 + b"1", 10, 1),
        (b"1" + b"0" * 18, 10**18, 10**18),  # 19 digits, equal to the ceiling
        (b"", 10, None),
        (b"-1", 10, None),
        (b"1.5", 10, None),
        (b" 1", 10, None),
        ("12", 100, 12),
        ("\N{SUPERSCRIPT TWO}", 100, None),  # str.isdigit() says yes; not a decimal field
    ],
)
def test_bounded_decimal(value: bytes | str, ceiling: int, expected: int | None) -> None:
    assert bounded_decimal(value, ceiling) == expected


class App:
    """A raw ASGI app with a scripted start message; counts its calls."""

    def __init__(self, headers: list[Any], chunks: list[bytes]) -> None:
        self.headers, self.chunks, self.calls = headers, chunks, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        for i, chunk in enumerate(self.chunks):
            more = i < len(self.chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})


def _principal(app: Any) -> Any:
    alice = Principal(issuer="https://idp.example/", subject="alice")

    async def with_principal(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["principal"] = alice
        await app(scope, receive, send)

    return with_principal


async def _post(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=_principal(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(
            path, content=BODY, headers={"content-type": "application/json", **(headers or {})}
        )


def _cache(app: App) -> CacheMiddleware:
    return CacheMiddleware(app, store=MemoryStore(), rules=RULES, streams=True, generation="all")


@pytest.mark.parametrize("digits", [LONG, VERY_LONG], ids=["400 digits", "5000 digits"])
async def test_a_request_max_age_of_any_length_is_served(digits: bytes) -> None:
    app = App([(b"content-type", b"application/json")], [ANSWER])
    cache = _cache(app)
    assert (await _post(cache, GENERATE)).status_code == 200
    again = await _post(cache, GENERATE, {"cache-control": f"max-age={digits.decode()}"})
    assert again.status_code == 200
    assert again.content == ANSWER
    assert app.calls == 1  # any max-age admits the stored answer


@pytest.mark.parametrize("digits", [LONG, VERY_LONG], ids=["400 digits", "5000 digits"])
@pytest.mark.parametrize("directive", [b"max-age", b"s-maxage"])
async def test_an_answer_max_age_of_any_length_is_stored(digits: bytes, directive: bytes) -> None:
    app = App(
        [(b"content-type", b"application/json"), (b"cache-control", directive + b"=" + digits)],
        [ANSWER],
    )
    cache = _cache(app)
    for _ in range(2):
        answer = await _post(cache, GENERATE)
        assert answer.status_code == 200
        assert answer.content == ANSWER
    assert app.calls == 1


@pytest.mark.parametrize("digits", [LONG, VERY_LONG], ids=["400 digits", "5000 digits"])
async def test_an_answer_content_length_of_any_length_is_not_held(digits: bytes) -> None:
    app = App([(b"content-type", b"application/json"), (b"content-length", digits)], [ANSWER])
    answer = await _post(_cache(app), GENERATE)
    assert answer.status_code == 200
    assert answer.content == ANSWER


async def test_a_request_content_length_of_thousands_of_digits_is_not_a_500() -> None:
    app = App([(b"content-type", b"application/json")], [ANSWER])
    transport = httpx.ASGITransport(app=_principal(_cache(app)))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        request = client.build_request("POST", GENERATE, content=BODY)
        request.headers["content-type"] = "application/json"
        request.headers["content-length"] = VERY_LONG.decode()
        answer = await client.send(request)
    assert answer.status_code < 500


def _list_pairs(content_type: bytes) -> list[Any]:
    return [[b"content-type", content_type], [b"x-app", b"1"]]  # ASGI allows lists


@pytest.mark.parametrize(
    ("path", "content_type", "chunks"),
    [
        (GENERATE, b"application/json", [ANSWER]),
        (PATH, b"text/event-stream", [STREAM, b""]),
    ],
    ids=["json", "sse"],
)
async def test_header_pairs_as_lists_pass_the_cache(
    path: str, content_type: bytes, chunks: list[bytes]
) -> None:
    app = App(_list_pairs(content_type), chunks)
    cache = _cache(app)
    for _ in range(2):
        answer = await _post(cache, path)
        assert answer.status_code == 200
        assert answer.content == b"".join(chunks)
        assert answer.headers["x-app"] == "1"
    assert app.calls == 1  # stored, then served


@pytest.mark.parametrize(
    ("path", "content_type", "chunks"),
    [
        (GENERATE, b"application/json", [ANSWER]),
        (PATH, b"text/event-stream", [STREAM, b""]),
        (PATH, b"text/event-stream", [STREAM[:10], STREAM[10:], b""]),
    ],
    ids=["json", "sse", "sse-in-pieces"],
)
async def test_header_pairs_as_lists_pass_the_token_limiter(
    path: str, content_type: bytes, chunks: list[bytes]
) -> None:
    app = App(_list_pairs(content_type), chunks)
    policy = RateLimitPolicy.parse("1000000/minute", tokens="100000/minute")
    limiter = RateLimitMiddleware(app, store=MemoryStore(), default=policy)
    first = await _post(limiter, path)
    assert first.status_code == 200
    assert first.content == b"".join(chunks)
    second = await _post(limiter, path)
    # Each header counts that request's reservation (the estimate); between them, the first
    # was settled to the 5 tokens its answer reported (the token limit is the tighter one,
    # so the RateLimit header shows it).
    assert _tokens_left(second) == _tokens_left(first) - 5


def _tokens_left(response: httpx.Response) -> int:
    field = response.headers["ratelimit"]
    assert field.startswith('"tokens";r='), field
    return int(field.split(";")[1].removeprefix("r="))
