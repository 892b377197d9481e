"""When a token reservation is settled: before the answer's last byte reaches the client,
not when the app returns. Layers inside the limiter may go on working after the client has
its answer (a cache storing it in Redis); a client that waits for each answer must find its
refund in place for its next call, not a budget still holding the last estimate."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gemini_scale import RateLimitMiddleware, RateLimitPolicy
from gemini_scale.types import Message, Receive, Scope, Send
from tests.cache.support import http_scope
from tests.ratelimit.conftest import Backend
from tests.ratelimit.helpers import GENERATE, FakeAuth, who

ANSWER = json.dumps({
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}],
    "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 32,
                      "totalTokenCount": 35},
}).encode()
#: Each call reserves about 1024 + a few tokens (no maxOutputTokens) and uses 35: two
#: reservations at once do not fit in 2000, a reservation beside a settled call does.
BUDGET = RateLimitPolicy.parse("100/minute", tokens="2000/minute")


class LingeringApp:
    """Answers ``ANSWER``, then (on its first call) stays busy until ``released``: the work
    a cache does after the client has the answer."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": ANSWER})
        if self.calls == 1:
            await self.released.wait()


async def _request(app: Any, answered: asyncio.Event | None = None) -> int:
    """One generateContent call; its status. ``answered`` is set when the last byte of
    the answer arrives."""
    body = json.dumps({"contents": [{"parts": [{"text": "hello"}]}]}).encode()
    status = 0
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False) and answered is not None:
            answered.set()

    scope = http_scope("POST", GENERATE, headers=who("alice"), body=body)
    await app(scope, receive, send)
    return status


async def test_a_client_that_waits_for_its_answer_finds_its_refund_in_place(
    backend: Backend,
) -> None:
    inner = LingeringApp()
    clock: Any = {"clock": backend.clock} if backend.clock is not None else {}  # Redis: its own
    app = FakeAuth(RateLimitMiddleware(inner, store=backend.store(), default=BUDGET, **clock))
    answered = asyncio.Event()
    first = asyncio.create_task(_request(app, answered))
    await asyncio.wait_for(answered.wait(), 5)
    # The client has its whole answer while the layer inside is still busy: its next call.
    assert await asyncio.wait_for(_request(app), 5) == 200
    inner.released.set()
    assert await asyncio.wait_for(first, 5) == 200
    assert inner.calls == 2

