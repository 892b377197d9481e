"""research/security.md §4C, through HTTP: whose entry a request reads, and what is part of
its key (C01-C03, C08-C11, C24, C25)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Host, Route, Router

from gemini_scale import GeminiUpstream, ScopePolicy
from gemini_scale.caching import CacheMiddleware
from gemini_scale.policies import CachePolicy
from tests.cache.conftest import Backend
from tests.cache.support import (
    COUNT,
    GENERATE,
    MODEL,
    MODEL_GET,
    MODELS,
    FakeAuth,
    authenticated,
    cached,
    call,
    generate_body,
    status_of,
    who,
)


async def test_C01_no_cross_principal_leak(backend: Backend) -> None:
    async with authenticated(store=backend.store(), clock=backend.clock) as stack:
        alice, bob = stack.token("alice"), stack.token("bob")
        first = await stack.client.post(COUNT, json={"contents": []}, headers=alice)
        second = await stack.client.post(COUNT, json={"contents": []}, headers=bob)
        again = await stack.client.post(COUNT, json={"contents": []}, headers=alice)
        assert [status_of(r) for r in (first, second, again)] == [
            "gemini-scale; fwd=miss; stored", "gemini-scale; fwd=miss; stored", "gemini-scale; hit"]
        assert first.json()["principal"] == again.json()["principal"] == "alice"
        assert second.json()["principal"] == "bob"
        assert again.content == first.content
        before = (stack.engine.stats.hits, stack.engine.stats.misses, stack.engine.stats.bypassed)
        for headers in ({}, {"authorization": "Bearer not.a.token"}):
            refused = await stack.client.post(COUNT, json={"contents": []}, headers=headers)
            assert refused.status_code == 401
            assert "cache-status" not in refused.headers
            assert "x-cache-status" not in refused.headers
        after = (stack.engine.stats.hits, stack.engine.stats.misses, stack.engine.stats.bypassed)
        assert after == before  # no storage lookup for a refused request
        assert len(stack.upstream.calls) == 2


async def test_C02_the_key_comes_only_from_verified_identity(backend: Backend) -> None:
    async with authenticated(store=backend.store(), clock=backend.clock) as stack:
        alice = stack.token("alice", tenant="alice")
        stored = await stack.client.get(MODEL_GET, headers=alice)
        assert stored.json()["principal"] == "alice"
        # A token claiming Alice with a broken signature: refused before the cache.
        header, payload, signature = alice["authorization"].removeprefix("Bearer ").split(".")
        forged = f"{header}.{payload}.{signature[:-4]}AAAA"
        refused = await stack.client.get(MODEL_GET, headers={"authorization": f"Bearer {forged}"})
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        # Bob naming Alice's tenant in a header gets his own entry: headers are not identity.
        bob = {**stack.token("bob"), "x-tenant-id": "alice"}
        answer = await stack.client.get(MODEL_GET, headers=bob)
        assert status_of(answer).startswith("gemini-scale; fwd=miss")
        assert answer.json()["principal"] == "bob"


async def test_C03_authorization_is_decided_before_the_cache(backend: Backend) -> None:
    scopes = {MODEL_GET: ScopePolicy(scopes=frozenset({"s1"}))}
    async with authenticated(store=backend.store(), clock=backend.clock, scopes=scopes) as stack:
        full = stack.token("alice", scopes=("s1", "s2"))
        assert (await stack.client.get(MODEL_GET, headers=full)).status_code == 200
        assert status_of(await stack.client.get(MODEL_GET, headers=full)) == "gemini-scale; hit"
        fewer = stack.token("alice", scopes=("s2",))
        refused = await stack.client.get(MODEL_GET, headers=fewer)
        assert refused.status_code == 403
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
        assert "cache-status" not in refused.headers
        # Alice moves tenant: another key, even though the subject is the same.
        moved = stack.token("alice", scopes=("s1",), tenant="other")
        answer = await stack.client.get(MODEL_GET, headers=moved)
        assert status_of(answer).startswith("gemini-scale; fwd=miss")
        assert answer.json()["tenant"] == "other"


async def test_C03_tenant_scoped_entries_follow_the_tenant(backend: Backend) -> None:
    rules = {"GET /v1beta/models/{model}": CachePolicy(ttl=60, scope="tenant")}
    async with cached(rules=rules, store=backend.store(), clock=backend.clock) as stack:
        first = await stack.client.get(MODEL_GET, headers=who("alice", tenant="acme"))
        colleague = await stack.client.get(MODEL_GET, headers=who("carol", tenant="acme"))
        elsewhere = await stack.client.get(MODEL_GET, headers=who("alice", tenant="other"))
        # Another issuer's "acme" is not this issuer's: it cannot read acme's entries.
        impostor = await stack.client.get(
            MODEL_GET, headers=who("mallory", tenant="acme", iss="https://other-idp.example/")
        )
        loner = await stack.client.get(MODEL_GET, headers=who("dave"))
        loner2 = await stack.client.get(MODEL_GET, headers=who("erin"))
        assert status_of(colleague) == "gemini-scale; hit"
        assert colleague.content == first.content
        for response in (elsewhere, impostor, loner, loner2):  # tenant-less never share
            assert status_of(response).startswith("gemini-scale; fwd=miss")


# -- C08: unkeyed inputs --------------------------------------------------------------------

ATTACKER_HEADERS = {
    "x-forwarded-host": "evil",
    "x-forwarded-proto": "http",
    "x-original-url": "/v1/admin",
    "x-http-method-override": "DELETE",
    "accept-language": "xx",
    "x-goog-user-project": "other",
}


def echoing_gemini(seen: list[dict[str, str]]) -> httpx.MockTransport:
    """A fake Gemini behind the real upstream client: its answer echoes what it received."""

    def handle(request: httpx.Request) -> httpx.Response:
        headers = {k: v for k, v in request.headers.items() if k not in ("x-goog-api-key",)}
        seen.append(headers)
        body = {"method": request.method, "url": str(request.url), "headers": headers}
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handle)


async def test_C08_unkeyed_inputs_never_shape_a_cached_answer(backend: Backend) -> None:
    seen: list[dict[str, str]] = []
    upstream = GeminiUpstream(
        base_url="https://gemini.invalid", api_keys=["server-key"],
        transport=echoing_gemini(seen),
    )

    async def relay(request: Request) -> Response:
        return await upstream.forward(request)

    app = Starlette(routes=[Route(COUNT, relay, methods=["POST"])])
    rules = {"/v1beta/models/{model}:countTokens": CachePolicy(
        ttl=60, scope="shared", methods=frozenset({"POST"}))}
    cache = CacheMiddleware(app, rules=rules, store=backend.store(), clock=backend.clock)
    transport = httpx.ASGITransport(app=FakeAuth(cache))
    async with upstream, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for name, value in ATTACKER_HEADERS.items():
            poisoned = await client.post(COUNT, json={"contents": []}, headers={name: value})
            assert poisoned.status_code == 200
            assert name not in poisoned.json()["headers"]  # stripped before the upstream call
        clean = await client.post(COUNT, json={"contents": []})
        assert status_of(clean) == "gemini-scale; hit"
        answer = clean.json()
        assert answer["method"] == "POST"
        assert not set(answer["headers"]) & set(ATTACKER_HEADERS)
        assert all(not set(headers) & set(ATTACKER_HEADERS) for headers in seen)


# -- C09: the canonical body ---------------------------------------------------------------


async def test_C09_canonical_body_key(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock, max_body_bytes=4096) as stack:
        alice = {**who("alice"), "content-type": "application/json"}
        one = json.dumps(generate_body("hi", maxOutputTokens=20))
        two = ' { "generation_config" : {"max_output_tokens": 20.0, "temperature": 0.0},\n' \
              '   "contents": [{"parts": [{"text": "hi"}], "role": "user"}] } '
        first = await stack.client.post(GENERATE, content=one, headers=alice)
        second = await stack.client.post(GENERATE, content=two, headers=alice)
        assert status_of(first) == "gemini-scale; fwd=miss; stored"
        assert status_of(second) == "gemini-scale; hit"
        changes: list[dict[str, Any]] = [
            generate_body("hi", temperature=0, maxOutputTokens=20, seed=1),
            {**generate_body("hi", maxOutputTokens=20), "safetySettings": [
                {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "OFF"}]},
            {**generate_body("hi", maxOutputTokens=20), "systemInstruction": {
                "parts": [{"text": "terse"}]}},
            {**generate_body("hi", maxOutputTokens=20), "tools": [{"codeExecution": {}}]},
        ]
        for body in changes:
            answer = await stack.client.post(GENERATE, json=body, headers=who("alice"))
            assert status_of(answer) == "gemini-scale; fwd=miss; stored", body
        hot = await stack.client.post(
            GENERATE, json=generate_body("hi", temperature=0.7), headers=who("alice"))
        assert status_of(hot) == "gemini-scale; fwd=bypass"  # not deterministic
        big = generate_body("x" * 5000)
        for _ in range(2):
            answer = await stack.client.post(GENERATE, json=big, headers=who("alice"))
            assert status_of(answer) == "gemini-scale; fwd=bypass"
        assert json.loads(stack.upstream.calls[-1]["body"]) == big  # replayed untouched


async def test_C09_a_body_the_cache_cannot_key_reaches_the_app_untouched(
    backend: Backend,
) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        for content, kind in ((b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                              (b"plain", "text/plain")):
            answer = await stack.client.post(
                COUNT, content=content, headers={**who("alice"), "content-type": kind})
            assert status_of(answer) == "gemini-scale; fwd=bypass"
            assert stack.upstream.calls[-1]["body"] == content


async def test_C09_a_body_that_repeats_a_member_is_never_answered_from_cache(
    backend: Backend,
) -> None:
    """The upstream reads the bytes as sent (a proto3 reader refuses a repeated member);
    the cache must not answer them with the entry of the body keeping the last one."""
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        alice = {**who("alice"), "content-type": "application/json"}
        single = json.dumps(generate_body("benign")).encode()
        repeated = b'{"contents": [{"parts": [{"text": "other"}]}], ' + single[1:]
        first = await stack.client.post(GENERATE, content=single, headers=alice)
        assert status_of(first) == "gemini-scale; fwd=miss; stored"
        for _ in range(2):
            answer = await stack.client.post(GENERATE, content=repeated, headers=alice)
            assert status_of(answer) == "gemini-scale; fwd=bypass"
            assert stack.upstream.calls[-1]["body"] == repeated
        again = await stack.client.post(GENERATE, content=single, headers=alice)
        assert status_of(again) == "gemini-scale; hit"


@pytest.mark.parametrize("name", ["generation__config", "generation_config_", "generation_Config"])
async def test_C09_a_spelling_that_is_no_proto_field_name_is_not_the_field(
    backend: Backend, name: str
) -> None:
    """Only ``generation_config`` is ``generationConfig`` to proto3 JSON: another spelling is
    an unknown member (Gemini refuses it), never answered with the field's entry."""
    async with cached(store=backend.store(), clock=backend.clock, generation="all") as stack:
        alice = {**who("alice"), "content-type": "application/json"}
        valid = json.dumps(generate_body("hi")).encode()
        snake = valid.replace(b"generationConfig", b"generation_config")
        odd = valid.replace(b"generationConfig", name.encode())
        first = await stack.client.post(GENERATE, content=valid, headers=alice)
        assert status_of(first) == "gemini-scale; fwd=miss; stored"
        respelled = await stack.client.post(GENERATE, content=snake, headers=alice)
        assert status_of(respelled) == "gemini-scale; hit"
        answer = await stack.client.post(GENERATE, content=odd, headers=alice)
        assert status_of(answer) == "gemini-scale; fwd=miss; stored"
        assert stack.upstream.calls[-1]["body"] == odd


# -- C10: path confusion -------------------------------------------------------------------

CONFUSING = [
    f"/v1beta/models/{MODEL}:countTokens/x.css",
    f"/v1beta/models/{MODEL}:countTokens;x.css",
    f"/v1beta/models/{MODEL}:countTokens\x00.css",
    f"/v1beta/models/../models/{MODEL}:countTokens",
    f"/V1BETA/models/{MODEL}:countTokens",
    f"/v1beta/models/{MODEL}:countTokens.",
    f"/v1beta/models/{MODEL}:countTokens/",
]


@pytest.mark.parametrize("path", CONFUSING)
async def test_C10_path_confusion_is_not_cached(backend: Backend, path: str) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        for sub in ("alice", "bob"):
            answer = await call(stack.app, "POST", path, headers=who(sub), json_body={})
            assert answer.status in (404, 405, 307), answer.status
            assert "cache-status" not in answer.headers
        assert stack.engine.stats.stored == 0


async def test_C10_a_routed_variant_is_keyed_as_routed_and_per_principal(
    backend: Backend,
) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        odd = f"/v1beta/models/{MODEL};x.css:countTokens"  # routed: model = "...;x.css"
        alice = await call(stack.app, "POST", odd, headers=who("alice"), json_body={})
        bob = await call(stack.app, "POST", odd, headers=who("bob"), json_body={})
        canonical = await call(stack.app, "POST", COUNT, headers=who("alice"), json_body={})
        assert alice.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
        assert bob.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
        assert canonical.headers["cache-status"] == "gemini-scale; fwd=miss; stored"
        assert json.loads(bob.body)["principal"] == "bob"


async def test_C10_each_virtual_host_has_its_own_entries(backend: Backend) -> None:
    """The key holds the authority (RFC 9111 §2): two hosts serving one path never share an
    entry; the host's case does not matter; ``Vary: Host`` is satisfied by the key."""

    def site(name: str) -> Router:
        async def models(request: Request) -> Response:
            return JSONResponse({"site": name}, headers={"vary": "Host"})
        return Router(routes=[Route(MODELS, models)])

    app = Starlette(routes=[Host("a.example", site("a")), Host("b.example", site("b"))])
    rules = {f"GET {MODELS}": CachePolicy(ttl=60, scope="shared")}
    cache = CacheMiddleware(app, rules=rules, store=backend.store(), clock=backend.clock)
    transport = httpx.ASGITransport(app=cache)
    async with httpx.AsyncClient(transport=transport) as client:
        seen = []
        for url in ("http://a.example", "http://b.example", "http://a.example",
                    "http://b.example", "http://A.EXAMPLE"):
            answer = await client.get(url + MODELS)
            seen.append((answer.json()["site"], status_of(answer)))
        stored, hit = "gemini-scale; fwd=miss; stored", "gemini-scale; hit"
        assert seen == [("a", stored), ("b", stored), ("a", hit), ("b", hit), ("a", hit)]


# -- C11: query parameters -----------------------------------------------------------------


async def test_C11_query_parameters(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        alice = who("alice")
        with caplog.at_level(logging.DEBUG):
            json_form = await stack.client.get(MODELS, headers=alice)
            sse_form = await stack.client.get(MODELS, params={"alt": "sse"}, headers=alice)
            assert status_of(sse_form) == "gemini-scale; fwd=miss; stored"  # alt is keyed
            keyed = await stack.client.get(
                MODELS, params={"alt": "sse", "key": "AIza-CLIENT-SECRET"}, headers=alice)
            assert status_of(keyed) == "gemini-scale; hit"  # key is not part of the key
            for buster in range(3):
                busted = await stack.client.get(MODELS, params={"cb": buster}, headers=alice)
                assert status_of(busted) == "gemini-scale; fwd=bypass"
        assert status_of(json_form) == "gemini-scale; fwd=miss; stored"
        assert stack.engine.stats.stored == 2
        ours = [r.getMessage() for r in caplog.records if r.name.startswith("gemini_scale")]
        assert not any("AIza-CLIENT-SECRET" in message for message in ours)
        if backend.redis:
            for key in await backend.keys():
                value = await backend.stores[0].client.get(key)  # type: ignore[attr-defined]
                assert b"AIza-CLIENT-SECRET" not in key + (value or b"")


# -- C24: versions -------------------------------------------------------------------------


async def test_C24_each_version_has_its_own_key(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        body = generate_body("same")
        v1 = await stack.client.post(GENERATE.replace("v1beta", "v1"), json=body,
                                     headers=who("alice"))
        v1beta = await stack.client.post(GENERATE, json=body, headers=who("alice"))
        assert status_of(v1) == status_of(v1beta) == "gemini-scale; fwd=miss; stored"
        assert len(stack.upstream.calls) == 2


# -- C25: methods --------------------------------------------------------------------------


async def test_C25_head_is_served_from_the_get_entry(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        got = await stack.client.get(MODELS, headers=who("alice"))
        head = await stack.client.head(MODELS, headers=who("alice"))
        assert head.status_code == 200
        assert status_of(head) == "gemini-scale; hit"
        assert head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["etag"] == got.headers["etag"]
        assert len(stack.upstream.calls) == 1


async def test_C25_a_head_miss_is_not_stored(backend: Backend) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        head = await stack.client.head(MODELS, headers=who("alice"))
        assert head.status_code == 200
        assert status_of(head) == "gemini-scale; fwd=miss"
        got = await stack.client.get(MODELS, headers=who("alice"))
        assert status_of(got) == "gemini-scale; fwd=miss; stored"


@pytest.mark.parametrize("method", ["PURGE", "BAN", "DELETE"])
async def test_C25_cache_control_methods_are_ordinary_requests(
    backend: Backend, method: str
) -> None:
    async with cached(store=backend.store(), clock=backend.clock) as stack:
        await stack.client.get("/other", headers=who("alice"))
        answer = await stack.client.request(method, "/other", headers=who("alice"))
        assert answer.status_code == 405  # the app's own answer
        assert status_of(await stack.client.get("/other", headers=who("alice"))) == (
            "gemini-scale; hit")  # nothing was purged
