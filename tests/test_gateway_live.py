"""The example gateway under a real uvicorn server: streaming is unbuffered end to end,
a client disconnect cancels the upstream, and caller credentials never go upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from example_app.standin import ReceivedRequest, StreamGate, create_standin
from tests.gateway import build, dev_token, running
from tests.servers import serve
from tests.sse import sse_events

pytestmark = pytest.mark.slow

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "Stream a long story please"}]}]}
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


@asynccontextmanager
async def authorized(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a dev token minted by the running gateway."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        client.headers["authorization"] = f"Bearer {await dev_token(client)}"
        yield client


async def test_the_first_chunk_arrives_before_the_upstream_has_finished() -> None:
    gate = StreamGate(after=1)  # the stand-in sends chunk 1, then waits for release()
    with serve(build(standin=create_standin(gate=gate))) as server:
        async with (
            authorized(server.url) as client,
            client.stream("POST", STREAM, json=PROMPT) as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_raw()
            first = await anext(chunks)
            # We hold chunk 1 while the upstream is still blocked mid-stream.
            assert not gate.released
            assert first.startswith(b"data: ")
            assert await gate.held(within=5)
            gate.release()
            rest = b"".join([chunk async for chunk in chunks])
    events = sse_events(first + rest)
    assert len(events) >= 2
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert gate.outcomes == ["completed"]


async def test_a_client_disconnect_cancels_the_upstream_stream() -> None:
    gate = StreamGate(after=1)
    with serve(build(standin=create_standin(gate=gate))) as server:
        async with (
            authorized(server.url) as client,
            client.stream("POST", STREAM, json=PROMPT) as response,
        ):
            await anext(response.aiter_raw())
            assert await gate.held(within=5)
        # Leaving the block closes the connection mid-stream.
        assert await gate.ended(within=5)
        gate.release()
    assert gate.outcomes == ["cancelled"]


async def test_caller_credentials_never_reach_the_upstream() -> None:
    received: list[ReceivedRequest] = []
    app = build(standin=create_standin(received=received))
    async with running(app) as client:
        token = client.headers["authorization"].removeprefix("Bearer ")
        response = await client.post(
            "/v1/models/gemini-2.5-flash:generateContent?key=caller-key&alt=json",
            json=PROMPT,
            headers={
                "x-goog-api-key": "caller-key",
                "cookie": "session=caller",
                "x-user-id": "admin",
            },
        )
    assert response.status_code == 200
    (seen,) = received
    assert token not in repr(seen)
    assert seen.header("x-user-id") is None
    assert seen.header("authorization") is None
    assert seen.header("x-goog-api-key") is None
    assert seen.header("cookie") is None
    assert all(name != "key" for name, _ in seen.query)
    assert "caller" not in repr(seen)


async def test_the_server_key_is_sent_upstream_and_never_returned() -> None:
    upstream = create_standin(api_keys=["server-key-1", "server-key-2"])
    with serve(upstream) as server:
        app = build(
            {"GEMINI_API_KEY": "server-key-1,server-key-2", "GEMINI_SCALE_UPSTREAM_URL": server.url}
        )
        async with running(app) as client:
            answers = [
                await client.post(
                    "/v1/models/gemini-2.5-flash:countTokens",
                    json=PROMPT,
                    headers={"x-goog-api-key": "wrong-caller-key"},
                )
                for _ in range(4)
            ]
    for answer in answers:
        assert answer.status_code == 200  # the stand-in refuses any key but the server's
        assert "server-key" not in answer.text
        assert all("server-key" not in value for value in answer.headers.values())
