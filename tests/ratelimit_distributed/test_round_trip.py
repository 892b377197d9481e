"""One store round trip per limiter (issue 4: "All limits that apply to a request are
checked and consumed in one store round trip").

``MONITOR`` on a private server records what the gateway sends for one request, with
``INFO commandstats`` as a second witness. The example gateway has two limiters: the
per-address ``IPRateLimitMiddleware`` before authentication (one request limit) and the
per-principal-and-model ``RateLimitMiddleware`` after it (request *and* token limits).
What the code does, and what is asserted:

- ``GET models``: one ``EVALSHA rl_acquire`` per limiter, 2 in all. The principal's request
  and token limits go in the same call (2 keys in one ``{tag}``); a listing costs no
  tokens, so the token limit is checked with cost 0 and not written.
- ``POST ...:generateContent``: the same 2 acquires, the principal's reserving the token
  estimate, then one ``EVALSHA rl_settle`` after the answer moving the token reservation to
  the real ``usageMetadata`` (the request limit has nothing to settle and is not sent).
  Nothing else: no ``PING``, no ``SCRIPT LOAD`` once the scripts are cached, no reads.
"""

from __future__ import annotations

import hashlib

import pytest

from gemini_scale import RateLimitMiddleware
from gemini_scale.ratelimit.scripts import ACQUIRE, SETTLE
from gemini_scale.ratelimit.usage import estimate_request_tokens
from tests.gateway import build, running
from tests.redis_harness import RedisProcesses

from .support import MODEL, Monitor, client_ip_key, commandstats, generate_body

pytestmark = [pytest.mark.slow, pytest.mark.redis]

ACQUIRE_SHA = hashlib.sha1(ACQUIRE.lua.encode()).hexdigest()
SETTLE_SHA = hashlib.sha1(SETTLE.lua.encode()).hexdigest()
# The in-process transport's client address (StreamingASGITransport's default).
IP_KEY = client_ip_key("requests-60s", "127.0.0.1")


def _tag(key: str) -> str:
    return key[key.index("{") : key.index("}") + 1]


async def test_one_script_call_per_limiter(redis_servers: RedisProcesses) -> None:
    server = redis_servers.server()
    # The cache is off: this counts the limiters' commands alone.
    app = build({"GEMINI_SCALE_REDIS_URL": server.url, "GEMINI_SCALE_CACHE_TTL": "0"})
    for middleware in app.user_middleware:  # refunds wait for the bucket's next acquire only
        if middleware.cls is RateLimitMiddleware:
            middleware.kwargs["refund_delay"] = 3600
    body = generate_body("count my tokens", max_output_tokens=200)
    generate = f"/v1beta/models/{MODEL}:generateContent"
    async with running(app) as client:
        # Warm: both scripts loaded (a first EVALSHA meets NOSCRIPT and loads), a connection.
        assert (await client.get("/v1beta/models")).status_code == 200
        assert (await client.post(generate, json=body)).status_code == 200

        with server.client() as admin:
            admin.config_resetstat()
            with Monitor(server.port) as listing:
                response = await client.get("/v1beta/models")
                assert response.status_code == 200
                listing.wait_for(2)
            listed_stats = commandstats(admin)
            admin.config_resetstat()
            with Monitor(server.port) as generating:
                response = await client.post(generate, json=body)
                assert response.status_code == 200
                generating.wait_for(2)  # the warm-up's refund rides on the acquire
            generated_stats = commandstats(admin)
        usage = response.json()["usageMetadata"]["totalTokenCount"]

    # GET models: two round trips, one per limiter, each one EVALSHA of the acquire script.
    # A listing costs no Gemini tokens, so only the request limit is checked.
    assert [c[:3] for c in listing.commands] == [
        ["evalsha", ACQUIRE_SHA, "1"],  # per address: one key
        ["evalsha", ACQUIRE_SHA, "1"],  # per principal: the request limit
    ]
    ip_call, principal_call = listing.commands
    assert ip_call[3] == IP_KEY
    assert ip_call[4:] == ["600", "60000", "1"]  # 600/minute, cost 1
    requests_key = principal_call[3]
    assert requests_key.endswith(":requests-60s")
    assert _tag(requests_key) != _tag(IP_KEY)  # one slot per bucket
    assert principal_call[4:] == ["60", "60000", "1"]

    # generateContent: the same two acquires (reserving the estimate) and nothing else. The
    # warm-up call's refund (reservation -> real usage) rides on this call's acquire, in the
    # same script and hash slot; this call's own refund waits for the bucket's next acquire.
    estimate = estimate_request_tokens(body, method="generateContent")
    assert [c[:3] for c in generating.commands] == [
        ["evalsha", ACQUIRE_SHA, "1"],
        ["evalsha", ACQUIRE_SHA, "3"],
    ]
    ip_call, acquire = generating.commands
    assert ip_call[3] == IP_KEY
    # (principal, model): another bucket than the listing's (principal), same layout.
    model_requests, model_tokens, refunded = acquire[3:6]
    assert model_requests.endswith(":requests-60s")
    assert model_tokens.endswith(":tokens-60s")
    assert _tag(model_requests) == _tag(model_tokens) not in (_tag(requests_key), _tag(IP_KEY))
    assert acquire[6:12] == ["60", "60000", "1", "1000000", "60000", str(estimate)]
    assert refunded == model_tokens  # only the token limit moves
    assert int(acquire[13]) == usage - estimate  # the warm-up's reservation -> real usage
    assert int(acquire[13]) < 0

    # INFO commandstats agrees: 2 script calls each; the rest ran inside the scripts.
    assert listed_stats.get("evalsha") == 2
    assert generated_stats.get("evalsha") == 2
    for stats in (listed_stats, generated_stats):
        ours = ("evalsha", "info", "config|resetstat", "monitor", "echo")  # and the test's
        others = {c for c in stats if c not in ours}
        assert others <= {"time", "hmget", "hget", "hset", "pexpire"}, stats
    assert {c[0] for c in generating.in_scripts} <= {"time", "hmget", "hget", "hset", "pexpire"}
