"""A fake identity provider behind ``httpx.MockTransport``: JWKS, discovery, introspection.

``FakeIdP`` serves one issuer's host. Each path's answer is scriptable (status, body, content
type, headers, a delay, a hang, a gate to hold requests until released, a transport error)
and every request is counted. ``FakeNetwork`` routes by host to several IdPs and records
*every* request, including ones to hosts nobody serves, so tests can assert "zero requests".
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

from tests.auth.tokens import ISSUER, Signer, jwks

OAUTH_METADATA = "/.well-known/oauth-authorization-server"
OIDC_METADATA = "/.well-known/openid-configuration"


@dataclass
class Behaviour:
    """How a path answers. ``body=None`` means the IdP's normal document."""

    status: int = 200
    body: Any = None
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    delay: float = 0.0
    hang: bool = False
    gate: asyncio.Event | None = None
    error: type[Exception] | None = None


class FakeIdP:
    """One issuer: ``/jwks``, both metadata documents and ``/introspect``."""

    def __init__(self, issuer: str = ISSUER, *, signers: tuple[Signer, ...] = (),
                 jwks_cache_control: str | None = None) -> None:
        self.issuer = issuer
        parts = urlsplit(issuer)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        path = parts.path.rstrip("/")
        # RFC 8414 §3.1 inserts the well-known segment before the issuer's path; OIDC appends.
        self.oauth_metadata_path = OAUTH_METADATA + path
        self.oidc_metadata_path = path + OIDC_METADATA
        self.jwks_url = f"{self.origin}/jwks"
        self.introspection_url = f"{self.origin}/introspect"
        self.document: dict[str, Any] = jwks(*signers)
        self.jwks_cache_control = jwks_cache_control
        self.metadata: dict[str, Any] = {
            "issuer": issuer,
            "jwks_uri": self.jwks_url,
            "introspection_endpoint": self.introspection_url,
        }
        self.behaviours: dict[str, Behaviour] = {}
        self.hits: Counter[str] = Counter()
        self.introspection: dict[str, dict[str, Any]] = {}

    def set_signers(self, *signers: Signer) -> None:
        self.document = jwks(*signers)

    def script(self, path: str, **behaviour: Any) -> None:
        """Answer ``path`` this way from now on (``reset`` undoes it)."""
        self.behaviours[path] = Behaviour(**behaviour)

    def reset(self, path: str | None = None) -> None:
        if path is None:
            self.behaviours.clear()
        else:
            self.behaviours.pop(path, None)

    @property
    def jwks_hits(self) -> int:
        return self.hits["/jwks"]

    def _default(self, request: httpx.Request) -> tuple[int, Any, dict[str, str]]:
        path = request.url.path
        if path == "/jwks":
            headers = {}
            if self.jwks_cache_control is not None:
                headers["cache-control"] = self.jwks_cache_control
            return 200, self.document, headers
        if path in (self.oauth_metadata_path, self.oidc_metadata_path):
            return 200, self.metadata, {}
        if path == "/introspect" and request.method == "POST":
            form = dict(parse_qsl(request.content.decode()))
            return 200, self.introspection.get(form.get("token", ""), {"active": False}), {}
        return 404, {"error": "not_found"}, {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hits[path] += 1
        behaviour = self.behaviours.get(path, Behaviour())
        if behaviour.gate is not None:
            await behaviour.gate.wait()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.hang:
            await asyncio.Event().wait()
        if behaviour.error is not None:
            raise behaviour.error("scripted failure", request=request)  # type: ignore[call-arg]
        status, body, headers = self._default(request)
        if behaviour.body is not None or behaviour.status != 200:
            status, body = behaviour.status, behaviour.body if behaviour.body is not None else body
        headers = {**headers, **(behaviour.headers or {})}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(
            status, content=content, headers={"content-type": behaviour.content_type, **headers}
        )


class FakeNetwork:
    """Routes requests by host to fake IdPs; unknown hosts refuse the connection."""

    def __init__(self, *idps: FakeIdP) -> None:
        self.idps = {idp.host: idp for idp in idps}
        self.requests: list[httpx.Request] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        idp = self.idps.get(request.url.netloc.decode())
        if idp is None:
            raise httpx.ConnectError("connection refused", request=request)
        return await idp.handle(request)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    @property
    def urls(self) -> list[str]:
        return [str(request.url) for request in self.requests]
