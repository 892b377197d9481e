"""Signing keys: the algorithms we verify with, JWK Set parsing, and the per-issuer key cache.

:class:`JWKSCache` holds one issuer's keys. It fetches the JWK Set lazily with the shared
``httpx`` client, bounded in time and in bytes, keeps it for the response's
``Cache-Control: max-age`` (clamped), refreshes it in the background when it goes stale while
serving the old keys, and refetches early only for an unknown ``kid``: once per cool-down,
with every concurrent caller sharing the one in-flight request (security.md A28-A33).

Keys are imported with joserfc's key classes; signatures are checked directly with the
``cryptography`` public key they wrap, with the algorithm bound to both the token's ``alg``
and the key (RFC 8725 §3.1).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import json.scanner
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from gemini_scale.auth.errors import IdentityProviderUnavailableError, InvalidTokenError
from gemini_scale.errors import ConfigurationError, GeminiScaleError
from gemini_scale.header_values import bounded_decimal
from gemini_scale.types import Clock

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SIGNATURE_ALGORITHMS",
    "DocumentError",
    "FetchedDocument",
    "JWKSCache",
    "KeySetSnapshot",
    "SignatureAlgorithm",
    "VerificationKey",
    "b64url_decode",
    "b64url_decode_alphabet_checked",
    "fetch_json",
    "loads_json",
    "parse_jwks",
    "shielded",
]

logger = logging.getLogger("gemini_scale.auth")

PublicKey: TypeAlias = RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey

#: A failed fetch is retried no sooner than this (Envoy's ``failed_refetch_duration``).
RETRY_AFTER_FAILURE = 1.0
#: ``Cache-Control: max-age`` of a JWK Set is clamped into this range (seconds).
MIN_TTL, MAX_TTL = 60.0, 86_400.0
#: RSA moduli outside this range are skipped: small ones are weak, huge ones make every
#: verification expensive (a 16384-bit key is a DoS lever, A28).
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 8192

_NO_KEY = "No signing key of the issuer matches the access token."


# ------------------------------------------------------------------------------------------
# Strict decoding shared by tokens and documents
# ------------------------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_INDEX = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)}


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded, canonical base64url (RFC 7515 §2); ``ValueError`` otherwise.

    Python's decoder accepts padding, ``+``/``/`` and non-zero trailing bits, all of which
    make one signature spellable several ways (A25).
    """
    if not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    return b64url_decode_alphabet_checked(segment)


_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")


def b64url_decode_alphabet_checked(segment: str) -> bytes:
    """:func:`b64url_decode` for a segment already known to hold only ``[A-Za-z0-9_-]``."""
    tail = len(segment) & 3
    if tail:
        if tail == 1:
            raise ValueError("impossible base64url length")
        # The unused low bits of the last character must be zero (RFC 4648 §3.5).
        if tail == 2:
            if _B64_INDEX[segment[-1]] & 0x0F:
                raise ValueError("non-canonical base64url")
            segment += "=="
        else:
            if _B64_INDEX[segment[-1]] & 0x03:
                raise ValueError("non-canonical base64url")
            segment += "="
    return binascii.a2b_base64(segment.encode().translate(_TO_STANDARD_ALPHABET))


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # RFC 7515 §4: duplicate member names are either rejected or resolved; we reject,
        # so two parsers can never disagree about which "alg" counts.
        raise ValueError("duplicate member name")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError("non-standard JSON constant")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_reject_constant)
# The decoder's own scanner (the C one when available), called directly: the common input, a
# document without surrounding whitespace, then needs no regex passes and no Python frames.
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    cast("Any", _DECODER)
)


def loads_json(data: bytes) -> Any:
    """Parse UTF-8 JSON strictly: no BOM, no other encoding, no duplicate member names,
    no ``NaN``/``Infinity``; raises ``ValueError``."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise ValueError("byte order mark")
    # json.loads(bytes) would also accept UTF-16/32; RFC 8725 §3.7 wants UTF-8 only.
    text = data.decode("utf-8")
    try:
        try:
            value, end = _SCAN_ONCE(text, 0)
        except StopIteration:
            end = -1
        if end == len(text):
            return value
        # Leading/trailing whitespace, trailing data or a syntax error: the full decoder
        # accepts the first and raises the right ValueError for the others.
        return _DECODER.decode(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


# ------------------------------------------------------------------------------------------
# Algorithms and keys
# ------------------------------------------------------------------------------------------

_Verifier: TypeAlias = Callable[[PublicKey, bytes, bytes], bool]
_BoundVerifier: TypeAlias = Callable[[bytes, bytes], bool]
_Binder: TypeAlias = Callable[[PublicKey], _BoundVerifier]


def _never(signature: bytes, message: bytes) -> bool:
    """The bound verifier of a key of the wrong type: nothing verifies."""
    return False


def _unbound(bind: _Binder) -> _Verifier:
    def verify(key: PublicKey, signature: bytes, message: bytes) -> bool:
        return bind(key)(signature, message)

    return verify


def _rsa_binder(pad: padding.AsymmetricPadding, digest: hashes.HashAlgorithm) -> _Binder:
    def bind(key: PublicKey) -> _BoundVerifier:
        if not isinstance(key, RSAPublicKey):
            return _never
        key_verify = key.verify

        def verify(signature: bytes, message: bytes) -> bool:
            try:
                key_verify(signature, message, pad, digest)
            except InvalidSignature:
                return False
            return True

        return verify

    return bind


def _ec_binder(digest: hashes.HashAlgorithm, size: int) -> _Binder:
    scheme = ec.ECDSA(digest)

    def bind(key: PublicKey) -> _BoundVerifier:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return _never
        key_verify = key.verify

        def verify(signature: bytes, message: bytes) -> bool:
            # JWS carries the fixed-size R || S form (RFC 7518 §3.4), never DER.
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            if r == 0 or s == 0:  # CVE-2022-21449 class; cryptography refuses too
                return False
            try:
                key_verify(encode_dss_signature(r, s), message, scheme)
            except InvalidSignature:
                return False
            return True

        return verify

    return bind


def _ed25519_bind(key: PublicKey) -> _BoundVerifier:
    if not isinstance(key, Ed25519PublicKey):
        return _never
    key_verify = key.verify

    def verify(signature: bytes, message: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            key_verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


@dataclass(frozen=True, slots=True)
class SignatureAlgorithm:
    """A JWS ``alg`` we verify, and the only kind of key it may be checked with."""

    name: str
    kty: str
    """The JWK key type the algorithm needs (``RSA``, ``EC``, ``OKP``)."""
    curve: str | None
    """The curve an ``EC``/``OKP`` key must be on."""
    bind: _Binder
    """``bind(public_key)``: ``verify(signature, signing_input) -> bool`` for that key (always
    false for a key of the wrong type); never raises for bad input."""

    @property
    def verify(self) -> _Verifier:
        """``verify(public_key, signature, signing_input) -> bool``; never raises."""
        return _unbound(self.bind)


def _algorithms() -> dict[str, SignatureAlgorithm]:
    table: dict[str, SignatureAlgorithm] = {}
    for bits, digest in ((256, hashes.SHA256()), (384, hashes.SHA384()), (512, hashes.SHA512())):
        table[f"RS{bits}"] = SignatureAlgorithm(
            f"RS{bits}", "RSA", None, _rsa_binder(padding.PKCS1v15(), digest)
        )
        # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        table[f"PS{bits}"] = SignatureAlgorithm(
            f"PS{bits}", "RSA", None, _rsa_binder(pss, digest)
        )
    for name, curve, digest, size in (
        ("ES256", "P-256", hashes.SHA256(), 32),
        ("ES384", "P-384", hashes.SHA384(), 48),
        ("ES512", "P-521", hashes.SHA512(), 66),
    ):
        table[name] = SignatureAlgorithm(name, "EC", curve, _ec_binder(digest, size))
    table["EdDSA"] = SignatureAlgorithm("EdDSA", "OKP", "Ed25519", _ed25519_bind)
    table["Ed25519"] = SignatureAlgorithm("Ed25519", "OKP", "Ed25519", _ed25519_bind)  # RFC 9864
    return table


#: Every JWS algorithm this library can verify. ``none`` and the HMAC family are absent on
#: purpose: a resource server never holds a shared secret with its IdP (A09, A10).
SIGNATURE_ALGORITHMS: Mapping[str, SignatureAlgorithm] = _algorithms()

_KEY_CLASSES: Mapping[str, type[RSAKey] | type[ECKey] | type[OKPKey]] = {
    "RSA": RSAKey,
    "EC": ECKey,
    "OKP": OKPKey,
}
_CURVES = {"EC": ("P-256", "P-384", "P-521"), "OKP": ("Ed25519",)}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


@dataclass(frozen=True, slots=True, eq=False)
class VerificationKey:
    """One usable public key of an issuer."""

    kid: str | None
    kty: str
    curve: str | None
    alg: str | None
    """The ``alg`` the JWK declares; when set, the key verifies that algorithm only."""
    public_key: PublicKey
    _bound: dict[str, tuple[SignatureAlgorithm, _BoundVerifier]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """Verifiers bound to this key, by algorithm name (built once per key and algorithm)."""

    def verifier(self, algorithm: SignatureAlgorithm) -> _BoundVerifier:
        """``verify(signature, signing_input) -> bool`` for ``algorithm`` with this key."""
        entry = self._bound.get(algorithm.name)
        if entry is not None and entry[0] is algorithm:
            return entry[1]
        bound = algorithm.bind(self.public_key)
        self._bound[algorithm.name] = (algorithm, bound)
        return bound

    def fits(self, algorithm: SignatureAlgorithm) -> bool:
        """Whether this key may verify ``algorithm`` (key type, curve and declared ``alg``)."""
        return (
            self.kty == algorithm.kty
            and (algorithm.curve is None or self.curve == algorithm.curve)
            and (self.alg is None or self.alg == algorithm.name)
        )


@dataclass(frozen=True, slots=True, eq=False)
class KeySetSnapshot:
    """One parsed JWK Set: its usable keys, indexed by ``kid``."""

    keys: tuple[VerificationKey, ...]
    by_kid: Mapping[str, tuple[VerificationKey, ...]]
    skipped: int
    """Keys left out (unknown type, ``oct``, private, not for signing, unparseable)."""
    fingerprint: bytes
    """Digest of the usable keys, to tell a real rotation from a re-fetch of the same set."""

    def find(self, kid: str | None, algorithm: SignatureAlgorithm) -> VerificationKey | None:
        """The key for a token's ``kid`` and ``alg``: an exact ``kid`` match, or the only key
        of the set when the token names none."""
        if kid is None:
            if len(self.keys) == 1 and self.keys[0].fits(algorithm):
                return self.keys[0]
            return None
        for key in self.by_kid.get(kid, ()):
            if key.fits(algorithm):
                return key
        return None


class DocumentError(GeminiScaleError):
    """A JWK Set or discovery document could not be fetched or was unusable.

    The message is a fixed reason; it never contains the response body.
    """


def _rsa_modulus_bits(n: object) -> int:
    if not isinstance(n, str):
        raise ValueError("n is not a string")
    return int.from_bytes(b64url_decode(n), "big").bit_length()


def _declares_signing_key(jwk: dict[str, Any], kty: str) -> bool:
    """Whether a JWK's metadata allows it as a public signature key of ours (A28)."""
    ops = jwk.get("key_ops", ["verify"])
    alg = jwk.get("alg")
    declared = SIGNATURE_ALGORITHMS.get(alg) if isinstance(alg, str) else None
    if (
        # a published private key is a leak, never something to use
        any(member in jwk for member in _PRIVATE_MEMBERS)
        or ("use" in jwk and jwk["use"] != "sig")
        or not isinstance(ops, list)
        or "verify" not in ops
        or ("kid" in jwk and not isinstance(jwk["kid"], str))
        or ("alg" in jwk and (declared is None or declared.kty != kty))
    ):
        return False
    if kty == "RSA":
        try:
            return MIN_RSA_BITS <= _rsa_modulus_bits(jwk.get("n")) <= MAX_RSA_BITS
        except ValueError:
            return False
    curve = jwk.get("crv")
    return isinstance(curve, str) and curve in _CURVES[kty]


def _parse_key(jwk: object) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        return None
    kty = jwk.get("kty")
    # Unknown or missing kty, and "oct": never a key of ours; skipped, not fatal (A28).
    if not isinstance(kty, str) or kty not in _KEY_CLASSES or not _declares_signing_key(jwk, kty):
        return None
    try:
        public = _KEY_CLASSES[kty].import_key(dict(jwk)).public_key
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(public, RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey):
        return None
    return VerificationKey(
        kid=jwk.get("kid"),
        kty=kty,
        curve=None if kty == "RSA" else jwk["crv"],
        alg=jwk.get("alg"),
        public_key=public,
    )


def parse_jwks(document: object, *, max_keys: int) -> KeySetSnapshot:
    """Parse a JWK Set (RFC 7517 §5), keeping the usable signing keys.

    Unusable keys are skipped, not fatal. Raises :class:`DocumentError` when the document
    is not a key set, holds more than ``max_keys`` keys, or no usable key at all.
    """
    if not isinstance(document, dict):
        raise DocumentError("the JWK Set is not a JSON object")
    members = document.get("keys")
    if not isinstance(members, list):
        raise DocumentError("the JWK Set has no 'keys' list")
    if len(members) > max_keys:
        raise DocumentError("the JWK Set has too many keys")
    keys: list[VerificationKey] = []
    digest = hashlib.sha256()
    for member in members:
        key = _parse_key(member)
        if key is not None:
            keys.append(key)
            digest.update(json.dumps(member, sort_keys=True).encode())
            digest.update(b"\0")
    if not keys:
        raise DocumentError("the JWK Set has no usable signing key")
    by_kid: dict[str, list[VerificationKey]] = {}
    for key in keys:
        if key.kid is not None:
            by_kid.setdefault(key.kid, []).append(key)
    return KeySetSnapshot(
        keys=tuple(keys),
        by_kid={kid: tuple(found) for kid, found in by_kid.items()},
        skipped=len(members) - len(keys),
        fingerprint=digest.digest(),
    )


# ------------------------------------------------------------------------------------------
# Bounded fetching
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A JSON document and the response headers it came with."""

    body: Any
    headers: httpx.Headers


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def fetch_json(
    client: httpx.AsyncClient, url: str, *, time_limit: float, max_bytes: int
) -> FetchedDocument:
    """GET ``url`` and parse its JSON body, bounded by ``time_limit`` seconds in total and by
    ``max_bytes`` of (decoded) body; raises :class:`DocumentError` on any failure.

    Only a 200 with a JSON media type counts: an HTML error page served with 200 is a
    failure, not a document (A33).
    """
    import httpx  # deferred: a service with static keys never loads an HTTP client

    headers = {"accept": "application/json", "accept-encoding": "identity"}
    body = bytearray()
    try:
        async with asyncio.timeout(time_limit):
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    raise DocumentError(f"the response status was {response.status_code}")
                if not _is_json(response.headers.get("content-type")):
                    raise DocumentError("the response is not JSON")
                declared = response.headers.get("content-length", "")
                if (bounded_decimal(declared, max_bytes + 1) or 0) > max_bytes:
                    raise DocumentError("the response is too large")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise DocumentError("the response is too large")
    except TimeoutError as exc:
        raise DocumentError("the request timed out") from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise DocumentError(f"the request failed ({type(exc).__name__})") from exc
    try:
        return FetchedDocument(loads_json(bytes(body)), response.headers)
    except ValueError as exc:
        raise DocumentError("the response is not valid JSON") from exc


_MAX_AGE = re.compile(r'^max-age="?(\d+)"?$')


def cache_ttl(headers: httpx.Headers, default: float) -> float:
    """Seconds to keep a JWK Set: its ``Cache-Control: max-age`` clamped into
    [``MIN_TTL``, ``MAX_TTL``], else ``default``."""
    for directive in headers.get("cache-control", "").split(","):
        match = _MAX_AGE.match(directive.strip().lower())
        if match:
            return min(max(float(match.group(1)), MIN_TTL), MAX_TTL)
    return default


# ------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------

_T = TypeVar("_T")


async def shielded(task: asyncio.Task[_T], *, default: _T) -> _T:
    """Await a task shared by several callers.

    A caller that is cancelled stops waiting without cancelling the task for the others;
    when the task itself is cancelled (shutdown), callers get ``default`` instead of a
    ``CancelledError`` they did not ask for.
    """
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and (current is None or current.cancelling() == 0):
            return default
        raise


UrlSource: TypeAlias = str | Callable[[], Awaitable[str]]


class JWKSCache:
    """The signing keys of one issuer, fetched lazily and kept fresh.

    * Cold (nothing fetched yet): the first caller fetches, concurrent ones wait for that
      same request; failure is :class:`IdentityProviderUnavailableError` (503), and the next
      attempt happens no sooner than ``RETRY_AFTER_FAILURE`` later (A31).
    * Stale (TTL over): callers keep using the old keys while one background request
      refreshes them; a failed refresh keeps the old keys (A32, A33).
    * Unknown ``kid``: one refetch, shared by every concurrent caller, and no more than one
      per ``cooldown`` seconds since the last fetch of any kind (A29, A30). Within the
      cool-down the token is refused (``invalid_token``); when the refetch itself fails the
      answer is 503, since the token may well be good.

    Build with a URL (or an async function returning one, for discovery) or with
    :meth:`static` for a fixed key set that is never fetched.
    """

    def __init__(
        self,
        *,
        url: UrlSource | None,
        client: Callable[[], httpx.AsyncClient],
        clock: Clock,
        ttl: float = 600.0,
        cooldown: float = 30.0,
        fetch_timeout: float = 5.0,
        max_bytes: int = 512 * 1024,
        max_keys: int = 100,
    ) -> None:
        self._url: UrlSource | None = url
        self._client = client
        self._clock = clock
        self._ttl = ttl
        self._cooldown = cooldown
        self._fetch_timeout = fetch_timeout
        self._max_bytes = max_bytes
        self._max_keys = max_keys
        self._snapshot: KeySetSnapshot | None = None
        self.stale_at = -math.inf
        """Monotonic instant from which the key set is stale and the next use refreshes it
        (``inf`` for a static set). Read on the verified-token cache's hit path."""
        self._last_fetch = -math.inf
        self._retry_at = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self.generation = 0
        """Bumped whenever the usable key set changes."""
        self.fetches = 0
        """Fetches started."""
        self.errors = 0
        """Fetches that failed or returned an unusable document (the previous set was kept)."""
        self.last_error: str | None = None
        """The fixed reason of the latest failure, for logs and health checks."""

    @classmethod
    def static(cls, jwks: Mapping[str, Any], *, clock: Clock, max_keys: int = 100) -> JWKSCache:
        """A cache holding ``jwks`` for ever; raises ``ConfigurationError`` when unusable."""
        try:
            snapshot = parse_jwks(dict(jwks), max_keys=max_keys)
        except DocumentError as exc:
            raise ConfigurationError(f"Issuer(jwks=...) is not usable: {exc}") from exc

        def no_client() -> httpx.AsyncClient:  # pragma: no cover - never fetches
            raise AssertionError("a static key set never fetches")

        cache = cls(url=None, client=no_client, clock=clock)
        cache._install(snapshot, math.inf)
        return cache

    @property
    def snapshot(self) -> KeySetSnapshot | None:
        """The current key set, if one was ever fetched."""
        return self._snapshot

    def cached_key(
        self, kid: str | None, algorithm: SignatureAlgorithm
    ) -> VerificationKey | None:
        """The key from the keys at hand, without waiting (a stale set is refreshed in the
        background); ``None`` when :meth:`key_for` must decide."""
        snapshot = self._snapshot
        if snapshot is None:
            return None
        if self._clock.monotonic() >= self.stale_at:
            self._refresh_in_background()
        return snapshot.find(kid, algorithm)

    def refresh_if_stale(self) -> None:
        """Start the background refresh of a stale key set, as :meth:`cached_key` does,
        without looking up a key: for a token answered from the verified-token cache, so a
        withdrawn key stops working for cached tokens too. Never waits; single-flight and
        throttled after a failure like every refresh."""
        if self._clock.monotonic() >= self.stale_at:
            self._refresh_in_background()

    async def key_for(self, kid: str | None, algorithm: SignatureAlgorithm) -> VerificationKey:
        """The key to verify a token with ``kid`` and ``algorithm``.

        Raises :class:`InvalidTokenError` when the issuer has no such key and
        :class:`IdentityProviderUnavailableError` when the keys cannot be fetched.
        """
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = await self._load_cold()
        elif self._clock.monotonic() >= self.stale_at:
            self._refresh_in_background()
        key = snapshot.find(kid, algorithm)
        if key is not None:
            return key
        if kid is None or kid in snapshot.by_kid or self._url is None:
            raise InvalidTokenError(_NO_KEY)
        # An unfamiliar kid may mean the IdP rotated (OIDC Core §10.1.1): refetch, but only
        # by joining a fetch in flight or once per cool-down, or random kids become a DoS.
        now = self._clock.monotonic()
        if self._pending() is None and (
            now - self._last_fetch < self._cooldown or now < self._retry_at
        ):
            raise InvalidTokenError(_NO_KEY)
        if not await self._fetch_shared():
            raise self._unavailable()
        refreshed = self._snapshot
        key = refreshed.find(kid, algorithm) if refreshed is not None else None
        if key is None:
            raise InvalidTokenError(_NO_KEY)
        return key

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch in flight); whether a usable set was installed.

        A static set never fetches and answers ``True``.
        """
        if self._url is None:
            return True
        return await self._fetch_shared()

    async def aclose(self) -> None:
        """Cancel a fetch in flight."""
        task, self._inflight = self._inflight, None
        await cancel_task(task)

    async def _load_cold(self) -> KeySetSnapshot:
        if self._url is None:  # pragma: no cover - static caches are never cold
            raise AssertionError("static key set without keys")
        if self._pending() is None and self._clock.monotonic() < self._retry_at:
            raise self._unavailable()
        await self._fetch_shared()
        if self._snapshot is None:
            raise self._unavailable()
        return self._snapshot

    def _unavailable(self) -> IdentityProviderUnavailableError:
        wait = self._retry_at - self._clock.monotonic()
        return IdentityProviderUnavailableError(
            "The identity provider's signing keys are unavailable.",
            retry_after=max(1, math.ceil(wait)) if math.isfinite(wait) else 1,
        )

    def _pending(self) -> asyncio.Task[bool] | None:
        task = self._inflight
        if task is not None and task.get_loop() is not asyncio.get_running_loop():
            # Left behind by an event loop that is gone (one validator, several test loops).
            self._inflight = task = None
        return task

    def _refresh_in_background(self) -> None:
        if self._pending() is None and self._clock.monotonic() >= self._retry_at:
            self._start_fetch()

    async def _fetch_shared(self) -> bool:
        task = self._pending() or self._start_fetch()
        # shield: one caller going away (client disconnect) must not cancel the fetch the
        # others are waiting for.
        return await shielded(task, default=False)

    def _start_fetch(self) -> asyncio.Task[bool]:
        self._last_fetch = self._clock.monotonic()
        task = asyncio.get_running_loop().create_task(self._fetch())
        self._inflight = task
        task.add_done_callback(self._fetch_done)
        return task

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled() and task.exception() is not None:
            # Unexpected (a bug, not an IdP failure): waiters get it too; counted here so a
            # background refresh nobody awaits does not vanish silently.
            self.errors += 1

    async def _fetch(self) -> bool:
        self.fetches += 1
        source = self._url
        if source is None:  # pragma: no cover - static caches never start a fetch
            raise AssertionError("a static key set never fetches")
        try:
            url = source if isinstance(source, str) else await source()
            document = await fetch_json(
                self._client(), url, time_limit=self._fetch_timeout, max_bytes=self._max_bytes
            )
            snapshot = parse_jwks(document.body, max_keys=self._max_keys)
        except DocumentError as exc:
            self._failed(str(exc))
            return False
        except IdentityProviderUnavailableError:
            self._failed("discovery failed")
            return False
        self._install(snapshot, self._clock.monotonic() + cache_ttl(document.headers, self._ttl))
        self._retry_at = -math.inf
        if snapshot.skipped:
            logger.info("JWK Set: skipped %d unusable key(s)", snapshot.skipped)
        return True

    def _failed(self, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        self._retry_at = self._clock.monotonic() + RETRY_AFTER_FAILURE
        logger.warning(
            "JWK Set fetch failed: %s; %s",
            reason,
            "keeping the previous keys" if self._snapshot is not None else "no keys yet",
        )

    def _install(self, snapshot: KeySetSnapshot, expires_at: float) -> None:
        if self._snapshot is None or snapshot.fingerprint != self._snapshot.fingerprint:
            self._snapshot = snapshot
            self.generation += 1
        self.stale_at = expires_at


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if still running) and wait for it to finish."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # we were cancelled ourselves, not just the task
