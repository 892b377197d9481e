"""The verified principal as Starlette's ``request.user`` and ``request.auth``."""

from __future__ import annotations

from starlette.authentication import AuthCredentials, BaseUser

from gemini_scale.principal import Principal


class PrincipalUser(BaseUser):
    """``request.user`` for a verified caller; ``principal`` holds everything we know."""

    __slots__ = ("principal",)

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.principal.subject

    @property
    def identity(self) -> str:
        return self.principal.key


def auth_credentials(principal: Principal) -> AuthCredentials:
    """``request.auth``: the granted scopes, so Starlette's ``requires()`` works."""
    return AuthCredentials(sorted(principal.scopes))
