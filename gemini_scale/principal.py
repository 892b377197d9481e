"""The verified caller of a request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who is calling, as established by a verified credential.

    Built by the OAuth middleware from a JWT, an introspection answer or an API key; read by
    rate limiting and caching to key their state, and by the app through
    ``request.state.principal``.
    """

    issuer: str
    """The ``iss`` of the credential (or a fixed name for API keys)."""
    subject: str
    """The ``sub``: the user or service account."""
    client_id: str | None = None
    """The OAuth client (``client_id`` or ``azp``)."""
    tenant: str | None = None
    """The tenant, from a configurable claim."""
    scopes: frozenset[str] = frozenset()
    """Granted scopes (``scope`` string or ``scp`` list)."""
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """All claims of the credential, for the app's own decisions."""

    @property
    def key(self) -> str:
        """A stable identity string, unique across issuers: ``<issuer>|<subject>``."""
        return f"{self.issuer}|{self.subject}"

    def has_scopes(self, *required: str) -> bool:
        """Whether every one of ``required`` was granted."""
        return self.scopes.issuperset(required)
