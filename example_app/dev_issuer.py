"""A built-in token issuer for demos and tests only (``GEMINI_SCALE_DEV_ISSUER=1``).

It mints short-lived RFC 9068 ``at+jwt`` access tokens signed with an ES256 key generated at
start-up (never stored), and publishes the key set and a discovery document so a resource
server can validate them like any identity provider's.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, TypeGuard

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gemini_scale import PayloadTooLargeError
from gemini_scale.errors import error_response

logger = logging.getLogger("example_app.dev_issuer")

DEV_ISSUER = "urn:gemini-scale:dev-issuer"
DEFAULT_SCOPES = ("gemini.generate", "gemini.read")
MAX_LIFETIME = 3600
DEFAULT_LIFETIME = 900
#: The largest ``POST /dev/token`` body read (a token request is a few hundred bytes).
MAX_REQUEST_BYTES = 16 * 1024
WARNING = (
    "GEMINI_SCALE_DEV_ISSUER is on: POST /dev/token mints access tokens for anyone. "
    "This is for demos only; never enable it in production."
)


def _is_text(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string that UTF-8 can encode: JSON's ``\\ud800`` escapes
    decode to lone surrogates, which no token can carry."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class DevIssuer:
    """Mints tokens with a key generated at construction."""

    def __init__(self, *, audience: str, issuer: str = DEV_ISSUER) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = ECKey.generate_key(
            "P-256",
            parameters={"kid": secrets.token_urlsafe(8), "use": "sig", "alg": "ES256"},
            private=True,
        )
        self.key_set = KeySet([self.key])

    def jwks(self) -> dict[str, Any]:
        """The public key set (RFC 7517)."""
        return {"keys": [self.key.as_dict(private=False)]}

    def mint(
        self,
        *,
        subject: str = "dev-user",
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
        tenant: str | None = None,
        lifetime: int = DEFAULT_LIFETIME,
        now: float | None = None,
    ) -> str:
        """An ``at+jwt`` access token for ``subject`` with ``scopes``."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "client_id": "gemini-scale-dev",
            "scope": " ".join(scopes),
            "iat": issued,
            "nbf": issued,
            "exp": issued + lifetime,
            "jti": secrets.token_urlsafe(12),
        }
        if tenant:
            claims["tenant"] = tenant
        header = {"alg": "ES256", "typ": "at+jwt", "kid": self.key.kid}
        return jwt.encode(header, claims, self.key)

    def install(self, app: Starlette) -> None:
        """Add ``POST /dev/token``, ``GET /dev/jwks.json`` and the discovery documents."""
        app.add_route("/dev/token", self._token, methods=["POST"], include_in_schema=False)
        app.add_route("/dev/jwks.json", self._jwks, methods=["GET"], include_in_schema=False)
        for name in ("openid-configuration", "oauth-authorization-server"):
            app.add_route(
                f"/dev/.well-known/{name}",
                self._discovery,
                methods=["GET"],
                include_in_schema=False,
            )

    async def _token(self, request: Request) -> Response:
        raw = await _small_body(request)
        if raw is None:  # anyone may call this: read no more than a token request needs
            return PayloadTooLargeError(MAX_REQUEST_BYTES).response()
        try:
            params = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            return error_response(400, "Invalid JSON payload received.")
        if not isinstance(params, dict):
            return error_response(400, "The body must be a JSON object.")
        scope = params.get("scope", " ".join(DEFAULT_SCOPES))
        subject = params.get("sub", "dev-user")
        tenant = params.get("tenant")
        lifetime = params.get("expires_in", DEFAULT_LIFETIME)
        if (
            not _is_text(scope)
            or not _is_text(subject)
            or not 0 < len(subject) <= 200
            or (tenant is not None and not _is_text(tenant))
            or not isinstance(lifetime, int)
            or isinstance(lifetime, bool)
            or not 0 < lifetime <= MAX_LIFETIME
        ):
            return error_response(
                400,
                'Expected {"scope": str, "sub": str, "tenant": str, '
                f'"expires_in": 1..{MAX_LIFETIME}}}.',
            )
        scopes = tuple(scope.split())
        token = self.mint(subject=subject, scopes=scopes, tenant=tenant, lifetime=lifetime)
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": " ".join(scopes),
            },
            headers={"cache-control": "no-store"},
        )

    async def _jwks(self, request: Request) -> Response:
        return JSONResponse(self.jwks(), headers={"cache-control": "public, max-age=300"})

    async def _discovery(self, request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{base}/dev/jwks.json",
                "token_endpoint": f"{base}/dev/token",
                "grant_types_supported": ["client_credentials"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "token_endpoint_auth_methods_supported": ["none"],
            }
        )


async def _small_body(request: Request) -> bytes | None:
    """The request body, or ``None`` once it is longer than :data:`MAX_REQUEST_BYTES`
    (declared or sent): the rest is not read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and len(declared) <= 20 and int(declared) > MAX_REQUEST_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            return None
    return bytes(body)
