"""What the middleware needs from a credential verifier."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gemini_scale.principal import Principal


@runtime_checkable
class TokenVerifier(Protocol):
    """Turns a bearer token into a verified :class:`Principal`.

    Raises :class:`~gemini_scale.auth.errors.InvalidTokenError` for a bad token and
    :class:`~gemini_scale.auth.errors.IdentityProviderUnavailableError` when the decision
    cannot be made safely. Never logs or echoes the token.
    """

    async def verify(self, token: str) -> Principal:
        """The principal of ``token``."""
        ...

    async def aclose(self) -> None:
        """Release HTTP clients the verifier created itself."""
        ...
