"""Authentication refusals: each knows its HTTP status, its RFC 6750 error code and a fixed,
input-free description (RFC 6750 §3: no quote, backslash or control characters)."""

from __future__ import annotations

from gemini_scale.errors import GeminiScaleError


class AuthError(GeminiScaleError):
    """A request was refused by authentication. Never carries the credential itself."""

    status_code: int = 401
    error: str | None = "invalid_token"
    """RFC 6750 error code for ``WWW-Authenticate`` (``None``: a bare challenge)."""
    reason: str = "invalid_token"
    """Why, for metrics and logs: a fixed word, never input."""

    def __init__(self, description: str = "The access token is invalid.") -> None:
        super().__init__(description)
        self.description = description


class MissingCredentialsError(AuthError):
    """No credential was sent, or one in a scheme we do not accept: a bare challenge (401)."""

    error = None
    reason = "missing_credentials"

    def __init__(self, description: str = "Authentication is required.") -> None:
        super().__init__(description)


class InvalidRequestError(AuthError):
    """The credential was sent malformed or more than once (400 ``invalid_request``)."""

    status_code = 400
    error = "invalid_request"
    reason = "invalid_request"

    def __init__(self, description: str = "The authorization request is malformed.") -> None:
        super().__init__(description)


class InvalidTokenError(AuthError):
    """The token is expired, revoked, malformed or not for us (401 ``invalid_token``)."""


class InsufficientScopeError(AuthError):
    """The token lacks a scope the route requires (403 ``insufficient_scope``)."""

    status_code = 403
    error = "insufficient_scope"
    reason = "insufficient_scope"

    def __init__(self, required: frozenset[str]) -> None:
        super().__init__("The access token does not grant the required scope.")
        self.required = required


class IdentityProviderUnavailableError(AuthError):
    """Keys or introspection are unreachable and nothing usable is cached (503).

    The token may well be good, so this is not ``invalid_token``: clients should retry
    after ``retry_after`` seconds instead of discarding their token.
    """

    status_code = 503
    error = None
    reason = "identity_provider_unavailable"

    def __init__(
        self,
        description: str = "The identity provider is unavailable.",
        *,
        retry_after: int = 5,
    ) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)
