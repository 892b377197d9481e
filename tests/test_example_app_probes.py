"""Probes and scrapes (``/healthz``, ``/readyz``, ``/metrics``) pass both rate limiters of the
example gateway: never 429, and never counted against a client's quota."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gemini_scale import StreamingASGITransport
from tests.gateway import build, dev_token, lifespan

PROBES = ("/healthz", "/readyz", "/metrics")
#: Far fewer requests than the probes below send.
LIMITS = {"GEMINI_SCALE_RATE_LIMIT": "2/hour", "GEMINI_SCALE_IP_RATE_LIMIT": "4/hour"}


def client_at(app: FastAPI, host: str) -> httpx.AsyncClient:
    transport = StreamingASGITransport(app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10)


async def probe_everything(client: httpx.AsyncClient, rounds: int = 10) -> None:
    for _ in range(rounds):
        for path in PROBES:
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert "ratelimit" not in response.headers


async def test_probes_and_scrapes_are_never_rate_limited_nor_counted() -> None:
    app = build(LIMITS, registry=CollectorRegistry())
    async with lifespan(app), client_at(app, "192.0.2.10") as client:
        await probe_everything(client)
        # The address's quota is untouched: the principal limiter (keyed on the address on
        # a public route) still has both of its requests, then refuses.
        statuses = [(await client.get("/openapi.json")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        await probe_everything(client)  # and a spent quota does not stop the probes


async def test_probes_do_not_spend_a_principals_quota() -> None:
    app = build(LIMITS, registry=CollectorRegistry())
    async with lifespan(app), client_at(app, "192.0.2.11") as client:
        client.headers["authorization"] = f"Bearer {await dev_token(client)}"  # 1 per-IP
        await probe_everything(client)
        statuses = [(await client.get("/v1beta/models")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]  # the principal's 2/hour, untouched by the probes
        ip_quota = await client.get("/v1beta/models/gemini-2.5-flash")
        assert ip_quota.status_code == 429  # the address's 4th: 4/hour, untouched too
        assert "4 per 3600s per client_ip" in ip_quota.json()["error"]["message"]
