"""The example gateway served under a root path (``uvicorn --root-path``, behind a proxy that
strips it): Gemini calls go upstream on their own path, never on one built from the root."""

from __future__ import annotations

import httpx

from tests.gateway import build
from tests.servers import serve
from tests.test_gateway_cache import MODEL, CountingStandin, prompt


async def test_calls_under_a_root_path_go_upstream_on_their_own_path() -> None:
    standin = CountingStandin()
    with serve(build(standin=standin), root_path="/gw") as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as client:
            token = await client.post(
                "/dev/token", json={"scope": "gemini.generate gemini.read"}
            )
            client.headers["authorization"] = f"Bearer {token.json()['access_token']}"
            generated = await client.post(
                f"/v1beta/models/{MODEL}:generateContent", json=prompt()
            )
            downgraded = await client.post(f"/v1/models/{MODEL}:countTokens", json=prompt())
            listed = await client.get("/v1beta/models")
            described = await client.get(f"/v1beta/models/{MODEL}")
    assert [r.status_code for r in (generated, downgraded, listed, described)] == [200] * 4
    assert standin.calls == [
        f"/v1beta/models/{MODEL}:generateContent",
        f"/v1beta/models/{MODEL}:countTokens",  # the head serves every version
        "/v1beta/models",
        f"/v1beta/models/{MODEL}",
    ]
