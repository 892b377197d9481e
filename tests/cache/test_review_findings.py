"""Request directives, framing, entity tags and central rules at their edges: cases an
adversarial review found (max-age on a shared store's lock path, only-if-cached beside other
directives, ``Content-Length: 0`` beside ``Transfer-Encoding``, an answer shorter than its
length, the app's own tag, unsafe methods in a policy, a revalidated upstream call's tokens,
rules in front of an app without a route table)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gemini_scale import MemoryStore, RateLimitMiddleware, RateLimitPolicy
from gemini_scale.caching import CacheEngine, CacheMiddleware
from gemini_scale.errors import ConfigurationError
from gemini_scale.policies import CachePolicy
from gemini_scale.types import Message, Receive, Scope, Send
from tests.cache.conftest import Backend
from tests.cache.support import (
    COUNT,
    GENERATE,
    RULES,
    FakeAuth,
    Recorded,
    Upstream,
    call,
    gemini_app,
    generate_body,
    http_scope,
    who,
)
from tests.clock import FakeClock

_POST: Any = frozenset({"POST"})


async def test_max_age_refuses_an_older_entry_on_the_miss_path_too(backend: Backend) -> None:
    # On a shared store the miss takes the single-flight lock, whose script returns the
    # entry it finds: that entry must meet the request's max-age as well.
    upstream = Upstream()
    engine = CacheEngine(backend.store(), clock=backend.clock)
    app = FakeAuth(CacheMiddleware(gemini_app(upstream), engine=engine, rules=RULES))
    body = generate_body("hello")
    first = await call(app, "POST", GENERATE, headers=who("alice"), json_body=body)
    backend.clock.advance(30)
    young = {**who("alice"), "cache-control": "max-age=10"}
    second = await call(app, "POST", GENERATE, headers=young, json_body=body)
    assert first.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
    assert second.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
    assert "age" not in second.headers
    assert len(upstream.calls) == 2
    third = await call(app, "POST", GENERATE, headers=young, json_body=body)
    assert third.headers["cache-status"] == "gemini-scale; hit"  # the new entry is young
    assert third.body == second.body


@pytest.mark.parametrize("control", [
    "only-if-cached", "no-cache, only-if-cached", "max-age=0, only-if-cached",
    "no-store, only-if-cached",
])
async def test_only_if_cached_never_goes_upstream(backend: Backend, control: str) -> None:
    upstream = Upstream()
    engine = CacheEngine(backend.store(), clock=backend.clock)
    app = FakeAuth(CacheMiddleware(gemini_app(upstream), engine=engine, rules=RULES))
    headers = {**who("alice"), "cache-control": control}
    answer = await call(app, "POST", GENERATE, headers=headers, json_body=generate_body())
    assert answer.status == 504
    assert json.loads(answer.body)["error"]["status"] == "DEADLINE_EXCEEDED"
    # Not forwarded: no fwd parameter (RFC 9211 §2.2), the reason in detail.
    assert answer.headers["cache-status"] == "gemini-scale; detail=only-if-cached"
    assert upstream.calls == []


async def _raw_request(app: Any, sub: str, body: bytes) -> Recorded:
    """A countTokens request declaring ``Content-Length: 0`` and ``Transfer-Encoding:
    chunked`` (h11 passes both on), whose chunked body the app still receives."""
    recorded = Recorded()
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        recorded.messages.append(message)

    headers = {**who(sub), "content-type": "application/json", "content-length": "0",
               "transfer-encoding": "chunked"}
    await app(http_scope("POST", COUNT, headers=headers), receive, send)
    return recorded


async def test_an_empty_length_beside_chunked_framing_is_not_cached() -> None:
    upstream = Upstream()
    shared = {"POST /v1beta/models/{model}:countTokens": CachePolicy(
        ttl=60, methods=_POST, scope="shared")}
    app = FakeAuth(CacheMiddleware(gemini_app(upstream), rules=shared))
    first = await _raw_request(app, "mallory", b'{"contents":[{"parts":[{"text":"EVIL"}]}]}')
    second = await _raw_request(app, "bob", b'{"contents":[{"parts":[{"text":"other"}]}]}')
    assert json.loads(first.body)["principal"] == "mallory"
    assert json.loads(second.body)["principal"] == "bob"  # not mallory's answer
    assert second.headers["cache-status"] == "gemini-scale; fwd=bypass"
    assert len(upstream.calls) == 2


async def test_an_answer_shorter_than_its_length_is_not_stored() -> None:
    whole = json.dumps({"candidates": [{"content": {"parts": [{"text": "x" * 80}]}}]}).encode()
    calls = 0

    async def broken_relay(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(whole)).encode())]})
        await send({"type": "http.response.body", "body": whole[:40], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = FakeAuth(CacheMiddleware(broken_relay, rules={"POST /x": CachePolicy(
        ttl=60, methods=_POST)}))
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    answers = [await call(app, "POST", "/x", headers=who("alice"), json_body=body)
               for _ in range(2)]
    for answer in answers:
        assert answer.headers["cache-status"] == "gemini-scale; fwd=miss"  # never "stored"
        assert answer.headers["content-length"] == str(len(whole))  # as the app declared
        assert "etag" not in answer.headers
    assert calls == 2


async def test_the_apps_own_tag_is_the_entrys_when_the_answer_is_not_held() -> None:
    # No Content-Length: the start goes on at once with the app's tag; hits keep that tag,
    # so revalidating with it gets a 304.
    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"etag", b'W/"app-v1"')]})
        await send({"type": "http.response.body", "body": b'{"models": []', "more_body": True})
        await send({"type": "http.response.body", "body": b"}", "more_body": False})

    app = FakeAuth(CacheMiddleware(tagged, rules={"GET /m": CachePolicy(ttl=60)}))
    miss = await call(app, "GET", "/m", headers=who("alice"))
    hit = await call(app, "GET", "/m", headers=who("alice"))
    again = await call(app, "GET", "/m", headers={**who("alice"), "if-none-match": 'W/"app-v1"'})
    assert miss.headers["etag"] == hit.headers["etag"] == 'W/"app-v1"'
    assert hit.headers["cache-status"] == "gemini-scale; hit"
    assert hit.body == miss.body == b'{"models": []}'
    assert (again.status, again.body) == (304, b"")


@pytest.mark.parametrize("method", ["DELETE", "PURGE", "PUT", "PATCH"])
def test_a_policy_cannot_cache_an_unsafe_method(method: str) -> None:
    with pytest.raises(ConfigurationError, match="GET, HEAD, POST and QUERY"):
        CachePolicy(ttl=60, methods=frozenset({"GET", method}))


async def test_a_revalidated_upstream_call_settles_its_tokens(backend: Backend) -> None:
    # no-cache + If-None-Match: the upstream is called (and reports its usage) but the
    # client gets a 304; the token reservation settles to that usage, not the estimate.
    usage = {"promptTokenCount": 2, "candidatesTokenCount": 5, "totalTokenCount": 7}
    upstream = Upstream(content=json.dumps({
        "candidates": [{"content": {"parts": [{"text": "ok"}]}}], "usageMetadata": usage,
    }).encode())
    engine = CacheEngine(backend.store(), clock=backend.clock)
    cache = CacheMiddleware(gemini_app(upstream), engine=engine, rules=RULES)
    limiter = RateLimitMiddleware(
        cache, default=RateLimitPolicy.parse("100/minute", tokens="10000/minute"),
    )
    app = FakeAuth(limiter)
    body = generate_body("hello")
    fresh = {**who("alice"), "cache-control": "no-cache"}

    def remaining(answer: Recorded) -> int:
        field = answer.headers["ratelimit"]  # '"tokens";r=N;t=T'
        return int(field.split(";r=")[1].split(";")[0])

    first = await call(app, "POST", GENERATE, headers=who("alice"), json_body=body)
    # Each header is read after its own request's estimate is reserved and the earlier
    # requests are settled: between these two, the 304's call and one more call settled.
    before = remaining(await call(app, "POST", GENERATE, headers=fresh, json_body=body))
    revalidated = await call(app, "POST", GENERATE, json_body=body,
                             headers={**fresh, "if-none-match": first.headers["etag"]})
    after = remaining(await call(app, "POST", GENERATE, headers=fresh, json_body=body))
    assert revalidated.status == 304
    assert len(upstream.calls) == 4
    assert before - after == 7 + 7  # not the 304's whole estimate


# -- central rules in front of an app without a route table ------------------------------


async def _plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A hand-written ASGI app: no route table, so only rules name its routes."""
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def test_a_rules_model_keys_the_limit_in_front_of_a_plain_app() -> None:
    limited = RateLimitMiddleware(_plain_app, rules={
        "POST /v1beta/models/{model}:countTokens":
            RateLimitPolicy.parse("2/minute", key=("principal", "model"))})
    app = FakeAuth(limited)
    statuses = [
        (await call(app, "POST", f"/v1beta/models/{model}:countTokens", headers=who("alice"),
                    json_body={"contents": []})).status
        for model in ("gemini-a", "gemini-a", "gemini-b", "gemini-a")
    ]
    assert statuses == [200, 200, 200, 429]  # one bucket per model


async def test_two_rules_have_two_budgets_in_front_of_a_plain_app() -> None:
    policy = RateLimitPolicy.parse("2/minute")
    app = FakeAuth(RateLimitMiddleware(_plain_app, rules={
        "GET /v1beta/models": policy, "GET /v1beta/models/{model}": policy}))
    statuses = [(await call(app, "GET", path, headers=who("alice"))).status for path in (
        "/v1beta/models", "/v1beta/models", "/v1beta/models/gemini-a", "/v1beta/models")]
    assert statuses == [200, 200, 200, 429]


async def test_a_rules_model_tags_the_entry_in_front_of_a_plain_app() -> None:
    cache = CacheMiddleware(_plain_app, rules={
        "POST /v1beta/models/{model}:generateContent": CachePolicy(ttl=60, methods=_POST)})
    app = FakeAuth(cache)
    body = generate_body("hello")
    first = await call(app, "POST", GENERATE, headers=who("alice"), json_body=body)
    model = GENERATE.split("/models/")[1].split(":")[0]
    assert await cache.engine.invalidate(tags=[CacheEngine.model_tag(model)]) == 1
    again = await call(app, "POST", GENERATE, headers=who("alice"), json_body=body)
    assert first.headers["cache-status"] == again.headers["cache-status"] == (
        "gemini-scale; fwd=miss; stored")



def _models_app(headers: Any) -> Any:
    """A ``GET /v1beta/models`` endpoint answering with ``headers()`` (called per request:
    a generator is used up once) and counting its calls."""
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(1)
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers(len(calls))})
        await send({"type": "http.response.body", "body": b'{"models": []}'})

    app.calls = calls  # type: ignore[attr-defined]
    return app


_SHARED_LIST: Any = {"GET /v1beta/models": CachePolicy(ttl=300, scope="shared")}


async def test_an_answer_that_names_its_cookie_in_capitals_is_never_stored() -> None:
    # ASGI asks for lower-case names; apps send ``Set-Cookie`` all the same. A shared
    # entry holding one caller's cookie would hand it to every other caller.
    inner = _models_app(lambda n: [
        (b"Content-Type", b"application/json"),
        (b"Set-Cookie", f"session=caller{n}-secret".encode()),
    ])
    app = FakeAuth(CacheMiddleware(inner, rules=_SHARED_LIST))
    first = await call(app, "GET", "/v1beta/models", headers=who("alice"))
    second = await call(app, "GET", "/v1beta/models", headers=who("bob"))
    assert second.headers["set-cookie"] == "session=caller2-secret"
    assert first.headers["cache-status"] == second.headers["cache-status"] == (
        "gemini-scale; fwd=miss"
    )
    assert len(inner.calls) == 2


async def test_an_answer_that_says_no_store_in_capitals_is_never_stored() -> None:
    inner = _models_app(lambda n: [
        (b"content-type", b"application/json"), (b"Cache-Control", b"no-store"),
    ])
    app = FakeAuth(CacheMiddleware(inner, rules=_SHARED_LIST))
    for sub in ("alice", "bob"):
        answer = await call(app, "GET", "/v1beta/models", headers=who(sub))
        assert answer.headers["cache-status"] == "gemini-scale; fwd=miss"
    assert len(inner.calls) == 2


async def test_headers_sent_as_a_generator_reach_the_client_and_the_entry() -> None:
    # ASGI allows any iterable of pairs: one read of it must serve both the decision and
    # the answer (a used-up generator once stored a header-less entry for every caller).
    inner = _models_app(lambda n: (
        pair for pair in [(b"content-type", b"application/json"), (b"x-app", b"yes")]
    ))
    app = FakeAuth(CacheMiddleware(inner, rules=_SHARED_LIST))
    miss = await call(app, "GET", "/v1beta/models", headers=who("alice"))
    hit = await call(app, "GET", "/v1beta/models", headers=who("bob"))
    for answer in (miss, hit):
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["x-app"] == "yes"
    assert hit.headers["cache-status"] == "gemini-scale; hit"
    assert len(inner.calls) == 1


class HeldUpstream:
    """Answers ``old``, ``new``, ``newer`` in turn; the first call is held (after noting
    its entry key) until ``release``: a long upstream call."""

    def __init__(self) -> None:
        self.answers = iter([b'{"answer": "old"}', b'{"answer": "new"}', b'{"answer": "newer"}'])
        self.held, self.release = asyncio.Event(), asyncio.Event()
        self.keys: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = next(self.answers)
        if not self.held.is_set():
            self.keys.append(scope["gemini_scale"].extras["cache_key"])
            self.held.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


async def test_an_answer_a_tag_invalidation_overtook_never_comes_back() -> None:
    # The leader's key was worked out before the invalidation, so its answer is stored
    # under the old generation; once that generation's record expires the old key is
    # reachable again, and by then the entry must be gone too (its life counts from its
    # request's start, not from the end of a long upstream call).
    clock = FakeClock()
    engine = CacheEngine(MemoryStore(clock=clock), clock=clock, max_ttl=2.0, lock_ttl=0.5,
                         tag_refresh=0)
    upstream = HeldUpstream()
    policy = CachePolicy(ttl=2.0, scope="shared", methods=frozenset({"GET"}))
    app = CacheMiddleware(upstream, engine=engine,
                          rules={"GET /v1beta/models/{model}": policy}, clock=clock)
    leader = asyncio.create_task(call(app, "GET", "/v1beta/models/m1"))
    await upstream.held.wait()
    clock.advance(0.2)
    await engine.invalidate(tags=[CacheEngine.model_tag("m1")])  # the data changed
    clock.advance(1.0)  # an upstream call longer than lock_ttl
    upstream.release.set()
    assert json.loads((await leader).body) == {"answer": "old"}
    assert json.loads((await call(app, "GET", "/v1beta/models/m1")).body) == {"answer": "new"}
    clock.advance(1.6)  # the invalidation's generation record has expired
    again = await call(app, "GET", "/v1beta/models/m1")
    assert json.loads(again.body) != {"answer": "old"}


async def test_an_answer_that_is_already_old_is_kept_only_for_the_rest_of_its_max_age() -> None:
    # RFC 9111 §4.2.3: an upstream answer with "Age: 8" and "max-age=10" is fresh for 2 s.
    clock = FakeClock()
    inner = _models_app(lambda n: [
        (b"content-type", b"application/json"), (b"cache-control", b"max-age=10"),
        (b"age", b"8"),
    ])
    app = FakeAuth(CacheMiddleware(inner, rules=_SHARED_LIST, clock=clock))
    await call(app, "GET", "/v1beta/models", headers=who("alice"))
    clock.advance(1)
    assert (await call(app, "GET", "/v1beta/models", headers=who("bob"))).headers[
        "cache-status"
    ] == "gemini-scale; hit"
    clock.advance(2)
    assert (await call(app, "GET", "/v1beta/models", headers=who("bob"))).headers[
        "cache-status"
    ].startswith("gemini-scale; fwd=miss")
    assert len(inner.calls) == 2


async def test_key_for_does_not_remember_a_key_an_invalidation_overtook() -> None:
    """``CacheEngine.key_for`` reading a tag's generation from the store while another of
    its tags is invalidated: the key it returns may be the old one, but it must not keep
    giving it once the invalidation returned."""
    reading = asyncio.Event()
    go_on = asyncio.Event()

    class SlowStore(MemoryStore):  # a store with a round trip, held by the test
        async def get(self, key: str) -> bytes | None:
            if key.endswith(held_name):
                reading.set()
                await go_on.wait()
            return await super().get(key)

    engine = CacheEngine(SlowStore(), tag_refresh=60.0)
    held_name = engine._generation_name("b")  # tag b's generation is read slowly
    await engine.generations(["a"])
    material = b"request-material"
    task = asyncio.create_task(engine.key_for(material, ["a", "b"]))
    await reading.wait()
    await engine.invalidate(tags=["a"])
    go_on.set()
    await task
    suffix, _ = await engine.generations(["a", "b"])
    assert await engine.key_for(material, ["a", "b"]) == CacheEngine.key(
        material, suffix[1:].decode().split(",")
    )


async def test_an_answer_whose_key_is_deleted_during_its_call_is_not_stored() -> None:
    upstream = HeldUpstream()
    policy = CachePolicy(ttl=60, scope="shared", methods=frozenset({"GET"}))
    app = CacheMiddleware(upstream, rules={"GET /v1beta/models/{model}": policy})
    leader = asyncio.create_task(call(app, "GET", "/v1beta/models/m1"))
    await upstream.held.wait()
    await app.engine.invalidate(keys=upstream.keys)  # the data changed meanwhile
    later = await call(app, "GET", "/v1beta/models/m1")  # does not join the old call
    assert json.loads(later.body) == {"answer": "new"}
    upstream.release.set()
    assert json.loads((await leader).body) == {"answer": "old"}  # what it got, sent on
    after = await call(app, "GET", "/v1beta/models/m1")
    assert json.loads(after.body) == {"answer": "new"}
    assert after.headers["cache-status"] == "gemini-scale; hit"  # the later answer's entry
