#!/usr/bin/env python3
"""Micro benchmark of JWT access-token validation: µs per ``verify``.

    .venv/bin/python bench/jwt_bench.py            # about 15 s
    .venv/bin/python bench/jwt_bench.py --quick

Rows:

* ``raw cryptography RS256 verify``: ``RSAPublicKey.verify`` alone, the floor.
* ``joserfc jwt.decode RS256``: joserfc's high-level decode (signature only, no claim checks),
  for comparison.
* ``raw cryptography ES256 verify``: the ECDSA floor (DER signature, no conversion).
* ``first-seen RS256`` / ``first-seen ES256``: :meth:`JWTValidator.verify` of tokens it has
  never seen (every check, signature included, plus storing the result).
* ``cached``: the same token again (hash, lookup, time re-check).

Each row is the median of several rounds over distinct pre-minted tokens, in one process, so
only the ratios travel to other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from gemini_scale.auth.jwt import Issuer, JWTValidator

ISSUER = "https://as.example/"
AUDIENCE = "https://api.example/gemini"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64int(value: int, size: int | None = None) -> str:
    return b64url(value.to_bytes(size or (value.bit_length() + 7) // 8, "big"))


def mint(sign: Callable[[bytes], bytes], alg: str, kid: str, now: int) -> str:
    header = {"alg": alg, "typ": "at+jwt", "kid": kid}
    claims = {
        "iss": ISSUER, "sub": "user-1", "aud": AUDIENCE, "client_id": "client-1",
        "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex,
        "scope": "gemini.generate gemini.read", "tenant": "acme",
    }
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


async def per_call(items: list[Any], call: Callable[[Any], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    for item in items:
        await call(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def median_of(rounds: list[float]) -> float:
    return statistics.median(rounds)


async def main(quick: bool) -> None:
    count = 300 if quick else 1500
    rounds = 3 if quick else 7
    now = int(time.time())

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_numbers = rsa_key.public_key().public_numbers()
    ec_numbers = ec_key.public_key().public_numbers()
    jwk_set = {"keys": [
        {"kty": "RSA", "kid": "r1", "use": "sig", "alg": "RS256",
         "n": b64int(rsa_numbers.n), "e": b64int(rsa_numbers.e)},
        {"kty": "EC", "kid": "e1", "use": "sig", "alg": "ES256", "crv": "P-256",
         "x": b64int(ec_numbers.x, 32), "y": b64int(ec_numbers.y, 32)},
    ]}

    def rs256(message: bytes) -> bytes:
        return rsa_key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def es256(message: bytes) -> bytes:
        r, s = decode_dss_signature(ec_key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    print(f"minting {rounds} x {count} RS256 and ES256 tokens ...", flush=True)
    rs_tokens = [[mint(rs256, "RS256", "r1", now) for _ in range(count)] for _ in range(rounds)]
    es_tokens = [[mint(es256, "ES256", "e1", now) for _ in range(count)] for _ in range(rounds)]

    public = rsa_key.public_key()
    raw_items = []
    for token in rs_tokens[0]:
        signing_input, _, signature = token.rpartition(".")
        raw_items.append((signing_input.encode(), base64.urlsafe_b64decode(signature + "==")))

    async def raw_verify(item: tuple[bytes, bytes]) -> None:
        public.verify(item[1], item[0], padding.PKCS1v15(), hashes.SHA256())

    ec_public = ec_key.public_key()
    raw_ec_items = []
    for token in es_tokens[0]:
        signing_input, _, signature = token.rpartition(".")
        raw = base64.urlsafe_b64decode(signature + "==")
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        raw_ec_items.append((signing_input.encode(), der))

    async def raw_ec_verify(item: tuple[bytes, bytes]) -> None:
        ec_public.verify(item[1], item[0], ec.ECDSA(hashes.SHA256()))

    key_set = KeySet.import_key_set(jwk_set)  # type: ignore[arg-type]

    async def jose_decode(token: str) -> None:
        jose_jwt.decode(token, key_set, algorithms=["RS256"])

    results: dict[str, list[float]] = {name: [] for name in (
        "raw cryptography RS256 verify", "joserfc jwt.decode RS256 (no claim checks)",
        "ours: first-seen RS256", "raw cryptography ES256 verify", "ours: first-seen ES256",
        "ours: cached",
    )}
    issuer = Issuer(issuer=ISSUER, audience=AUDIENCE, jwks=jwk_set)
    for index in range(rounds):
        validator = JWTValidator([issuer], cache_size=4 * count)
        results["raw cryptography RS256 verify"].append(await per_call(raw_items, raw_verify))
        results["joserfc jwt.decode RS256 (no claim checks)"].append(
            await per_call(rs_tokens[index], jose_decode)
        )
        results["ours: first-seen RS256"].append(
            await per_call(rs_tokens[index], validator.verify)
        )
        results["raw cryptography ES256 verify"].append(
            await per_call(raw_ec_items, raw_ec_verify)
        )
        results["ours: first-seen ES256"].append(
            await per_call(es_tokens[index], validator.verify)
        )
        results["ours: cached"].append(
            await per_call([rs_tokens[index][0]] * count, validator.verify)
        )
        await validator.aclose()

    floor = median_of(results["raw cryptography RS256 verify"])
    print(f"\n{'case':<45} {'µs/verify':>10} {'x raw RS256':>12}")
    for name, values in results.items():
        value = median_of(values)
        print(f"{name:<45} {value:>10.1f} {value / floor:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    asyncio.run(main(parser.parse_args().quick))
