"""The cache's fast paths serve only right answers: remembered signatures, contexts and body
digests (two bodies apart only in a large integer, spellings, principals equal or not), the
body read by the cache (in pieces, cut short, too long), entries held as objects by a
``MemoryStore`` (its byte bound, LRU, and engines with and without a distributed lock on
one store), and generations seen through remembered contexts."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from typing import Any

import pytest

from gemini_scale.caching import CacheEngine, CacheMiddleware, StoredResponse, principal_tag
from gemini_scale.errors import StoreError
from gemini_scale.policies import CachePolicy
from gemini_scale.principal import Principal
from gemini_scale.stores import MemoryStore
from gemini_scale.types import Message, Receive, Scope, Send
from tests.cache.support import (
    COUNT,
    GENERATE,
    ISSUER,
    MODEL_GET,
    FakeAuth,
    Upstream,
    cached,
    gemini_app,
    generate_body,
    http_scope,
    status_of,
    who,
)
from tests.clock import FakeClock

JSON = {"content-type": "application/json"}
POST_ONLY = frozenset({"POST"})


async def post(stack: Any, raw: bytes, sub: str = "alice", path: str = COUNT) -> tuple[str, int]:
    """``(Cache-Status, the upstream call that made the answer)``."""
    answer = await stack.client.post(path, content=raw, headers={**who(sub), **JSON})
    assert answer.status_code == 200
    return status_of(answer), answer.json()["n"]


@pytest.mark.parametrize(
    ("one", "two"),
    [
        (b'{"contents": [], "n": 12345678901234567890}',
         b'{"contents": [], "n": 12345678901234567891}'),
        (b'{"contents": [], "n": 9007199254740993}', b'{"contents": [], "n": 9007199254740992}'),
        (b'{"contents": [], "n": -18446744073709551617}',
         b'{"contents": [], "n": -18446744073709551616}'),
        (b'{"contents": [], "n": 1}', b'{"contents": [], "n": 1.5}'),
    ],
)
async def test_bodies_apart_only_in_a_number_never_share_an_entry(one: bytes, two: bytes) -> None:
    async with cached() as stack:
        assert await post(stack, one) == ("gemini-scale; fwd=miss; stored", 1)
        assert await post(stack, one) == ("gemini-scale; hit", 1)  # remembered raw body
        assert await post(stack, two) == ("gemini-scale; fwd=miss; stored", 2)
        assert await post(stack, two) == ("gemini-scale; hit", 2)
        assert await post(stack, one) == ("gemini-scale; hit", 1)
        assert [json.loads(c["body"]) for c in stack.upstream.calls] == [
            json.loads(one), json.loads(two)]


async def test_spellings_share_one_entry_whichever_comes_first() -> None:
    camel = json.dumps(generate_body("hi", maxOutputTokens=20)).encode()
    snake = (b'{"generation_config": {"max_output_tokens": 20.0, "temperature": 0.0},'
             b' "contents": [{"parts": [{"text": "hi"}], "role": "user"}]}')
    async with cached() as stack:
        for raw in (snake, camel, snake, camel):
            assert (await post(stack, raw, path=GENERATE))[1] == 1
        assert len(stack.upstream.calls) == 1
        # The remembered determinism belongs to the bytes: a hot body stays uncached.
        hot = json.dumps(generate_body("hi", temperature=0.5)).encode()
        for _ in range(2):
            assert (await post(stack, hot, path=GENERATE))[0] == "gemini-scale; fwd=bypass"
        assert (await post(stack, hot))[0].startswith("gemini-scale; fwd=miss")  # countTokens


async def test_principals_never_share_an_entry_through_remembered_signatures() -> None:
    raw = b'{"contents": [{"parts": [{"text": "same"}]}]}'
    subs = ("alice", "bob", "carol")
    async with cached() as stack:
        made = {sub: await post(stack, raw, sub) for sub in subs}
        assert [n for _, n in made.values()] == [1, 2, 3]
        for _ in range(3):
            for sub in subs:
                assert await post(stack, raw, sub) == ("gemini-scale; hit", made[sub][1])
        assert [c["principal"] for c in stack.upstream.calls] == list(subs)


async def test_equal_principals_as_other_objects_share_their_entry() -> None:
    """The memos know principals by identity; keys by value (a token verified again)."""
    upstream = Upstream()
    cache = CacheMiddleware(gemini_app(upstream), rules={
        "GET /v1beta/models/{model}": CachePolicy(ttl=60)})
    statuses = []
    for subject in ("alice", "alice", "bob", "alice"):
        principal = Principal(issuer=ISSUER, subject=subject)
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        scope = http_scope("GET", MODEL_GET)
        scope["state"] = {"principal": principal}
        await cache(scope, receive, send)
        statuses.append(dict(sent[0]["headers"])[b"cache-status"])
        assert json.loads(sent[1]["body"])["principal"] == subject
    assert statuses == [b"gemini-scale; fwd=miss; stored", b"gemini-scale; hit",
                        b"gemini-scale; fwd=miss; stored", b"gemini-scale; hit"]


# -- the body the cache reads -------------------------------------------------------------


class Echo:
    """A raw ASGI app that keeps every message it received and answers 200."""

    def __init__(self) -> None:
        self.received: list[list[Message]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        self.received.append(messages)
        body = json.dumps({"n": len(self.received)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def through(
    app: Any, messages: list[Message], *, length: int, content_type: bytes = b"application/json"
) -> tuple[bytes, Any]:
    """One POST whose ``receive`` gives ``messages``: ``(Cache-Status, answer)``."""
    pending = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("POST", COUNT, headers=who("alice"))
    scope["headers"] += [(b"content-type", content_type),
                         (b"content-length", str(length).encode())]
    await FakeAuth(app)(scope, receive, send)
    return dict(sent[0]["headers"])[b"cache-status"], json.loads(sent[1]["body"])


def pieces(*chunks: bytes) -> list[Message]:
    return [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)]


def cache_on(app: Any, **options: Any) -> CacheMiddleware:
    return CacheMiddleware(app, rules={
        "POST /v1beta/models/{model}:countTokens": CachePolicy(ttl=60, methods=frozenset(
            {"POST"}))}, **options)


async def test_a_body_in_pieces_is_keyed_whole_and_reaches_the_app_as_sent() -> None:
    app = Echo()
    cache = cache_on(app)
    raw = b'{"contents": [{"parts": [{"text": "in pieces"}]}]}'
    status, answer = await through(cache, pieces(raw[:5], raw[5:20], raw[20:]), length=len(raw))
    assert (status, answer) == (b"gemini-scale; fwd=miss; stored", {"n": 1})
    assert b"".join(m["body"] for m in app.received[0]) == raw
    status, answer = await through(cache, pieces(raw), length=len(raw))
    assert (status, answer) == (b"gemini-scale; hit", {"n": 1})


@pytest.mark.parametrize(
    ("messages", "length", "content_type"),
    [
        ([*pieces(b'{"a": ', b"1}")[:1], {"type": "http.disconnect"}], 8, b"application/json"),
        (pieces(b'{"a": 1', b', "b": 2}'), 5, b"application/json"),  # longer than declared
        (pieces(b'{"a": 1}'), 8, b"text/plain"),
        (pieces(b"[1, 2, 3]"), 9, b"application/json"),
        (pieces(b'{"a": 1'), 7, b"application/json"),
    ],
)
async def test_a_body_the_cache_cannot_key_reaches_the_app_message_by_message(
    messages: list[Message], length: int, content_type: bytes
) -> None:
    app = Echo()
    cache = cache_on(app, max_body_bytes=length)
    for n in (1, 2):
        status, answer = await through(cache, list(messages), length=length,
                                       content_type=content_type)
        assert (status, answer) == (b"gemini-scale; fwd=bypass", {"n": n})
        assert app.received[-1] == messages[: len(app.received[-1])]
        assert app.received[-1][0] == messages[0]


# -- entries held as objects ------------------------------------------------------------------


def entry(body: bytes, *, created: float = 0.0) -> StoredResponse:
    return StoredResponse.build([(b"content-type", b"application/json")], body,
                                created=created, ttl=60)


async def test_a_memory_store_holds_objects_within_its_byte_bound_and_lru() -> None:
    clock = FakeClock(1_000.0)
    store = MemoryStore(clock=clock, max_bytes=10_000)
    kept = entry(b"k" * 1000)
    store.set_object("keep", kept, ttl=60, size=kept.size)
    assert store.get_object("keep") is kept
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await store.get("keep")  # bytes readers never see an object
    for i in range(40):
        value = entry(bytes([i]) * 1000)
        store.set_object(f"flood:{i}", value, ttl=60, size=value.size)
        assert store.size <= 10_000
        assert store.get_object("keep") is kept  # recently used: kept
    assert store.get_object("flood:0") is None  # least recently used: evicted
    assert 5 <= len(store) <= 9
    clock.advance(61)
    assert store.get_object("keep") is None  # expired


_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"public"),
            (b"vary", b"Origin, X-Origin, Referer"), (b"x-goog-model", b"gemini-2.5-flash")]


async def _real_bytes_per_counted_byte(as_objects: bool, n: int = 3000) -> float:
    """Memory the store's entries really take, per byte they count against ``max_bytes``."""
    store = MemoryStore(clock=FakeClock(1_000.0), max_keys=10**7)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            value = StoredResponse.build(_HEADERS, b'{"totalTokens": %d}' % i,
                                         created=1_000.0, ttl=60)
            name = f"cache:{i:032x}"
            if as_objects:
                store.set_object(name, value, ttl=60, size=value.held_bytes)
            else:
                await store.set(name, value.encode(), ttl=60)
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - base) / store.size
    finally:
        tracemalloc.stop()


async def test_max_bytes_bounds_entries_held_as_objects_as_well_as_bytes() -> None:
    """An entry held as an object counts what its objects take, not its encoded length
    (which is a third of that for a small answer)."""
    as_bytes = await _real_bytes_per_counted_byte(False)
    as_objects = await _real_bytes_per_counted_byte(True)
    assert as_objects <= 1.1
    assert as_objects <= as_bytes


async def _serve_twice(cache: CacheMiddleware, path: str, principal: Principal) -> list[Message]:
    """A GET of ``path`` made twice (a miss, then a hit): the second answer's messages."""
    sent: list[Message] = []
    for _ in range(2):
        sent.clear()

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = http_scope("GET", path)
        scope["state"] = {"principal": principal}
        await cache(scope, receive, send)
    return list(sent)


async def test_remembered_hits_stay_within_the_stores_byte_bound() -> None:
    """What hits decode is remembered within an eighth of ``max_bytes``: entries the store
    evicted (or that were invalidated) are not kept alive beside it."""
    pad = b"x" * 50_000

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        body = b'{"pad": "%s", "path": "%s"}' % (pad, scope["path"].encode())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    store = MemoryStore(max_bytes=300_000)
    cache = CacheMiddleware(app, engine=CacheEngine(store), max_entry_bytes=100_000,
                            rules={"GET /v1beta/models/{model}": CachePolicy(ttl=600)})
    alice = Principal(issuer=ISSUER, subject="alice")
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(60):
            path = f"/v1beta/models/m{n}"
            hit = await _serve_twice(cache, path, alice)
            assert dict(hit[0]["headers"])[b"cache-status"] == b"gemini-scale; hit"
            assert json.loads(hit[1]["body"])["path"] == path
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store.size <= 300_000
    assert held < 1_000_000  # 60 entries of 50 kB kept twice would be 6 MB


async def test_an_entry_too_big_to_remember_leaves_the_remembered_ones() -> None:
    now = 1_000.0
    clock = FakeClock(now)
    store = MemoryStore(max_bytes=1_000_000, clock=clock)  # remembers 125,000 bytes of decodes
    engine = CacheEngine(store, clock=clock)
    small = StoredResponse.build([(b"a", b"b")], b"x" * 100, created=now, ttl=60)
    big = StoredResponse.build([(b"a", b"b")], b"x" * 70_000, created=now, ttl=60)
    await engine.put("small", small)
    await engine.put("big", big)
    first = await engine.get("small")
    assert await engine.get("big") == big  # decoded, not remembered (twice its size is over)
    assert await engine.get("small") is first  # still remembered


async def test_an_answer_with_a_nul_in_a_field_is_not_stored() -> None:
    """A NUL byte would split the stored field block into other fields on a hit (RFC 9110
    §5.5 forbids it): such an answer goes to its client and is not kept."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"x-note", b"a\x00set-cookie\x00session=evil")]})
        await send({"type": "http.response.body", "body": b"{}"})

    cache = CacheMiddleware(app, rules={"GET /v1beta/models/{model}": CachePolicy(ttl=60)})
    second = await _serve_twice(cache, MODEL_GET, Principal(issuer=ISSUER, subject="alice"))
    headers = second[0]["headers"]
    assert (b"x-note", b"a\x00set-cookie\x00session=evil") in headers
    assert b"set-cookie" not in dict(headers)
    assert dict(headers)[b"cache-status"].startswith(b"gemini-scale; fwd=miss")
    with pytest.raises(ValueError, match="NUL"):
        StoredResponse.build([(b"x-note", b"a\x00b")], b"{}", created=0.0, ttl=60).encode()


async def test_a_filling_cache_leaves_the_garbage_collector_nothing_to_walk() -> None:
    """Entries, and the memos that find them, are plain tuples of bytes, numbers and
    strings, which the collector stops tracking: a memory cache that keeps storing new
    answers (every miss a new signature) adds nothing for full collections to walk."""
    answer = b'{"totalTokens": 3}'

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})

    cache = CacheMiddleware(app, rules={
        "POST /v1beta/models/{model}:countTokens": CachePolicy(ttl=60, methods=POST_ONLY)})
    principal = Principal(issuer=ISSUER, subject="alice")
    statuses: list[bytes] = []

    async def miss(n: int) -> None:
        body = b'{"contents": [], "n": %d}' % n

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(dict(message["headers"])[b"cache-status"])

        scope = http_scope("POST", COUNT, body=body)
        scope["state"] = {"principal": principal}
        await cache(scope, receive, send)

    def collect() -> None:
        for _ in range(3):  # a tuple is let go once the tuples in it are
            gc.collect()

    for n in range(100):  # plans, contexts, owner records
        await miss(n)
    collect()
    before = len(gc.get_objects())
    for n in range(100, 2100):
        await miss(n)
    collect()
    assert len(gc.get_objects()) - before < 100  # two tracked tuples a miss before
    assert statuses == [b"gemini-scale; fwd=miss; stored"] * 2100


async def test_engines_with_and_without_a_distributed_lock_share_a_memory_store() -> None:
    clock = FakeClock(1_000.0)
    store = MemoryStore(clock=clock)
    local = CacheEngine(store, clock=clock)
    locking = CacheEngine(store, clock=clock, distributed_lock=True)
    assert local.objects is store
    assert locking.objects is None
    key = await local.key_for(b"material", ["*"])
    stored = entry(b'{"ok": 1}', created=clock.time())
    assert await local.put(key, stored)
    held = local.held(local.entry_name(key))
    assert held == stored
    assert local.held(local.entry_name(key)) is held  # decoded once, then remembered
    assert await locking.get(key) == stored
    flight, found = await locking.join(key)  # its lock script finds the entry (as bytes)
    assert flight is None
    assert found == stored
    other = await locking.key_for(b"other", ["*"])
    flight, found = await locking.join(other)
    assert flight is not None
    assert found is None
    written = entry(b'{"ok": 2}', created=clock.time())
    assert await locking.put(other, written, flight)
    await locking.land(flight, written)
    assert await local.get(other) == written  # written as bytes, read by the other


# -- generations through remembered contexts ------------------------------------------------


async def test_another_process_invalidation_reaches_remembered_contexts() -> None:
    clock = FakeClock(1_000.0)
    store = MemoryStore(clock=clock)
    engines = [CacheEngine(store, clock=clock, tag_refresh=1.0) for _ in range(2)]
    async with cached(engine=engines[0]) as one, cached(engine=engines[1]) as two:
        assert (await post(one, b'{"a": 1}'))[0] == "gemini-scale; fwd=miss; stored"
        assert (await post(one, b'{"a": 1}'))[0] == "gemini-scale; hit"
        assert (await post(one, b'{"a": 2}'))[0] == "gemini-scale; fwd=miss; stored"
        alice = Principal(issuer=ISSUER, subject="alice")
        await two.engine.invalidate(tags=[principal_tag(alice)])
        assert (await post(one, b'{"a": 1}'))[0] == "gemini-scale; hit"  # within tag_refresh
        clock.advance(1.5)
        assert (await post(one, b'{"a": 1}'))[0] == "gemini-scale; fwd=miss; stored"
        assert (await post(one, b'{"a": 2}'))[0] == "gemini-scale; fwd=miss; stored"
        assert (await post(one, b'{"a": 2}'))[0] == "gemini-scale; hit"
        assert (await post(two, b'{"a": 2}'))[0] == "gemini-scale; hit"  # the same entry


class _SlowGenerationReads(MemoryStore):
    """Reads a tag generation at once and answers a little later (a network round trip):
    an invalidation can land in between."""

    slow = False

    async def get(self, key: str) -> bytes | None:
        value = self.get_now(key)
        if self.slow and ":gen:" in key:
            await asyncio.sleep(0.05)
        return value


async def test_an_invalidation_during_a_generation_read_is_not_undone() -> None:
    """A generation read that started before ``invalidate()`` and ends after it must not put
    the old generation back: the entry from before is never served again."""
    clock = FakeClock(1_000.0)
    store = _SlowGenerationReads(clock=clock)
    engine = CacheEngine(store, clock=clock, tag_refresh=1.0)
    async with cached(engine=engine) as stack:
        alice = who("alice")
        first = await stack.client.get(MODEL_GET, headers=alice)
        assert status_of(first).endswith("stored")
        clock.advance(2)  # the remembered generations are due for a refresh
        store.slow = True
        racing = asyncio.create_task(stack.client.get(MODEL_GET, headers=alice))
        await asyncio.sleep(0.01)  # it is reading a generation now
        await engine.invalidate(tags=[CacheEngine.ALL])
        raced = await racing
        store.slow = False
        after = await stack.client.get(MODEL_GET, headers=alice)
    assert raced.json()["n"] != first.json()["n"]
    assert after.json()["n"] != first.json()["n"]
