"""``exempt``: paths a limiter neither limits nor counts (probes, metrics scrapes)."""

from __future__ import annotations

import pytest

from gemini_scale import IPRateLimitMiddleware, RateLimitMiddleware, RateLimitPolicy
from gemini_scale.types import Receive, Scope, Send
from tests.cache.support import FakeAuth, call, who


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("per_address", [False, True])
async def test_an_exempt_path_is_neither_limited_nor_counted(per_address: bool) -> None:
    exempt = ["/healthz", "/internal/"]  # one path, and everything under a prefix
    limiter = (
        IPRateLimitMiddleware(_ok, limit="2/minute", exempt=exempt) if per_address
        else RateLimitMiddleware(_ok, default=RateLimitPolicy.parse("2/minute"), exempt=exempt)
    )
    app = FakeAuth(limiter)
    probes = [await call(app, "GET", path, headers=who("alice"))
              for path in ("/healthz", "/internal/a", "/internal/b") * 3]
    assert {answer.status for answer in probes} == {200}
    assert all("ratelimit" not in answer.headers for answer in probes)
    statuses = [(await call(app, "GET", "/x", headers=who("alice"))).status for _ in range(3)]
    assert statuses == [200, 200, 429]  # the quota is whole
