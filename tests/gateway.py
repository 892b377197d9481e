"""Helpers to run the example gateway in-process with its lifespan."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from example_app.app import create_app
from gemini_scale import StreamingASGITransport, load_settings

DEV_ENV: Mapping[str, str] = {"GEMINI_SCALE_DEV_ISSUER": "1"}


def build(env: Mapping[str, str] | None = None, **kwargs: Any) -> FastAPI:
    return create_app(load_settings({**DEV_ENV, **(env or {})}), **kwargs)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered, and an httpx client that streams from it."""
    async with app.router.lifespan_context(app):
        transport = StreamingASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def dev_token(client: httpx.AsyncClient, scope: str = "gemini.generate gemini.read") -> str:
    response = await client.post("/dev/token", json={"scope": scope})
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
