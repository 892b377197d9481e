"""JWT access-token validation (RFC 9068 profile, RFC 8725 practices).

:class:`JWTValidator` turns a compact JWS into a :class:`~gemini_scale.principal.Principal`
for any of its trusted :class:`Issuer`\\ s. Checks run cheapest and most input-independent
first, so that nothing an unauthenticated caller sends can make us fetch keys or run
cryptography for an issuer, audience or time window we would refuse anyway (Envoy's order):

1. size cap, before any decoding (A27); exactly three non-empty canonical base64url segments;
2. header: a UTF-8 JSON object without duplicate members; ``alg`` one we implement; no
   ``crit``; a string ``kid`` if any. ``jku``, ``x5u``, ``x5c`` and ``jwk`` are never read,
   so they can never become key sources (A13-A15);
3. payload: a JSON object whose ``iss`` exactly names a configured issuer, else refusal with
   zero fetches (A22); that issuer's ``alg`` allow-list and ``typ`` rule (A17, A24);
4. claims: presence, strict types, time window with leeway, age and lifetime caps, audience
   (A18-A23);
5. the key: by exact ``kid`` from the issuer's key set (fetched and refreshed by
   :class:`~gemini_scale.auth.jwks.JWKSCache`), whose type, curve and declared ``alg`` must
   fit the token's ``alg``; then the signature, with that one algorithm (A10, A11, A25).

A token that passed is remembered (by SHA-256) until it expires, so presenting it again costs
a hash and a dictionary lookup (:mod:`gemini_scale.auth.token_cache`).

Every refusal is :class:`InvalidTokenError` with a fixed message that never contains any part
of the token, a key id, an issuer or an audience.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gemini_scale.auth.discovery import Discovery, metadata_urls
from gemini_scale.auth.errors import InvalidTokenError
from gemini_scale.auth.jwks import (
    SIGNATURE_ALGORITHMS,
    JWKSCache,
    SignatureAlgorithm,
    b64url_decode_alphabet_checked,
    loads_json,
)
from gemini_scale.auth.token_cache import CachedToken, TokenCache, token_digest_of_bytes
from gemini_scale.errors import ConfigurationError
from gemini_scale.memo import remember
from gemini_scale.principal import Principal
from gemini_scale.types import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_ALGORITHMS", "Issuer", "JWTStats", "JWTValidator"]

#: The asymmetric algorithms accepted unless an issuer says otherwise.
DEFAULT_ALGORITHMS = frozenset({"RS256", "PS256", "ES256", "EdDSA"})
#: RFC 9068 §2.2 required claims.
RFC9068_CLAIMS = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
#: Claims no configuration may drop: without them a token cannot be tied to an issuer,
#: bounded in time or tied to us (RFC 8725 §3.8-3.9).
_ALWAYS_REQUIRED = ("iss", "exp", "aud")
_SCOPE_CLAIMS = ("scope", "scp")
_ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_GENERIC_TYPES = frozenset({"jwt", "application/jwt"})
_STRING_CLAIMS = ("iss", "sub", "client_id", "azp", "jti")
_MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z; larger "times" are junk (A19)
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_ABSENT: Any = object()
# What a header's ``typ`` says, decided once per distinct header (RFC 9068 §4).
_TYP_ABSENT = 0
_TYP_ACCESS = 1  # at+jwt
_TYP_GENERIC = 2  # JWT
_TYP_OTHER = 3  # anything else, or not an ASCII string: always refused
#: Distinct valid headers remembered (an issuer mints very few); the map is emptied when full.
_HEADER_CACHE_SIZE = 256
#: Longer header segments are checked every time rather than remembered.
_HEADER_CACHE_MAX_CHARS = 1024

# Fixed refusal messages (RFC 6750 §3 charset; no input ever interpolated).
_TOO_LARGE = "The access token is too large."
_MALFORMED = "The access token is malformed."
_ALGORITHM = "The access token's signing algorithm is not accepted."
_CRITICAL = "The access token has an unsupported critical header."
_WRONG_TYPE = "The token is not an access token."
_UNTRUSTED = "The access token's issuer is not trusted."
_BOUND = "The access token is bound to a key; sender-constrained tokens are not supported."
_MISSING_CLAIM = "The access token lacks a required claim."
_BAD_CLAIM = "The access token has a claim of the wrong type."
_EXPIRED = "The access token has expired."
_NOT_YET_VALID = "The access token is not valid yet."
_TOO_OLD = "The access token is too old."
_TOO_LONG = "The access token's lifetime is too long."
_AUDIENCE = "The access token is not meant for this service."
_SIGNATURE = "The access token's signature is invalid."


@dataclass(frozen=True, kw_only=True)
class Issuer:
    """One trusted authorization server and what its access tokens must look like."""

    issuer: str
    """The exact ``iss`` value (no normalisation: trailing slashes and case matter)."""
    audience: str | Sequence[str]
    """Our resource identifier(s); a token's ``aud`` must contain one (case-sensitive)."""
    jwks_url: str | None = None
    """Where the signing keys are; default: discovered from ``issuer`` (RFC 8414, then OIDC)."""
    jwks: Mapping[str, Any] | None = None
    """A fixed JWK Set instead of fetching (dev issuers and tests)."""
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS
    """Accepted ``alg`` values: RS/PS/ES 256-512, ``EdDSA`` (Ed25519), ``Ed25519``."""
    leeway: float = 60.0
    """Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    max_token_age: float | None = 86_400.0
    """Refuse tokens issued (``iat``) longer ago than this (plus leeway); ``None``: no cap."""
    max_lifetime: float | None = 86_400.0
    """Refuse tokens whose ``exp - iat`` exceeds this; ``None``: no cap."""
    require_typ: bool = True
    """``typ`` must be ``at+jwt`` (RFC 9068 §4). ``False`` also admits an absent or generic
    ``JWT`` type, for IdPs that omit it, but still refuses tokens with ``nonce`` or
    ``events`` (ID and logout tokens)."""
    required_claims: tuple[str, ...] = RFC9068_CLAIMS
    """Claims that must be present; ``iss``, ``exp`` and ``aud`` cannot be dropped."""
    tenant_claim: str | None = "tenant"
    """Claim copied into :attr:`Principal.tenant` when it is a string."""
    scope_claims: tuple[str, ...] = ("scope",)
    """Where scopes are read: ``scope`` (space-delimited string, RFC 9068 §2.2.3) and/or
    ``scp`` (list of strings, or a space-delimited string as Azure AD sends it)."""
    jwks_ttl: float = 600.0
    """Key set lifetime when the response has no ``Cache-Control: max-age``."""
    jwks_cooldown: float = 30.0
    """Minimum seconds between key set fetches triggered by an unknown ``kid``."""

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ConfigurationError("Issuer(issuer=...) must be a non-empty string")
        _audiences(self.audience)
        object.__setattr__(self, "algorithms", _checked_algorithms(self.algorithms))
        self._check_key_source()
        self._check_numbers()
        object.__setattr__(self, "required_claims", tuple(self.required_claims))
        missing = [claim for claim in _ALWAYS_REQUIRED if claim not in self.required_claims]
        if missing:
            raise ConfigurationError(f"Issuer(required_claims=...) must include {missing}")
        object.__setattr__(self, "scope_claims", tuple(self.scope_claims))
        if not set(self.scope_claims) <= set(_SCOPE_CLAIMS):
            raise ConfigurationError("Issuer(scope_claims=...) may hold only 'scope' and 'scp'")
        if self.tenant_claim is not None and not self.tenant_claim:
            raise ConfigurationError("Issuer(tenant_claim=...) must be a claim name or None")

    def _check_key_source(self) -> None:
        if self.jwks is not None and self.jwks_url is not None:
            raise ConfigurationError("give Issuer(jwks=...) or Issuer(jwks_url=...), not both")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ConfigurationError("Issuer(jwks_url=...) must be an http(s) URL")
        if self.jwks is None and self.jwks_url is None:
            metadata_urls(self.issuer)  # raises when discovery is impossible

    def _check_numbers(self) -> None:
        if not (math.isfinite(self.leeway) and self.leeway >= 0):
            raise ConfigurationError("Issuer(leeway=...) must be a finite number >= 0")
        for name in ("max_token_age", "max_lifetime"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(f"Issuer({name}=...) must be > 0 or None")
        if not self.jwks_ttl > 0 or not self.jwks_cooldown >= 0:
            raise ConfigurationError("Issuer(jwks_ttl=...) must be > 0, jwks_cooldown >= 0")


def _checked_algorithms(algorithms: Collection[str]) -> frozenset[str]:
    chosen = frozenset(algorithms)
    if not chosen:
        raise ConfigurationError("Issuer(algorithms=...) must not be empty")
    for alg in chosen:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise ConfigurationError(
                f"Issuer(algorithms=...) must not contain {alg!r}: a resource server "
                "accepts only asymmetric signatures (RFC 8725 §2.1, §3.1)"
            )
        if alg not in SIGNATURE_ALGORITHMS:
            raise ConfigurationError(
                f"Issuer(algorithms=...): {alg!r} is not supported; "
                f"choose from {sorted(SIGNATURE_ALGORITHMS)}"
            )
    return chosen


def _audiences(audience: str | Sequence[str]) -> frozenset[str]:
    values = (audience,) if isinstance(audience, str) else tuple(audience)
    if not values or not all(isinstance(value, str) and value for value in values):
        raise ConfigurationError("Issuer(audience=...) must be one or more non-empty strings")
    return frozenset(values)


@dataclass(slots=True)
class JWTStats:
    """Counters of a :class:`JWTValidator` (for metrics and tests)."""

    cache_hits: int = 0
    """Tokens answered from the verified-token cache."""
    decoded: int = 0
    """Tokens that passed the size and shape gate and were decoded."""
    signatures: int = 0
    """Signature verifications run."""


def _refuse(message: str) -> InvalidTokenError:
    return InvalidTokenError(message)


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = loads_json(b64url_decode_alphabet_checked(segment))
    except ValueError:
        raise _refuse(_MALFORMED) from None
    if not isinstance(value, dict):
        raise _refuse(_MALFORMED)
    return value


# alg, its SignatureAlgorithm, kid, typ kind: a header that passed every header check.
_Header = tuple[str, SignatureAlgorithm, "str | None", int]


def _typ_kind(typ: Any) -> int:
    if typ is _ABSENT:
        return _TYP_ABSENT
    if type(typ) is not str or not typ.isascii():
        return _TYP_OTHER
    media = typ.lower()  # media types compare case-insensitively (RFC 9068's at+JWT)
    if media in _ACCESS_TOKEN_TYPES:
        return _TYP_ACCESS
    if media in _GENERIC_TYPES:
        return _TYP_GENERIC
    return _TYP_OTHER


def _parse_header(segment: str) -> _Header:
    """The JOSE header checks that depend on the header alone (RFC 7515 §4, RFC 8725)."""
    header = _json_object(segment)
    alg = header.get("alg")
    algorithm = SIGNATURE_ALGORITHMS.get(alg) if type(alg) is str else None
    if algorithm is None:
        raise _refuse(_ALGORITHM)
    if "crit" in header:
        # We implement no extension, so any critical one is unknown (RFC 7515 §4.1.11).
        raise _refuse(_CRITICAL)
    kid: str | None = header.get("kid")
    if "kid" in header and type(kid) is not str:
        raise _refuse(_MALFORMED)
    return algorithm.name, algorithm, kid, _typ_kind(header.get("typ", _ABSENT))


# valid_until, subject, client_id, scopes (a plain tuple: built for every first-seen token)
_Accepted = tuple[float, str, "str | None", frozenset[str]]


class _TrustedIssuer:
    """An :class:`Issuer` with its derived settings and its key cache."""

    __slots__ = (
        "algorithms", "audiences", "config", "discovery", "keys", "leeway", "max_age",
        "max_lifetime", "required_claims", "scope_claims", "tenant_claim",
    )

    def __init__(self, config: Issuer, keys: JWKSCache, discovery: Discovery | None) -> None:
        self.config = config
        self.keys = keys
        self.discovery = discovery
        self.audiences = _audiences(config.audience)
        self.algorithms = config.algorithms
        self.leeway = config.leeway
        self.max_age = config.max_token_age
        self.max_lifetime = config.max_lifetime
        self.required_claims = frozenset(config.required_claims)
        self.scope_claims = config.scope_claims
        self.tenant_claim = config.tenant_claim

    def check_type(self, typ_kind: int, claims: dict[str, Any]) -> None:
        """RFC 9068 §4 explicit typing, with the per-issuer opt-out for untyped IdPs."""
        if typ_kind == _TYP_ACCESS:
            return
        if typ_kind == _TYP_OTHER or self.config.require_typ:
            raise _refuse(_WRONG_TYPE)
        # Untyped or generic "JWT": only the claims can tell an ID token (nonce) or a
        # logout token (events) from an access token (RFC 8725 §3.12).
        if "nonce" in claims or "events" in claims:
            raise _refuse(_WRONG_TYPE)

    def check_claims(self, claims: dict[str, Any], now: float) -> _Accepted:
        """Presence, types, time and audience: everything but the signature.

        Written flat: it runs for every first-seen token (A18-A23).
        """
        if not claims.keys() >= self.required_claims:
            raise _refuse(_MISSING_CLAIM)
        if "cnf" in claims:
            # A sender-constrained token (DPoP, mTLS: RFC 9449 §6, RFC 8705 §3) must not be
            # accepted as a plain bearer token: we cannot check the binding (A40).
            raise _refuse(_BOUND)
        for name in _STRING_CLAIMS:
            if name in claims and type(claims[name]) is not str:
                raise _refuse(_BAD_CLAIM)
        exp = claims["exp"]
        iat = claims.get("iat", 0)
        nbf = claims.get("nbf", 0)
        # Strict NumericDate: an int (bool is not one), no floats or strings, in a sane range.
        if (
            type(exp) is not int
            or type(iat) is not int
            or type(nbf) is not int
            or not 0 <= exp <= _MAX_TIME
            or not 0 <= iat <= _MAX_TIME
            or not 0 <= nbf <= _MAX_TIME
        ):
            raise _refuse(_BAD_CLAIM)
        aud = claims.get("aud")
        if type(aud) is str:
            ours = aud in self.audiences
        elif type(aud) is list and all(type(item) is str for item in aud):
            ours = not self.audiences.isdisjoint(aud)
        else:
            raise _refuse(_BAD_CLAIM)
        scopes = self._scopes(claims) if self.scope_claims else frozenset()
        client_id = claims.get("client_id", claims.get("azp"))
        subject = claims.get("sub", client_id)
        if not subject:
            raise _refuse(_MISSING_CLAIM)

        valid_until = self._valid_until(exp, iat, nbf, "iat" in claims, now)
        if not ours:
            raise _refuse(_AUDIENCE)
        return valid_until, subject, client_id, scopes

    def _valid_until(self, exp: int, iat: int, nbf: int, has_iat: bool, now: float) -> float:
        """The instant the token stops being acceptable (A20, A21); absent nbf/iat are 0."""
        leeway = self.leeway
        if exp <= now - leeway:
            raise _refuse(_EXPIRED)
        if nbf > now + leeway or iat > now + leeway:
            raise _refuse(_NOT_YET_VALID)
        valid_until = exp + leeway
        if has_iat and self.max_age is not None:
            if now - iat >= self.max_age + leeway:
                raise _refuse(_TOO_OLD)
            valid_until = min(valid_until, iat + self.max_age + leeway)
        if self.max_lifetime is not None and exp - (iat if has_iat else now) > self.max_lifetime:
            raise _refuse(_TOO_LONG)
        return valid_until

    def _scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        scopes: frozenset[str] = frozenset()
        for name in self.scope_claims:
            if name not in claims:
                continue
            value = claims[name]
            if name == "scope" or (name == "scp" and type(value) is str):
                # RFC 6749 §3.3 (single spaces); Azure AD sends ``scp`` in the same form.
                if type(value) is not str:
                    raise _refuse(_BAD_CLAIM)
                found = frozenset(value.split(" "))
            elif type(value) is list and all(type(item) is str for item in value):
                found = frozenset(value)
            else:
                raise _refuse(_BAD_CLAIM)
            scopes = scopes | found if scopes else found
        return scopes - {""} if "" in scopes else scopes

    def principal(self, claims: dict[str, Any], accepted: _Accepted) -> Principal:
        _, subject, client_id, scopes = accepted
        tenant = claims.get(self.tenant_claim) if self.tenant_claim is not None else None
        return Principal(
            issuer=self.config.issuer,
            subject=subject,
            client_id=client_id,
            tenant=tenant if type(tenant) is str else None,
            scopes=scopes,
            claims=MappingProxyType(claims),
        )


_Inspected = tuple[
    _TrustedIssuer, dict[str, Any], _Accepted, str | None, SignatureAlgorithm, bytes, int
]


class JWTValidator:
    """Verifies JWT access tokens from one or more trusted issuers.

    Implements :class:`~gemini_scale.auth.base.TokenVerifier`. Construction opens no
    connection; keys are fetched on first use with ``http_client`` (or a client of its own,
    created lazily and closed by :meth:`aclose`).

    Args:
        issuers: the trusted issuers; ``iss`` selects one by exact match.
        http_client: shared client for JWKS and discovery requests.
        clock: time source for token times and cache lifetimes.
        max_token_bytes: longer tokens are refused before any decoding.
        fetch_timeout: seconds a JWKS or discovery request may take in total.
        max_jwks_bytes: a larger JWKS or metadata response is refused.
        max_jwks_keys: a key set with more keys is refused whole (the previous is kept).
        cache_size: verified tokens remembered (``0`` disables the cache).
    """

    def __init__(
        self,
        issuers: Sequence[Issuer],
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_token_bytes: int = 8192,
        fetch_timeout: float = 5.0,
        max_jwks_bytes: int = 512 * 1024,
        max_jwks_keys: int = 100,
        cache_size: int = 10_000,
    ) -> None:
        if not issuers:
            raise ConfigurationError("JWTValidator needs at least one Issuer")
        if max_token_bytes < 1 or not fetch_timeout > 0 or max_jwks_bytes < 1 or max_jwks_keys < 1:
            raise ConfigurationError(
                "JWTValidator: max_token_bytes, fetch_timeout, max_jwks_bytes and "
                "max_jwks_keys must be positive"
            )
        self._client = http_client
        self._owns_client = False
        self._clock = clock
        self._max_token_bytes = max_token_bytes
        self._fetch_timeout = fetch_timeout
        self._cache = TokenCache(cache_size)
        self._headers: dict[str, _Header] = {}
        self.stats = JWTStats()
        self._issuers: dict[str, _TrustedIssuer] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ConfigurationError("JWTValidator: each issuer may be configured once")
            self._issuers[config.issuer] = self._trust(
                config, max_bytes=max_jwks_bytes, max_keys=max_jwks_keys
            )

    def _trust(self, config: Issuer, *, max_bytes: int, max_keys: int) -> _TrustedIssuer:
        if config.jwks is not None:
            keys = JWKSCache.static(config.jwks, clock=self._clock, max_keys=max_keys)
            return _TrustedIssuer(config, keys, None)
        discovery = None
        if config.jwks_url is None:
            discovery = Discovery(
                config.issuer,
                client=self._http,
                clock=self._clock,
                fetch_timeout=self._fetch_timeout,
                max_bytes=max_bytes,
            )
        keys = JWKSCache(
            url=discovery.jwks_uri if discovery is not None else str(config.jwks_url),
            client=self._http,
            clock=self._clock,
            ttl=config.jwks_ttl,
            cooldown=config.jwks_cooldown,
            fetch_timeout=self._fetch_timeout,
            max_bytes=max_bytes,
            max_keys=max_keys,
        )
        return _TrustedIssuer(config, keys, discovery)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx  # deferred: static key sets never need it

            self._client = httpx.AsyncClient(timeout=self._fetch_timeout, follow_redirects=False)
            self._owns_client = True
        return self._client

    def handles(self, token: str) -> bool:
        """Whether ``token`` looks like a compact JWS (three dot-separated segments)."""
        return token.count(".") == 2

    def key_cache(self, issuer: str) -> JWKSCache:
        """The key cache of a configured issuer (``KeyError`` otherwise)."""
        return self._issuers[issuer].keys

    def discovery(self, issuer: str) -> Discovery | None:
        """The metadata discovery of a configured issuer, if its keys come from discovery."""
        return self._issuers[issuer].discovery

    async def verify(self, token: str) -> Principal:
        """The principal of a valid access token.

        Raises :class:`~gemini_scale.auth.errors.InvalidTokenError` for any invalid token and
        :class:`~gemini_scale.auth.errors.IdentityProviderUnavailableError` when the
        issuer's keys cannot be obtained.
        """
        if len(token) > self._max_token_bytes:
            raise _refuse(_TOO_LARGE)
        if not token.isascii():
            raise _refuse(_MALFORMED)
        data = token.encode()
        digest = token_digest_of_bytes(data)
        cached = self._cache.get(digest)
        if cached is not None:
            keys = cached.keys
            if self._clock.time() < cached.valid_until and keys.generation == cached.key_generation:
                if self._clock.monotonic() >= keys.stale_at:
                    # The key set's lifetime is over: refresh it in the background, as a
                    # first-seen token would. Once the new set is installed its generation
                    # differs, so this entry is verified again against it.
                    keys.refresh_if_stale()
                self.stats.cache_hits += 1
                return cached.principal
            # Expired, or the issuer's keys changed since (a removed key must stop working):
            # verify from scratch.
            self._cache.discard(digest)
        trusted, claims, accepted, kid, algorithm, signature, signed_until = self._inspect(token)
        keys = trusted.keys
        key = keys.cached_key(kid, algorithm) or await keys.key_for(kid, algorithm)
        generation = keys.generation
        self.stats.signatures += 1
        if not key.verifier(algorithm)(signature, data[:signed_until]):
            raise _refuse(_SIGNATURE)
        principal = trusted.principal(claims, accepted)
        self._cache.put(
            digest,
            CachedToken(principal, accepted[0], trusted.config.issuer, keys, generation),
        )
        return principal

    def _inspect(self, token: str) -> _Inspected:
        """Every check that needs no key: structure, header, issuer, type and claims."""
        match = _COMPACT.fullmatch(token)
        if match is None:
            raise _refuse(_MALFORMED)
        self.stats.decoded += 1
        encoded_header, encoded_claims, encoded_signature = match.groups()

        # Tokens of one issuer share a few headers: each distinct valid one is decoded and
        # checked once, then looked up (same checks, same outcome: it is a pure function).
        header = self._headers.get(encoded_header)
        if header is None:
            header = _parse_header(encoded_header)
            if len(encoded_header) <= _HEADER_CACHE_MAX_CHARS:
                remember(self._headers, encoded_header, header, _HEADER_CACHE_SIZE)
        alg, algorithm, kid, typ_kind = header

        claims = _json_object(encoded_claims)
        iss = claims.get("iss")
        if type(iss) is not str:
            raise _refuse(_MISSING_CLAIM if iss is None else _BAD_CLAIM)
        trusted = self._issuers.get(iss)
        if trusted is None:
            raise _refuse(_UNTRUSTED)
        if alg not in trusted.algorithms:
            raise _refuse(_ALGORITHM)
        trusted.check_type(typ_kind, claims)
        accepted = trusted.check_claims(claims, self._clock.time())
        try:
            signature = b64url_decode_alphabet_checked(encoded_signature)
        except ValueError:
            raise _refuse(_MALFORMED) from None
        return trusted, claims, accepted, kid, algorithm, signature, match.end(2)

    async def aclose(self) -> None:
        """Cancel key fetches in flight and close the HTTP client if it is our own."""
        for trusted in self._issuers.values():
            await trusted.keys.aclose()
            if trusted.discovery is not None:
                await trusted.discovery.aclose()
        self._cache.clear()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            self._owns_client = False
            await client.aclose()
