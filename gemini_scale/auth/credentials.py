"""Finding the request's credential, per RFC 6750 and Google's API-key header.

Exactly one credential, in exactly one place: the ``Authorization: Bearer`` header, or (when
API keys are on) ``x-goog-api-key``. Tokens in the query string are never read (RFC 6750 §2.3,
security.md A08); a token in two places, or a repeated header, is ``invalid_request``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

from gemini_scale.auth.errors import (
    InvalidRequestError,
    InvalidTokenError,
    MissingCredentialsError,
)
from gemini_scale.types import Scope

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_QUERY_TOKEN = re.compile(rb"(?:^|&)access_token=")
_FORM_TYPE = b"application/x-www-form-urlencoded"
#: Form bodies are read (to refuse a second token) only up to this size.
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Credential:
    """What the caller presented. ``repr`` never shows the secret."""

    kind: Literal["bearer", "api_key"]
    value: str

    def __repr__(self) -> str:
        return f"Credential(kind={self.kind!r}, value=<{len(self.value)} chars>)"


def _headers(scope: Scope, name: bytes) -> list[bytes]:
    return [bytes(value) for key, value in scope["headers"] if key.lower() == name]


def is_form(scope: Scope) -> bool:
    """Whether the body is form-encoded (where RFC 6750 §2.2 allows a second token)."""
    for value in _headers(scope, b"content-type"):
        return value.split(b";", 1)[0].strip().lower() == _FORM_TYPE
    return False


def form_has_token(body: bytes) -> bool:
    """Whether a form body carries ``access_token``."""
    return any(key == "access_token" for key, _ in parse_qsl(body.decode("latin-1")))


def extract_credential(scope: Scope, *, api_keys: bool, max_token_bytes: int) -> Credential:
    """The one credential of the request, or an :class:`AuthError` saying why not.

    A query-string token is never *read*, but one next to a header token is refused as a
    second method (RFC 6750 §2, A06). The caller checks a form body separately.
    """
    authorization = _headers(scope, b"authorization")
    if len(authorization) > 1:
        raise InvalidRequestError("The Authorization header was sent more than once.")
    if authorization:
        token = _bearer_token(authorization[0], max_token_bytes)
        if _QUERY_TOKEN.search(scope.get("query_string", b"")):
            raise InvalidRequestError("The access token was sent by more than one method.")
        return Credential("bearer", token)
    if api_keys:
        keys = _headers(scope, b"x-goog-api-key")
        if len(keys) > 1:
            raise InvalidRequestError("The x-goog-api-key header was sent more than once.")
        if keys:
            key = keys[0].strip()
            if not key or len(key) > max_token_bytes or not key.isascii():
                raise InvalidTokenError("The API key is invalid.")
            return Credential("api_key", key.decode("ascii"))
    raise MissingCredentialsError()


def _bearer_token(raw: bytes, max_token_bytes: int) -> str:
    scheme, _, rest = raw.strip(b" \t").partition(b" ")
    if scheme.lower() != b"bearer":
        # Another scheme (Basic, DPoP, "Bearer-invalid"): no error details (RFC 6750 §3.1).
        raise MissingCredentialsError()
    token = rest.strip(b" ")
    if not token:
        raise InvalidRequestError("The Bearer credential is empty.")
    if len(token) > max_token_bytes:
        raise InvalidTokenError("The access token is too large.")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidTokenError("The access token is malformed.")
    return token.decode("ascii")
