"""Opaque access tokens checked by OAuth 2.0 token introspection (RFC 7662).

:class:`IntrospectionValidator` asks the authorization server about each token it has not
seen recently and turns an ``active`` answer into a :class:`~gemini_scale.principal.Principal`.

Decisions:

* **What counts as active.** The answer must be a JSON object whose ``active`` is the boolean
  ``true`` (RFC 7662 §2.2); ``"true"``, ``1`` or a missing member are refusals. Then ``exp``
  (if present) must be in the future with **no leeway**: the server just said the token is
  active, so ``exp`` is only rechecked because answers are cached. ``nbf`` and ``iat`` are
  left to the server for the same reason. ``iss``, if present, must equal ``issuer``;
  ``aud`` must contain a configured audience (and is then required); ``token_type`` must
  not name a refresh token.
* **Who the caller is.** ``sub`` is required. There is no fallback to ``username``: RFC 7662
  calls it a "human-readable identifier", which may be renamed or reused, and rate limits
  and caches are keyed on the subject.
* **Scopes** come from the space-delimited ``scope`` string only (RFC 6749 §3.3); any other
  shape grants no scope.
* **Failures.** A refused token raises :class:`~gemini_scale.auth.errors.InvalidTokenError`
  (401), and so does a member of the wrong type, or a token that is not an RFC 6750
  ``b64token`` (refused without a call). An answer we cannot use (timeout, connection error,
  any status but 200, redirects included, not a strict JSON object, larger than
  ``max_response_bytes``) raises
  :class:`~gemini_scale.auth.errors.IdentityProviderUnavailableError` (503 with
  ``Retry-After``): the token may be good, so the client should retry rather than discard it.
  Messages come from a fixed list; logs name the failure, never the token or the secret.
* **Caching** is keyed by the SHA-256 of the token, so tokens are never held in memory longer
  than a request. Active answers are kept until ``exp`` or ``positive_ttl``, whichever comes
  first, trading revocation latency for load (RFC 7662 §4); refusals for ``negative_ttl``,
  so one token polled in a loop costs one call per ``negative_ttl`` (token fishing, §4).
  Answers and refusals live in separate LRUs of ``cache_size`` entries each, so a flood of
  junk tokens cannot evict good ones. Unavailability is never cached. Fishing with *new*
  tokens is what the per-address rate limit in front of authentication is for.
* **Single flight.** Concurrent verifications of one token share one HTTP call.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import quote_plus

import anyio
import httpx

from gemini_scale.auth.errors import IdentityProviderUnavailableError, InvalidTokenError
from gemini_scale.auth.token_cache import BoundedLRU
from gemini_scale.errors import ConfigurationError
from gemini_scale.header_values import bounded_decimal
from gemini_scale.principal import Principal
from gemini_scale.types import SYSTEM_CLOCK, Clock

__all__ = ["IntrospectionValidator"]

logger = logging.getLogger("gemini_scale.auth.introspection")

AuthMethod = Literal["client_secret_basic", "client_secret_post"]
_AUTH_METHODS: frozenset[str] = frozenset({"client_secret_basic", "client_secret_post"})

#: RFC 6750 §2.1 ``b64token``: what a bearer token may look like at all. Anything else is
#: refused without asking the server.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN_LENGTH = 8192

#: Seconds a client is told to wait when the server cannot be asked.
_RETRY_AFTER = 5

_INACTIVE = "The access token is not active."
_EXPIRED = "The access token has expired."
_WRONG_ISSUER = "The access token was issued by an untrusted issuer."
_WRONG_AUDIENCE = "The access token is not intended for this service."
_WRONG_TYPE = "The access token is not an access token."
_NOT_B64TOKEN = "The access token is malformed."
_MALFORMED_ANSWER = "The introspection answer for the access token is unusable."
_UNAVAILABLE = "The token introspection endpoint is unavailable."

_LOOPBACK_NAMES = frozenset({"localhost"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_endpoint(endpoint: str) -> httpx.URL:
    """``endpoint`` as a URL: HTTPS, or plain HTTP to a loopback address (RFC 7662 §4)."""
    try:
        url = httpx.URL(endpoint)
    except httpx.InvalidURL as exc:
        raise ConfigurationError("The introspection endpoint is not a valid URL.") from exc
    if not url.host or url.scheme not in ("https", "http"):
        raise ConfigurationError("The introspection endpoint must be an absolute https:// URL.")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise ConfigurationError(
            "The introspection endpoint must use https:// (plain http:// is accepted only "
            "for loopback addresses): the client secret and tokens are sent to it."
        )
    if url.userinfo:
        raise ConfigurationError(
            "The introspection endpoint must not carry credentials; pass client_id and "
            "client_secret instead."
        )
    return url


def _audiences(audience: str | Sequence[str] | None) -> frozenset[str]:
    if audience is None:
        return frozenset()
    values = (audience,) if isinstance(audience, str) else tuple(audience)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigurationError("audience must be a non-empty string or list of strings.")
    return frozenset(values)


def _basic_credentials(client_id: str, client_secret: str) -> str:
    """``Authorization`` value for ``client_secret_basic``: both parts form-urlencoded first
    (RFC 6749 §2.3.1), so a ``:`` in the client id cannot shift the split."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _reject_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON (RFC 8259 §6); Python's parser accepts them by default.
    raise ValueError("non-finite number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A member given twice is ambiguous: parsers disagree on which copy wins.
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("duplicate member")
    return data


def _parse_answer(body: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or :class:`IdentityProviderUnavailableError`."""
    try:
        data = json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except (ValueError, RecursionError) as exc:
        logger.warning("Token introspection answered something that is not valid JSON.")
        raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER) from exc
    if not isinstance(data, dict):
        logger.warning("Token introspection answered JSON that is not an object.")
        raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER)
    return data


def _optional_str(data: Mapping[str, Any], name: str | None) -> str | None:
    if name is None:
        return None
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidTokenError(_MALFORMED_ANSWER)
    return value


def _scopes(value: object) -> frozenset[str]:
    if not isinstance(value, str):
        return frozenset()
    return frozenset(s for s in value.split(" ") if s)


def _expiry(data: Mapping[str, Any]) -> float | None:
    exp = data.get("exp")
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidTokenError(_MALFORMED_ANSWER)
    try:
        expiry = float(exp)  # an int past a float's range overflows: not a time either
    except OverflowError:
        raise InvalidTokenError(_MALFORMED_ANSWER) from None
    if not math.isfinite(expiry):
        raise InvalidTokenError(_MALFORMED_ANSWER)
    return expiry


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Active:
    principal: Principal
    exp: float | None
    """Wall-clock expiry of the token, rechecked on every hit."""
    until: float
    """Monotonic time the cache entry lapses."""


@dataclass(frozen=True, slots=True)
class _Refused:
    description: str
    until: float


_Entry = TypeVar("_Entry", _Active, _Refused)


def _unlapsed(cache: BoundedLRU[str, _Entry], key: str, now: float) -> _Entry | None:
    """The entry for ``key`` unless it lapsed (``now >= until``: then it is dropped)."""
    entry = cache.get(key)
    if entry is not None and now >= entry.until:
        cache.discard(key)
        return None
    return entry


class _Flight:
    """One introspection call in progress, awaited by every concurrent verifier of the token."""

    __slots__ = ("done", "error", "principal")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.principal: Principal | None = None
        self.error: InvalidTokenError | IdentityProviderUnavailableError | None = None


def _fresh(
    error: InvalidTokenError | IdentityProviderUnavailableError,
) -> InvalidTokenError | IdentityProviderUnavailableError:
    # Each waiter raises its own instance: one instance raised in many tasks would collect
    # all their tracebacks.
    if isinstance(error, IdentityProviderUnavailableError):
        return IdentityProviderUnavailableError(error.description, retry_after=error.retry_after)
    return InvalidTokenError(error.description)


class IntrospectionValidator:
    """A :class:`~gemini_scale.auth.base.TokenVerifier` that asks an RFC 7662 endpoint.

    Opens no connection when built; creates its own ``httpx.AsyncClient`` on first use unless
    ``http_client`` is given (and then :meth:`aclose` leaves that client alone).

    Args:
        endpoint: The introspection endpoint; ``https://`` (``http://`` only to loopback).
        client_id: This resource server's client id at the authorization server.
        client_secret: Its secret. Never logged.
        issuer: The expected ``iss``; also the issuer of the principals built.
        audience: When set, ``aud`` must be present and contain one of these.
        auth_method: ``client_secret_basic`` (HTTP Basic) or ``client_secret_post`` (form).
        http_client: A client to use instead of one of our own.
        clock: Time source (wall clock for ``exp``, monotonic for cache lifetimes).
        timeout: Seconds for the whole exchange with the endpoint.
        max_response_bytes: Larger answers are treated as a broken endpoint.
        positive_ttl: Longest time an active answer is reused (revocation latency).
        negative_ttl: How long a refusal is reused.
        cache_size: Entries in each of the active and refused caches; ``0`` disables caching.
        tenant_claim: The member naming the tenant, or ``None`` for no tenants.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        client_id: str,
        client_secret: str,
        issuer: str,
        audience: str | Sequence[str] | None = None,
        auth_method: AuthMethod = "client_secret_basic",
        http_client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
        timeout: float = 5.0,
        max_response_bytes: int = 64 * 1024,
        positive_ttl: float = 300.0,
        negative_ttl: float = 10.0,
        cache_size: int = 10_000,
        tenant_claim: str | None = "tenant",
    ) -> None:
        self._endpoint = _check_endpoint(endpoint)
        if not client_id or not client_secret:
            raise ConfigurationError("client_id and client_secret must both be non-empty.")
        if not issuer:
            raise ConfigurationError("issuer must be non-empty.")
        if auth_method not in _AUTH_METHODS:
            raise ConfigurationError(
                "auth_method must be 'client_secret_basic' or 'client_secret_post'."
            )
        if not timeout > 0:
            raise ConfigurationError("timeout must be a positive number of seconds.")
        if max_response_bytes <= 0:
            raise ConfigurationError("max_response_bytes must be positive.")
        if positive_ttl < 0 or negative_ttl < 0:
            raise ConfigurationError("positive_ttl and negative_ttl must not be negative.")
        if cache_size < 0:
            raise ConfigurationError("cache_size must not be negative.")
        if tenant_claim is not None and not tenant_claim:
            raise ConfigurationError("tenant_claim must be a claim name or None.")

        self._issuer = issuer
        self._audiences = _audiences(audience)
        self._headers = {"accept": "application/json"}
        self._form = {"token_type_hint": "access_token"}
        if auth_method == "client_secret_basic":
            self._headers["authorization"] = _basic_credentials(client_id, client_secret)
        else:
            self._form |= {"client_id": client_id, "client_secret": client_secret}
        self._client = http_client
        self._owns_client = http_client is None
        self._closed = False
        self._clock = clock
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        self._positive_ttl = positive_ttl
        self._negative_ttl = negative_ttl
        self._tenant_claim = tenant_claim
        self._active: BoundedLRU[str, _Active] = BoundedLRU(cache_size)
        self._refused: BoundedLRU[str, _Refused] = BoundedLRU(cache_size)
        self._flights: dict[str, _Flight] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={str(self._endpoint)!r}, issuer={self._issuer!r})"

    async def verify(self, token: str) -> Principal:
        """The principal of ``token``, from the cache or the introspection endpoint.

        Raises:
            InvalidTokenError: The token is malformed, inactive, expired or not for us.
            IdentityProviderUnavailableError: The endpoint could not give a usable answer.
        """
        if len(token) > _MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
            raise InvalidTokenError(_NOT_B64TOKEN)
        key = _token_hash(token)
        while True:
            cached = self._cached(key)
            if cached is not None:
                return cached
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.principal is not None:
                return flight.principal
            if flight.error is not None:
                raise _fresh(flight.error)
            # The caller that was asking got cancelled before an answer: ask again.

        flight = self._flights[key] = _Flight()
        try:
            flight.principal = await self._introspect(token, key)
        except (InvalidTokenError, IdentityProviderUnavailableError) as exc:
            flight.error = exc
            raise
        except Exception:
            # Never a 500, and never one call per waiter: they share this answer too.
            logger.exception("Token introspection failed unexpectedly.")
            flight.error = IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER)
            raise _fresh(flight.error) from None
        finally:
            del self._flights[key]
            flight.done.set()
        return flight.principal

    async def aclose(self) -> None:
        """Close the HTTP client if this validator created it."""
        self._closed = True
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _cached(self, key: str) -> Principal | None:
        """A cached principal, ``None`` on a miss; raises for a cached or lapsed refusal."""
        now = self._clock.monotonic()
        refused = _unlapsed(self._refused, key, now)
        if refused is not None:
            raise InvalidTokenError(refused.description)
        active = _unlapsed(self._active, key, now)
        if active is None:
            return None
        if active.exp is not None and active.exp <= self._clock.time():
            self._active.discard(key)
            raise InvalidTokenError(_EXPIRED)
        return active.principal

    async def _introspect(self, token: str, key: str) -> Principal:
        data = await self._ask(token)
        try:
            principal, exp = self._principal(data)
        except InvalidTokenError as exc:
            if self._negative_ttl > 0:
                until = self._clock.monotonic() + self._negative_ttl
                self._refused.put(key, _Refused(exc.description, until))
            raise
        lifetime = self._positive_ttl
        if exp is not None:
            lifetime = min(lifetime, exp - self._clock.time())
        if lifetime > 0:
            self._active.put(key, _Active(principal, exp, self._clock.monotonic() + lifetime))
        return principal

    async def _ask(self, token: str) -> dict[str, Any]:
        """POST the token (RFC 7662 §2.1) and return the answer as a JSON object."""
        client = self._http_client()
        form = {"token": token, **self._form}
        try:
            with anyio.fail_after(self._timeout):
                async with client.stream(
                    "POST",
                    self._endpoint,
                    data=form,
                    headers=self._headers,
                    timeout=self._timeout,
                    # A redirect is a misconfigured endpoint, even on a client that follows.
                    follow_redirects=False,
                ) as response:
                    if response.status_code != 200:
                        logger.warning(
                            "Token introspection answered HTTP %d.", response.status_code
                        )
                        raise IdentityProviderUnavailableError(
                            _UNAVAILABLE, retry_after=_RETRY_AFTER
                        )
                    body = await self._read(response)
        except (httpx.HTTPError, TimeoutError) as exc:
            # The class name only: messages may hold the URL, and nothing here is worth more.
            logger.warning("Token introspection failed: %s.", type(exc).__name__)
            raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER) from exc
        return _parse_answer(body)

    async def _read(self, response: httpx.Response) -> bytes:
        """The (decoded) body, refused past ``max_response_bytes`` without reading it all."""
        limit = self._max_response_bytes
        declared = response.headers.get("content-length", "")
        if (bounded_decimal(declared, limit + 1) or 0) > limit:
            self._too_large()
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _too_large() -> NoReturn:
        logger.warning("Token introspection answer exceeds max_response_bytes.")
        raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER)

    def _http_client(self) -> httpx.AsyncClient:
        if self._closed and self._owns_client:
            raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        if self._client.is_closed:
            raise IdentityProviderUnavailableError(_UNAVAILABLE, retry_after=_RETRY_AFTER)
        return self._client

    def _principal(self, data: dict[str, Any]) -> tuple[Principal, float | None]:
        """The principal of an answer and the token's ``exp``, or :class:`InvalidTokenError`."""
        if data.get("active") is not True:
            raise InvalidTokenError(_INACTIVE)
        exp = _expiry(data)
        if exp is not None and exp <= self._clock.time():
            raise InvalidTokenError(_EXPIRED)
        token_type = data.get("token_type")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() == "refresh_token"
        ):
            raise InvalidTokenError(_WRONG_TYPE)
        if "cnf" in data:
            # Sender-constrained (DPoP, mTLS): we cannot check the binding, so it is not a
            # bearer token here (RFC 9449 §6, RFC 7800; security.md A40).
            raise InvalidTokenError(_WRONG_TYPE)
        issuer = data.get("iss")
        if issuer is not None and issuer != self._issuer:
            raise InvalidTokenError(_WRONG_ISSUER)
        if self._audiences and not self._audience_matches(data.get("aud")):
            raise InvalidTokenError(_WRONG_AUDIENCE)
        subject = _optional_str(data, "sub")
        if subject is None:
            raise InvalidTokenError(_MALFORMED_ANSWER)
        principal = Principal(
            issuer=self._issuer,
            subject=subject,
            client_id=_optional_str(data, "client_id"),
            tenant=_optional_str(data, self._tenant_claim),
            scopes=_scopes(data.get("scope")),
            # Read-only: the same principal is handed to every request that hits the cache.
            claims=MappingProxyType(data),
        )
        return principal, exp

    def _audience_matches(self, aud: object) -> bool:
        if isinstance(aud, str):
            return aud in self._audiences
        if isinstance(aud, list):
            return any(isinstance(a, str) and a in self._audiences for a in aud)
        return False
