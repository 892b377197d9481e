"""A token factory for tests: keys generated per run, every header and claim overridable.

``Signer`` holds one private key (RSA, EC or Ed25519) and its public JWK. ``TokenFactory``
mints compact JWS access tokens that are valid by default (RFC 9068 claims, ``typ: at+jwt``)
for the issuer, audience and clock it was given; ``mint(header={...}, claims={...})``
overrides or, with ``DROP``, removes any member. ``raw(...)`` signs hand-written header and
payload bytes (duplicate members, BOMs, wrong types). The ``*_signature`` helpers mutate a
token's signature for tampering tests.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.clock import FakeClock

ISSUER = "https://as.example/"
AUDIENCE = "https://api.example/gemini"
NOW = 1_800_000_000.0

class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: Marks a header member or claim to leave out.
DROP: Any = _Drop()

_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}


def b64url(data: bytes | str) -> str:
    """Unpadded base64url."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_int(value: int, length: int | None = None) -> str:
    size = length or max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))




@dataclass(eq=False)
class Signer:
    """A private key, the algorithm it signs with by default, and its public JWK."""

    private: Any
    alg: str
    kid: str | None
    jwk: dict[str, Any] = field(default_factory=dict)

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def sign(self, message: bytes, alg: str | None = None) -> bytes:
        """Sign ``message`` with ``alg`` (default: the signer's), whatever the key type says:
        tests use this to make *correct* signatures under the wrong algorithm."""
        return sign(self.private, alg or self.alg, message)


def sign(private: Any, alg: str, message: bytes) -> bytes:
    """A JWS signature of ``message`` under ``alg`` with ``private`` (bytes key for HS*)."""
    family, bits = alg[:2], alg[2:]
    if alg in ("EdDSA", "Ed25519"):
        signature: bytes = private.sign(message)
        return signature
    if alg.lower() == "none":
        return b""
    digest = _HASHES[bits]()
    if family == "HS":
        return hmac.new(private, message, getattr(hashlib, f"sha{bits}")).digest()
    if family == "RS":
        return bytes(private.sign(message, padding.PKCS1v15(), digest))
    if family == "PS":
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return bytes(private.sign(message, pss, digest))
    if family == "ES":
        r, s = decode_dss_signature(private.sign(message, ec.ECDSA(digest)))
        size = (private.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(f"cannot sign with {alg}")


def public_jwk(public: Any, **members: Any) -> dict[str, Any]:
    """The JWK of a public key, plus ``members`` (``DROP`` removes one)."""
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        rsa_numbers = public.public_numbers()
        jwk = {"kty": "RSA", "n": b64url_int(rsa_numbers.n), "e": b64url_int(rsa_numbers.e)}
    elif isinstance(public, ec.EllipticCurvePublicKey):
        point = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public.curve.name]
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": b64url_int(point.x, size),
            "y": b64url_int(point.y, size),
        }
    elif isinstance(public, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    else:
        raise TypeError(type(public))
    for name, value in members.items():
        if value is DROP:
            jwk.pop(name, None)
        else:
            jwk[name] = value
    return jwk


@functools.cache
def _rsa_private(slot: int, bits: int) -> rsa.RSAPrivateKey:
    # Cached per run: RSA generation dominates test time otherwise.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def rsa_signer(kid: str | None = "rsa-1", alg: str = "RS256", *, slot: int = 0,
               bits: int = 2048, declare_alg: bool = True, **members: Any) -> Signer:
    """An RSA signer; the same ``slot`` gives the same key within a run."""
    private = _rsa_private(slot, bits)
    extra: dict[str, Any] = {"use": "sig", **members}
    if kid is not None:
        extra.setdefault("kid", kid)
    if declare_alg:
        extra.setdefault("alg", alg)
    return Signer(private, alg, kid, public_jwk(private.public_key(), **extra))


_EC_CURVES: Mapping[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1,
}


def ec_signer(kid: str | None = "ec-1", alg: str = "ES256", *, declare_alg: bool = True,
              **members: Any) -> Signer:
    """A fresh EC signer on the curve of ``alg``."""
    private = ec.generate_private_key(_EC_CURVES[alg]())
    extra: dict[str, Any] = {"use": "sig", **members}
    if kid is not None:
        extra.setdefault("kid", kid)
    if declare_alg:
        extra.setdefault("alg", alg)
    return Signer(private, alg, kid, public_jwk(private.public_key(), **extra))


def ed25519_signer(kid: str | None = "ed-1", *, declare_alg: bool = True,
                   **members: Any) -> Signer:
    """A fresh Ed25519 signer (``alg: EdDSA``)."""
    private = ed25519.Ed25519PrivateKey.generate()
    extra: dict[str, Any] = {"use": "sig", **members}
    if kid is not None:
        extra.setdefault("kid", kid)
    if declare_alg:
        extra.setdefault("alg", "EdDSA")
    return Signer(private, "EdDSA", kid, public_jwk(private.public_key(), **extra))


def jwks(*signers: Signer) -> dict[str, Any]:
    """The public JWK Set of ``signers``."""
    return {"keys": [dict(signer.jwk) for signer in signers]}


def _merge(base: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(base)
    for name, value in (overrides or {}).items():
        if value is DROP:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


class TokenFactory:
    """Mints access tokens that pass validation unless told otherwise."""

    def __init__(self, signer: Signer, *, issuer: str = ISSUER, audience: Any = AUDIENCE,
                 clock: FakeClock | None = None, lifetime: int = 300,
                 scope: str = "gemini.generate gemini.read") -> None:
        self.signer = signer
        self.issuer = issuer
        self.audience = audience
        self.clock = clock or FakeClock()
        self.lifetime = lifetime
        self.scope = scope

    def header(self, overrides: Mapping[str, Any] | None = None, *,
               signer: Signer | None = None) -> dict[str, Any]:
        signer = signer or self.signer
        base: dict[str, Any] = {"alg": signer.alg, "typ": "at+jwt"}
        if signer.kid is not None:
            base["kid"] = signer.kid
        return _merge(base, overrides)

    def claims(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        now = int(self.clock.time())
        base = {
            "iss": self.issuer,
            "sub": "user-1",
            "aud": self.audience,
            "client_id": "client-1",
            "iat": now,
            "exp": now + self.lifetime,
            "jti": uuid.uuid4().hex,
            "scope": self.scope,
        }
        return _merge(base, overrides)

    def mint(self, *, header: Mapping[str, Any] | None = None,
             claims: Mapping[str, Any] | None = None, signer: Signer | None = None,
             sign_alg: str | None = None) -> str:
        """A token; ``sign_alg`` signs with another algorithm than the header names."""
        signer = signer or self.signer
        full_header = self.header(header, signer=signer)
        named = full_header.get("alg")
        return self.raw(
            json.dumps(full_header).encode(),
            json.dumps(self.claims(claims)).encode(),
            signer=signer,
            sign_alg=sign_alg or (named if isinstance(named, str) else None),
        )

    def raw(self, header: bytes | str, payload: bytes | str, *, signer: Signer | None = None,
            sign_alg: str | None = None, signature: bytes | None = None) -> str:
        """A token from hand-written header and payload bytes, signed by ``signer`` (or with
        the given ``signature`` bytes)."""
        signing_input = f"{b64url(header)}.{b64url(payload)}"
        if signature is None:
            signer = signer or self.signer
            signature = signer.sign(signing_input.encode(), sign_alg)
        return f"{signing_input}.{b64url(signature)}"


# ------------------------------------------------------------------------------------------
# Signature mutation (A25)
# ------------------------------------------------------------------------------------------


def parts(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def signature_of(token: str) -> bytes:
    encoded = parts(token)[2]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def with_signature(token: str, signature: bytes | str) -> str:
    header, payload, _ = parts(token)
    encoded = signature if isinstance(signature, str) else b64url(signature)
    return f"{header}.{payload}.{encoded}"


def flip_bit(token: str, bit: int) -> str:
    signature = bytearray(signature_of(token))
    signature[bit // 8] ^= 0x80 >> (bit % 8)
    return with_signature(token, bytes(signature))


def truncate_signature(token: str, nbytes: int = 1) -> str:
    return with_signature(token, signature_of(token)[:-nbytes])


def pad_signature(token: str) -> str:
    return token + "="


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def noncanonical_signature(token: str) -> str:
    """The same signature bytes with non-zero unused bits in the last character."""
    header, payload, encoded = parts(token)
    unused = {2: 4, 3: 2}[len(encoded) % 4]  # signatures are never a multiple of 3 bytes here
    last = _ALPHABET.index(encoded[-1])
    return f"{header}.{payload}.{encoded[:-1]}{_ALPHABET[last | (1 << unused) - 1]}"


def der_signature(token: str) -> str:
    """An ES* token with its ``r || s`` signature re-encoded as DER."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    raw = signature_of(token)
    half = len(raw) // 2
    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    der = encode_dss_signature(r, s)
    return with_signature(token, der)
