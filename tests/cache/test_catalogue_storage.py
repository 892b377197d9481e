"""research/security.md §4C, through HTTP: what is stored, how long, and what a hit replays
(C04-C07, C12, C18-C21, C23)."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from gemini_scale.stores import MemoryStore
from tests.cache.conftest import Backend
from tests.cache.support import (
    MODEL_GET,
    MODELS,
    FakeAuth,
    Upstream,
    cached,
    call,
    status_of,
    who,
)


async def assert_never_stored(backend: Backend, headers: dict[str, str]) -> list[httpx.Response]:
    """Two identical requests whose answers carry ``headers``: both reach the upstream,
    nothing is written to the store."""
    upstream = Upstream(headers=headers)
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        answers = [await stack.client.get(MODEL_GET, headers=who("alice")) for _ in range(2)]
        assert [status_of(a) for a in answers] == ["gemini-scale; fwd=miss"] * 2
        assert stack.engine.stats.stored == 0
    assert len(upstream.calls) == 2
    if backend.redis:
        assert await backend.keys() == []
    return answers


@pytest.mark.parametrize("control", ["no-store", "no-store, max-age=600"])
async def test_C04_no_store_answers_are_not_stored(backend: Backend, control: str) -> None:
    for answer in await assert_never_stored(backend, {"cache-control": control}):
        assert answer.headers["cache-control"] == control  # kept: never made private


async def test_C05_private_answers_are_not_stored_by_default(backend: Backend) -> None:
    await assert_never_stored(backend, {"cache-control": "private, max-age=600"})


async def test_C06_set_cookie_answers_are_not_stored(backend: Backend) -> None:
    upstream = Upstream(headers={"cache-control": "max-age=600", "set-cookie": "s=1"})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        first = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert first.headers["set-cookie"] == "s=1"  # the client receives it, once
        assert status_of(first) == "gemini-scale; fwd=miss"
        upstream.headers = {}
        second = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert status_of(second) == "gemini-scale; fwd=miss; stored"
        assert "set-cookie" not in second.headers
        await stack.client.get(MODEL_GET, headers=who("alice"))
        assert len(upstream.calls) == 2


@pytest.mark.parametrize("expires", ["0", "Thu, 01 Jan 1970 00:00:00 GMT", "never"])
async def test_answers_already_expired_are_not_stored(backend: Backend, expires: str) -> None:
    # RFC 9111 §5.3: a past or invalid Expires ("0" above all) means already expired.
    await assert_never_stored(backend, {"expires": expires})


async def test_a_future_expires_caps_the_lifetime(backend: Backend) -> None:
    # Without a Date, from when the answer came (the policy's ttl is 60 s).
    expires = format_datetime(datetime.fromtimestamp(backend.clock.time() + 5, UTC), usegmt=True)
    upstream = Upstream(headers={"expires": expires})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        first = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert status_of(first) == "gemini-scale; fwd=miss; stored"
        backend.clock.advance(4)
        assert status_of(await stack.client.get(MODEL_GET, headers=who("alice"))) == (
            "gemini-scale; hit")
        backend.clock.advance(2)  # expired; the same Expires is past now: not stored again
        assert status_of(await stack.client.get(MODEL_GET, headers=who("alice"))) == (
            "gemini-scale; fwd=miss")
    assert len(upstream.calls) == 2


@pytest.mark.parametrize("vary", ["*", "X-Unlisted", "accept-encoding, X-Unlisted"])
async def test_C07_vary_outside_the_allow_list_is_not_stored(backend: Backend, vary: str) -> None:
    await assert_never_stored(backend, {"vary": vary})


async def test_C07_accept_encoding_variants_are_kept_apart(backend: Backend) -> None:
    calls: list[str] = []

    async def negotiated(request: Request) -> Response:
        calls.append(request.headers.get("accept-encoding", ""))
        payload = b'{"text": "' + b"x" * 200 + b'"}'
        headers = {"vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["content-encoding"] = "gzip"
            payload = gzip.compress(payload)
        return Response(payload, media_type="application/json", headers=headers)

    app = Starlette(routes=[Route(MODEL_GET, negotiated)])
    rules = {MODEL_GET: CachePolicy(ttl=60)}
    cache = FakeAuth(CacheMiddleware(app, rules=rules, store=backend.store(), clock=backend.clock))
    for encoding in ("gzip", "identity", "gzip", "identity"):
        answer = await call(cache, "GET", MODEL_GET,
                            headers={**who("alice"), "accept-encoding": encoding})
        assert answer.headers.get("content-encoding") == ("gzip" if encoding == "gzip" else None)
        body = gzip.decompress(answer.body) if encoding == "gzip" else answer.body
        assert json.loads(body)["text"] == "x" * 200  # the identity client never gets gzip
    assert calls == ["gzip", "identity"]


@pytest.mark.parametrize("status", [200, 206, 304, 400, 404, 429, 500, 503])
async def test_C12_only_200_is_stored(backend: Backend, status: int) -> None:
    upstream = Upstream(status=status, headers={"cache-control": "max-age=600"})
    if status == 429:
        upstream.content = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                       "details": [{"retryDelay": "5s"}]}}).encode()
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        for sub in ("alice", "alice", "bob"):
            answer = await stack.client.get(MODELS, headers=who(sub))  # a shared entry
            assert answer.status_code == status
        expected = 1 if status == 200 else 3
        assert len(upstream.calls) == expected  # an error never answers a later request


async def test_C18_the_memory_store_stays_bounded_and_evictions_are_misses() -> None:
    store = MemoryStore(max_keys=200)
    async with cached(store=store) as stack:
        for page in range(1000):
            answer = await stack.client.get(
                MODELS, params={"pageToken": str(page)}, headers=who("alice"))
            assert answer.json()["n"] == page + 1
        assert len(store) <= 200
        # Early pages were evicted: a miss with the right answer, never another page's.
        early = await stack.client.get(MODELS, params={"pageToken": "3"}, headers=who("alice"))
        assert status_of(early).startswith("gemini-scale; fwd=miss")
        late = await stack.client.get(MODELS, params={"pageToken": "999"}, headers=who("alice"))
        assert status_of(late) == "gemini-scale; hit"
        assert late.json()["n"] == 1000


@pytest.mark.redis
async def test_C18_every_redis_key_has_a_ttl(redis_backend: Backend) -> None:
    async with cached(store=redis_backend.store(), clock=redis_backend.clock) as stack:
        for page in range(50):
            await stack.client.get(MODELS, params={"pageToken": str(page)}, headers=who("a"))
        await stack.engine.invalidate(tags=["model:gemini-2.5-flash"])
        ttls = await redis_backend.ttls()
        assert len(ttls) == 51
        assert all(0 < ttl <= (86_400 + 30) * 1000 for ttl in ttls.values())


async def test_C19_freshness_and_request_directives(backend: Backend) -> None:
    rules = {"GET /v1beta/models/{model}": CachePolicy(ttl=2)}
    async with cached(rules=rules, store=backend.store(), clock=backend.clock) as stack:
        alice = who("alice")
        await stack.client.get(MODEL_GET, headers=alice)
        backend.clock.advance(1)
        hit = await stack.client.get(MODEL_GET, headers=alice)
        assert status_of(hit) == "gemini-scale; hit"
        assert hit.headers["age"] == "1"
        backend.clock.advance(0.5)
        assert (await stack.client.get(MODEL_GET, headers=alice)).headers["age"] == "1"
        backend.clock.advance(1.5)  # t = 3
        expired = await stack.client.get(MODEL_GET, headers=alice)
        assert status_of(expired) == "gemini-scale; fwd=miss; stored"
        # no-cache: the pinned policy is "forward and store the fresh answer" (revalidate).
        fresh = await stack.client.get(MODEL_GET, headers={**alice, "cache-control": "no-cache"})
        assert status_of(fresh) == "gemini-scale; fwd=request; stored"
        assert (await stack.client.get(MODEL_GET, headers=alice)).json()["n"] == fresh.json()["n"]
        # no-store: forward, store nothing.
        skipped = await stack.client.get(MODEL_GET, headers={**alice, "cache-control": "no-store"})
        assert status_of(skipped) == "gemini-scale; fwd=request"
        assert (await stack.client.get(MODEL_GET, headers=alice)).json()["n"] == fresh.json()["n"]
        # max-age: an older entry is not good enough.
        backend.clock.advance(1)
        older = await stack.client.get(MODEL_GET, headers={**alice, "cache-control": "max-age=0"})
        assert status_of(older) == "gemini-scale; fwd=request; stored"
        # only-if-cached on a miss: 504, and the upstream is not called.
        calls = len(stack.upstream.calls)
        missing = await stack.client.get(
            MODEL_GET.replace("flash", "pro"),
            headers={**alice, "cache-control": "only-if-cached"})
        assert missing.status_code == 504
        assert missing.json()["error"]["status"] == "DEADLINE_EXCEEDED"
        assert status_of(missing) == "gemini-scale; detail=only-if-cached"
        assert len(stack.upstream.calls) == calls


async def test_C19_age_counts_the_age_the_answer_arrived_with(backend: Backend) -> None:
    # RFC 9111 §4.2.3: an answer that is already 100 s old stays that old on every hit.
    upstream = Upstream(headers={"age": "100", "cache-control": "max-age=200"})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        alice = who("alice")
        miss = await stack.client.get(MODEL_GET, headers=alice)
        assert (status_of(miss), miss.headers["age"]) == ("gemini-scale; fwd=miss; stored", "100")
        backend.clock.advance(5)
        hit = await stack.client.get(MODEL_GET, headers=alice)
        assert (status_of(hit), hit.headers["age"]) == ("gemini-scale; hit", "105")
        # A request's max-age compares with the whole age, not the time in this cache.
        young = await stack.client.get(
            MODEL_GET, headers={**alice, "cache-control": "max-age=104"})
        assert status_of(young) == "gemini-scale; fwd=miss; stored"
        assert len(upstream.calls) == 2
        backend.clock.advance(1)
        again = await stack.client.get(
            MODEL_GET, headers={**alice, "cache-control": "max-age=104"})
        assert (status_of(again), again.headers["age"]) == ("gemini-scale; hit", "101")


async def test_C20_stored_headers_are_sanitised(backend: Backend) -> None:
    upstream = Upstream(raw_headers=[
        (b"connection", b"x-foo"), (b"x-foo", b"1"), (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"), (b"proxy-authenticate", b"Basic"),
        (b"server-timing", b"db;dur=53"), (b"x-kept", b"yes"),
    ])
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        first = await call(stack.app, "GET", MODEL_GET, headers=who("alice"))
        assert first.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
        hit = await call(stack.app, "GET", MODEL_GET, headers=who("alice"))
        names = [name for name, _ in hit.messages[0]["headers"]]
        for dropped in (b"connection", b"x-foo", b"keep-alive", b"transfer-encoding",
                        b"proxy-authenticate", b"server-timing", b"set-cookie"):
            assert dropped not in names
        assert hit.headers["x-kept"] == "yes"
        assert names.count(b"content-length") == 1
        assert hit.headers["content-length"] == str(len(hit.body))
        assert hit.body == first.body


async def test_C21_diagnostic_headers(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        await stack.client.get(MODEL_GET, headers=who("alice"))
        hit = await stack.client.get(MODEL_GET, headers=who("alice"))
        assert status_of(hit) == "gemini-scale; hit"
        assert not any(name.startswith("x-cache") for name in hit.headers)
    async with cached(store=backend.store(), clock=backend.clock, expose_key=True,
                      age=False) as stack:
        await stack.client.get(MODEL_GET, headers=who("alice"))
        hit = await stack.client.get(MODEL_GET, headers=who("alice"))
        label, _, key = status_of(hit).partition('; key="')
        assert label == "gemini-scale; hit"
        assert len(key.rstrip('"')) == 32
        assert "alice" not in key
        assert "age" not in hit.headers


async def test_C23_answers_owned_by_a_caller_are_private_downstream(backend: Backend) -> None:
    upstream = Upstream(headers={"cache-control": "public, max-age=60"})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        miss = await stack.client.get(MODEL_GET, headers=who("alice"))
        hit = await stack.client.get(MODEL_GET, headers=who("alice"))
        for answer in (miss, hit):
            assert answer.headers["cache-control"] == "private"
            assert "authorization" not in answer.headers.get("vary", "").lower()
        shared = await stack.client.get(MODELS, headers=who("alice"))
        assert shared.headers["cache-control"] == "public, max-age=60"  # shared: left as is
    async with cached(store=backend.store(), clock=backend.clock, private="no-store") as stack:
        answer = await stack.client.get(MODEL_GET, headers=who("carol"))
        assert answer.headers["cache-control"] == "no-store"


async def test_C23_cache_control_private_on_a_bypassed_answer(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        answer = await stack.client.get(MODEL_GET, params={"cb": "1"}, headers=who("alice"))
        assert status_of(answer) == "gemini-scale; fwd=bypass"
        assert answer.headers["cache-control"] == "private"


async def test_etag_and_if_none_match(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        alice = who("alice")
        miss = await stack.client.get(MODEL_GET, headers=alice)
        etag = miss.headers["etag"]
        hit = await stack.client.get(MODEL_GET, headers=alice)
        assert hit.headers["etag"] == etag  # stable: from the content
        for match in (etag, f'"other", W/{etag}', "*"):
            not_modified = await stack.client.get(
                MODEL_GET, headers={**alice, "if-none-match": match})
            assert not_modified.status_code == 304
            assert not_modified.content == b""
            assert not_modified.headers["etag"] == etag
            assert status_of(not_modified) == "gemini-scale; hit"
            assert "content-length" not in not_modified.headers
        other = await stack.client.get(MODEL_GET, headers={**alice, "if-none-match": '"x"'})
        assert other.status_code == 200
        # On a miss, a fresh answer whose tag matches is a 304 too (the tag comes from content).
        bob = await stack.client.get(MODEL_GET, headers={**who("bob"), "if-none-match": etag})
        assert bob.status_code == 200  # bob's answer differs (it names bob)
        assert len(stack.upstream.calls) == 2


async def test_a_fresh_answer_matching_if_none_match_is_304(backend: Backend) -> None:
    upstream = Upstream(content=b'{"same": "for everyone"}')
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        etag = (await stack.client.get(MODEL_GET, headers=who("alice"))).headers["etag"]
        fresh = await stack.client.get(MODEL_GET, headers={**who("bob"), "if-none-match": etag})
        assert fresh.status_code == 304
        assert status_of(fresh) == "gemini-scale; fwd=miss; stored"
        again = await stack.client.get(MODEL_GET, headers=who("bob"))
        assert status_of(again) == "gemini-scale; hit"
        assert again.content == b'{"same": "for everyone"}'


async def test_max_age_of_the_answer_caps_the_ttl(backend: Backend) -> None:
    upstream = Upstream(headers={"cache-control": "max-age=5"})
    async with cached(upstream=upstream, store=backend.store(), clock=backend.clock) as stack:
        await stack.client.get(MODEL_GET, headers=who("alice"))
        backend.clock.advance(4)
        assert status_of(await stack.client.get(MODEL_GET, headers=who("alice"))) == (
            "gemini-scale; hit")
        backend.clock.advance(2)
        assert status_of(await stack.client.get(MODEL_GET, headers=who("alice"))).startswith(
            "gemini-scale; fwd=miss")
