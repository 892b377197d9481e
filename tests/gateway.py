"""Helpers to run the example gateway in-process with its lifespan."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from example_app.app import create_app
from gemini_scale import StreamingASGITransport, load_settings
from gemini_scale.types import ASGIApp, Message

DEV_ENV: Mapping[str, str] = {"GEMINI_SCALE_DEV_ISSUER": "1"}


def build(env: Mapping[str, str] | None = None, **kwargs: Any) -> FastAPI:
    return create_app(load_settings({**DEV_ENV, **(env or {})}), **kwargs)


@asynccontextmanager
async def running(
    app: FastAPI, *, scope: str | None = "gemini.generate gemini.read"
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered, and an httpx client that streams from it,
    carrying a dev token for ``scope`` (``None``: no credential)."""
    async with lifespan(app):
        transport = StreamingASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            if scope is not None:
                client.headers["authorization"] = f"Bearer {await dev_token(client, scope)}"
            yield client


async def dev_token(client: httpx.AsyncClient, scope: str = "gemini.generate gemini.read") -> str:
    response = await client.post("/dev/token", json={"scope": scope})
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan *through its middleware stack*, as a server does."""
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    outgoing: asyncio.Queue[Message] = asyncio.Queue()

    async def receive() -> Message:
        return await incoming.get()

    async def send(message: Message) -> None:
        await outgoing.put(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        await incoming.put({"type": "lifespan.startup"})
        started = await asyncio.wait_for(outgoing.get(), 10)
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(started.get("message", "startup failed"))
        yield
        await incoming.put({"type": "lifespan.shutdown"})
        stopped = await asyncio.wait_for(outgoing.get(), 10)
        assert stopped["type"] == "lifespan.shutdown.complete", stopped
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
