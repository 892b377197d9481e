"""Authorization server metadata discovery (RFC 8414, then OpenID Connect Discovery 1.0).

:class:`Discovery` fetches an issuer's metadata once, lazily, with one request in flight at a
time, and keeps it. The document's ``issuer`` must equal ours exactly (RFC 8414 §3.3), which
is what makes its ``jwks_uri`` a source of keys *for that issuer* (RFC 8725 §3.8).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from gemini_scale.auth.errors import IdentityProviderUnavailableError
from gemini_scale.auth.jwks import (
    RETRY_AFTER_FAILURE,
    DocumentError,
    cancel_task,
    fetch_json,
    shielded,
)
from gemini_scale.errors import ConfigurationError
from gemini_scale.types import Clock

if TYPE_CHECKING:
    import httpx

__all__ = ["Discovery", "ProviderMetadata", "metadata_urls"]

logger = logging.getLogger("gemini_scale.auth")


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What we use of an authorization server's metadata."""

    issuer: str
    jwks_uri: str
    introspection_endpoint: str | None
    document: Mapping[str, Any]
    """The whole (read-only) metadata document."""


def metadata_urls(issuer: str) -> tuple[str, str]:
    """The RFC 8414 and OIDC metadata URLs of ``issuer``, in the order they are tried.

    RFC 8414 §3.1 inserts the well-known segment between host and path; OIDC Discovery §4
    appends it to the issuer. Raises ``ConfigurationError`` when ``issuer`` is not an
    ``http(s)`` URL without query or fragment (RFC 8414 §2).
    """
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigurationError(
            "discovery needs an https:// issuer without query or fragment; "
            "otherwise give Issuer(jwks_url=...) or Issuer(jwks=...)"
        )
    path = parts.path.rstrip("/")
    oauth = "/.well-known/oauth-authorization-server" + path
    oidc = path + "/.well-known/openid-configuration"
    return (
        urlunsplit((parts.scheme, parts.netloc, oauth, "", "")),
        urlunsplit((parts.scheme, parts.netloc, oidc, "", "")),
    )


def _endpoint(value: object, *, https_only: bool) -> str | None:
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    allowed = ("https",) if https_only else ("https", "http")
    return value if parts.scheme in allowed and parts.netloc else None


class Discovery:
    """Fetches and keeps one issuer's metadata.

    Failures raise :class:`IdentityProviderUnavailableError`; after one, the next attempt
    waits ``RETRY_AFTER_FAILURE`` seconds so a dead IdP is not hammered.
    """

    def __init__(
        self,
        issuer: str,
        *,
        client: Callable[[], httpx.AsyncClient],
        clock: Clock,
        fetch_timeout: float = 5.0,
        max_bytes: int = 512 * 1024,
    ) -> None:
        self.issuer = issuer
        self.urls = metadata_urls(issuer)
        self._client = client
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._max_bytes = max_bytes
        self._metadata: ProviderMetadata | None = None
        self._inflight: asyncio.Task[ProviderMetadata | None] | None = None
        self._retry_at = -math.inf
        self.fetches = 0
        """Metadata documents requested."""

    async def metadata(self) -> ProviderMetadata:
        """The issuer's metadata, fetched on first use."""
        if self._metadata is not None:
            return self._metadata
        task = self._inflight
        if task is not None and task.get_loop() is not asyncio.get_running_loop():
            self._inflight = None  # left behind by an event loop that is gone
        if self._inflight is None:
            wait = self._retry_at - self._clock.monotonic()
            if wait > 0:
                raise self._unavailable(wait)
            self._inflight = asyncio.get_running_loop().create_task(self._discover())
            self._inflight.add_done_callback(self._done)
        found = await shielded(self._inflight, default=None)
        if found is None:
            raise self._unavailable(self._retry_at - self._clock.monotonic())
        return found

    async def jwks_uri(self) -> str:
        """The ``jwks_uri`` of the issuer."""
        return (await self.metadata()).jwks_uri

    async def aclose(self) -> None:
        """Cancel a fetch in flight."""
        task, self._inflight = self._inflight, None
        await cancel_task(task)

    def _done(self, task: asyncio.Task[ProviderMetadata | None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved by the waiters; avoid "never retrieved" noise

    def _unavailable(self, wait: float) -> IdentityProviderUnavailableError:
        return IdentityProviderUnavailableError(
            "The identity provider's metadata is unavailable.",
            retry_after=max(1, math.ceil(wait)),
        )

    async def _discover(self) -> ProviderMetadata | None:
        reasons: list[str] = []
        for url in self.urls:
            self.fetches += 1
            try:
                document = await fetch_json(
                    self._client(), url, time_limit=self._fetch_timeout, max_bytes=self._max_bytes
                )
                self._metadata = self._validate(document.body)
            except DocumentError as exc:
                reasons.append(str(exc))
                continue
            return self._metadata
        self._retry_at = self._clock.monotonic() + RETRY_AFTER_FAILURE
        logger.warning("metadata discovery failed: %s", "; ".join(reasons))
        return None

    def _validate(self, document: object) -> ProviderMetadata:
        if not isinstance(document, dict):
            raise DocumentError("the metadata is not a JSON object")
        if document.get("issuer") != self.issuer:
            raise DocumentError("the metadata names another issuer")
        # An https issuer must not hand out keys over plain http.
        https_only = self.issuer.startswith("https:")
        jwks_uri = _endpoint(document.get("jwks_uri"), https_only=https_only)
        if jwks_uri is None:
            raise DocumentError("the metadata has no usable jwks_uri")
        return ProviderMetadata(
            issuer=self.issuer,
            jwks_uri=jwks_uri,
            introspection_endpoint=_endpoint(
                document.get("introspection_endpoint"), https_only=https_only
            ),
            document=MappingProxyType(document),
        )
