"""A miss is recorded in one step (the held start and its whole body): what it stores is
exactly what the general recording would have stored, its own answer carries the right
``ETag`` and ``Cache-Status``, and anything unusual (a body in pieces, longer than declared,
an error, a cookie, an app that fails after answering) is never served from the entry.
Keys made from a remembered route and caller are the documented ones."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import pytest

from gemini_scale.caching import CacheMiddleware, StoredResponse
from gemini_scale.caching.keys import (
    ALL_TAG,
    KEY_SCHEMA,
    BodyDigests,
    entry_key,
    frame,
    owner_tag,
    text,
)
from gemini_scale.caching.semantics import etag_of
from gemini_scale.policies import CachePolicy
from gemini_scale.principal import Principal
from gemini_scale.types import Receive, Scope, Send
from tests.cache.support import ISSUER, FakeAuth, Recorded, call, who

Headers = list[tuple[bytes, bytes]]
BODY = b'{"candidates": [{"content": {"parts": [{"text": "hi"}]}}]}'
JSON = (b"content-type", b"application/json")
POLICY = CachePolicy(ttl=60, methods=frozenset({"POST"}), vary=("x-v",))


class Answer:
    """An ASGI app answering every request with ``headers`` and the body in ``parts``
    (``status``; ``fail``: raise once the answer was sent), counting its calls."""

    def __init__(
        self, headers: Headers, parts: Sequence[bytes] = (BODY,), *, status: int = 200,
        fail: bool = False,
    ) -> None:
        self.headers, self.parts, self.status, self.fail = headers, parts, status, fail
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": self.status,
                    "headers": list(self.headers)})
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(self.parts) - 1})
        if self.fail:
            raise RuntimeError("the app failed after answering")


def length(body: bytes = BODY) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())


def stack(app: Answer, **options: Any) -> tuple[FakeAuth, CacheMiddleware]:
    middleware = CacheMiddleware(app, rules={"/answer": POLICY}, expose_key=True, **options)
    return FakeAuth(middleware), middleware


async def ask(app: FakeAuth, *, v: str = "1", **headers: str) -> Recorded:
    return await call(app, "POST", "/answer", json_body={"q": 1},
                      headers={**who("alice"), "x-v": v, **headers})


def key_of(answer: Recorded) -> str:
    found = re.search(r'key="([0-9a-f]{32})"', answer.headers["cache-status"])
    assert found is not None
    return found.group(1)


def label(answer: Recorded) -> str:
    return re.sub(r'; key="[0-9a-f]+"', "", answer.headers["cache-status"])


@pytest.mark.parametrize(
    ("headers", "parts"),
    [
        ([JSON, length()], [BODY]),  # the common answer: one body message
        ([JSON, length()], [BODY[:10], BODY[10:20], BODY[20:]]),  # held, in pieces
        ([JSON, (b"etag", b'"app-tag"'), length()], [BODY]),  # the content's tag wins
        ([JSON, (b"connection", b"x-hop"), (b"x-hop", b"1"), (b"x-kept", b"2"), length()],
         [BODY]),  # Connection names a field: dropped with it
        ([JSON, (b"cache-control", b"max-age=30"), length()], [BODY]),  # private replaces it
        ([JSON, length(b"")], [b""]),  # an empty answer
    ],
)
async def test_a_miss_stores_what_the_general_recording_stores(
    headers: Headers, parts: list[bytes]
) -> None:
    app = Answer(headers, parts)
    client, middleware = stack(app)
    body = b"".join(parts)
    miss = await ask(client)
    assert (miss.status, miss.body, label(miss)) == (200, body, "gemini-scale; fwd=miss; stored")
    assert miss.headers["etag"] == etag_of(body).decode()
    assert miss.headers["cache-control"] == "private"
    found = await middleware.engine.get(key_of(miss))
    assert found is not None
    # What the general path builds from the same answer (the app's fields, made private).
    sent = [h for h in headers if h[0] != b"cache-control"] + [(b"cache-control", b"private")]
    expected = StoredResponse.build(
        sent, body, created=found.created, ttl=min(found.expires - found.created, 60)
    )
    assert found == expected
    assert found.hit_headers == (*expected.headers, (b"cache-status", b"gemini-scale; hit"))
    assert found.held_bytes == expected.held_bytes
    hit = await ask(client)
    assert (hit.status, hit.body, label(hit)) == (200, body, "gemini-scale; hit")
    assert hit.headers["etag"] == miss.headers["etag"]
    assert hit.headers["content-length"] == str(len(body))
    assert app.calls == 1
    unrelated = {k for k in miss.headers if k in ("connection", "x-hop")}
    assert not unrelated & set(hit.headers)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (Answer([JSON, (b"set-cookie", b"s=1"), length()]), 200),
        (Answer([JSON, length()], status=201), 201),
        (Answer([JSON, (b"cache-control", b"no-store"), length()]), 200),
        (Answer([JSON, (b"vary", b"*"), length()]), 200),
    ],
)
async def test_answers_that_must_not_be_stored_never_are(answer: Answer, status: int) -> None:
    client, middleware = stack(answer)
    for _ in range(2):
        sent = await ask(client)
        assert (sent.status, sent.body, label(sent)) == (status, BODY, "gemini-scale; fwd=miss")
        assert "etag" not in sent.headers
    assert answer.calls == 2
    assert middleware.engine.stats.stored == 0


async def test_a_body_longer_than_the_cap_is_passed_on_and_not_stored() -> None:
    """The declared length is within the cap, the body is not: it goes on whole, untagged."""
    app = Answer([JSON, (b"content-length", b"4")], [BODY])
    client, middleware = stack(app, max_entry_bytes=16)
    for _ in range(2):
        sent = await ask(client)
        assert (sent.body, label(sent)) == (BODY, "gemini-scale; fwd=miss")
        assert "etag" not in sent.headers
    assert middleware.engine.stats.stored == 0


async def test_an_answer_whose_app_then_fails_is_not_stored() -> None:
    app = Answer([JSON, length()], fail=True)
    client, middleware = stack(app)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            await ask(client)
    assert app.calls == 2  # the flight was released: the second request went upstream
    assert middleware.engine.stats.stored == 0


async def test_a_miss_matching_if_none_match_is_304_and_still_stored() -> None:
    app = Answer([JSON, length()])
    client, _ = stack(app)
    tag = etag_of(BODY).decode()
    first = await ask(client, **{"if-none-match": f'W/"other", {tag}'})
    assert (first.status, first.body, label(first)) == (304, b"", "gemini-scale; fwd=miss; stored")
    assert first.headers["etag"] == tag
    hit = await ask(client)
    assert (hit.status, hit.body, label(hit)) == (200, BODY, "gemini-scale; hit")
    assert app.calls == 1


async def test_keys_made_from_a_remembered_route_and_caller_are_the_documented_ones() -> None:
    """The first request describes its route and caller; the next ones (new ``Vary`` or
    ``Host`` values) reuse that: both give the key the documented construction gives."""
    client, _ = stack(Answer([JSON, length()]))
    principal = Principal(issuer=ISSUER, subject="alice")
    owner = owner_tag("principal", principal)
    assert owner is not None
    tags = [ALL_TAG, owner]
    base = hashlib.sha256(frame(
        [KEY_SCHEMA, text(owner), b"POST", b"", text("/answer"), *map(text, tags)]
    )).digest()
    digest = BodyDigests().facts(b'{"q": 1}')
    assert digest is not None
    vary = sorted(["accept-encoding", "origin", "referer", "x-origin", "x-v"])
    for v in ("1", "2", " 3\t"):
        values = [b"+" + v.strip(" \t").encode() if name == "x-v" else b"-" for name in vary]
        for host in (None, "Api.Example:8443"):
            authority = b"" if host is None else host.lower().encode()
            material = base + frame([digest[0], authority, *values]) + b"\x00" + b"0,0"
            extra = {} if host is None else {"host": host}
            assert key_of(await ask(client, v=v, **extra)) == entry_key(material)
    # Pinned: keys survive restarts and upgrades (no salted hash(), no reordering).
    assert key_of(await ask(client, v="1")) == "23749c5a8ded6f3bea33d294706e2cb1"
