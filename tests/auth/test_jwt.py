"""JWTValidator against security.md §4A (A09-A27, A34, A37's claims), with a fake IdP.

Tokens come from ``tests.auth.tokens``; the IdP is an ``httpx.MockTransport`` that records
every request, so "zero fetches" is asserted by counting, never by mocking our code.
"""

from __future__ import annotations

import base64
import datetime
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from gemini_scale.auth.base import TokenVerifier
from gemini_scale.auth.errors import InvalidTokenError
from gemini_scale.auth.jwt import Issuer, JWTValidator
from gemini_scale.errors import ConfigurationError
from gemini_scale.principal import Principal
from tests.auth.fake_idp import FakeIdP, FakeNetwork
from tests.auth.tokens import (
    AUDIENCE,
    DROP,
    ISSUER,
    FakeClock,
    Signer,
    TokenFactory,
    b64url,
    der_signature,
    ec_signer,
    ed25519_signer,
    flip_bit,
    jwks,
    noncanonical_signature,
    pad_signature,
    rsa_signer,
    signature_of,
    truncate_signature,
    with_signature,
)

# The fixed refusal messages are part of the contract: no input is ever interpolated.
TOO_LARGE = "The access token is too large."
MALFORMED = "The access token is malformed."
ALGORITHM = "The access token's signing algorithm is not accepted."
CRITICAL = "The access token has an unsupported critical header."
WRONG_TYPE = "The token is not an access token."
UNTRUSTED = "The access token's issuer is not trusted."
MISSING_CLAIM = "The access token lacks a required claim."
BAD_CLAIM = "The access token has a claim of the wrong type."
EXPIRED = "The access token has expired."
NOT_YET_VALID = "The access token is not valid yet."
TOO_OLD = "The access token is too old."
TOO_LONG = "The access token's lifetime is too long."
AUDIENCE_REFUSED = "The access token is not meant for this service."
SIGNATURE = "The access token's signature is invalid."
NO_KEY = "No signing key of the issuer matches the access token."
ALL_MESSAGES = {
    TOO_LARGE, MALFORMED, ALGORITHM, CRITICAL, WRONG_TYPE, UNTRUSTED, MISSING_CLAIM,
    BAD_CLAIM, EXPIRED, NOT_YET_VALID, TOO_OLD, TOO_LONG, AUDIENCE_REFUSED, SIGNATURE, NO_KEY,
}

RS = rsa_signer("kid1")
ATTACKER = rsa_signer("kid1", slot=1)  # same kid, the attacker's own key
EC = ec_signer("ec1")
ED = ed25519_signer("ed1")
LEEWAY = 60


@pytest.fixture
def idp() -> FakeIdP:
    return FakeIdP(signers=(RS, EC, ED))


Build = Callable[..., JWTValidator]


@pytest.fixture
async def build(network: FakeNetwork, idp: FakeIdP, clock: FakeClock) -> AsyncIterator[Build]:
    """Validators for ISSUER (keys from the fake IdP unless ``jwks=`` is given)."""
    made: list[JWTValidator] = []
    client = network.client()

    def make(*, validator: dict[str, Any] | None = None, **issuer: Any) -> JWTValidator:
        settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
        if "jwks" not in issuer and "jwks_url" not in issuer and not issuer.pop("discover", False):
            settings["jwks_url"] = idp.jwks_url
        settings.update(issuer)
        made.append(
            JWTValidator([Issuer(**settings)], http_client=client, clock=clock, **(validator or {}))
        )
        return made[-1]

    yield make
    for validator in made:
        await validator.aclose()
    await client.aclose()


@pytest.fixture
def validator(build: Build) -> JWTValidator:
    return build()


@pytest.fixture
def tokens(clock: FakeClock) -> TokenFactory:
    return TokenFactory(RS, clock=clock)


async def refusal(validator: JWTValidator, token: str) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        await validator.verify(token)
    assert caught.value.status_code == 401
    assert caught.value.error == "invalid_token"
    return caught.value.description


# ------------------------------------------------------------------------------------------
# The happy path
# ------------------------------------------------------------------------------------------


async def test_a_valid_token_gives_its_principal(validator: JWTValidator, tokens: TokenFactory,
                                                 network: FakeNetwork) -> None:
    token = tokens.mint(claims={"tenant": "acme", "sub": "alice"})
    principal = await validator.verify(token)
    assert principal.issuer == ISSUER
    assert principal.subject == "alice"
    assert principal.client_id == "client-1"
    assert principal.tenant == "acme"
    assert principal.scopes == {"gemini.generate", "gemini.read"}
    assert principal.claims["sub"] == "alice"
    with pytest.raises(TypeError):
        principal.claims["sub"] = "mallory"  # type: ignore[index]
    assert network.urls == [idp_url("/jwks")]
    assert isinstance(validator, TokenVerifier)


def idp_url(path: str) -> str:
    return ISSUER.rstrip("/") + path


@pytest.mark.parametrize(
    ("signer", "alg"),
    [
        pytest.param(rsa_signer("any-rsa", declare_alg=False), alg, id=alg)
        for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    ]
    + [
        pytest.param(ec_signer("es256", "ES256"), "ES256", id="ES256"),
        pytest.param(ec_signer("es384", "ES384"), "ES384", id="ES384"),
        pytest.param(ec_signer("es512", "ES512"), "ES512", id="ES512"),
        pytest.param(ed25519_signer("ed"), "EdDSA", id="EdDSA"),
        pytest.param(ed25519_signer("ed-fully-specified", declare_alg=False), "Ed25519",
                     id="Ed25519"),
    ],
)
async def test_every_supported_algorithm_verifies(build: Build, clock: FakeClock,
                                                  signer: Signer, alg: str) -> None:
    validator = build(jwks=jwks(signer), algorithms=frozenset({alg}))
    token = TokenFactory(signer, clock=clock).mint(header={"alg": alg})
    assert (await validator.verify(token)).subject == "user-1"


async def test_default_algorithms_and_typ_are_pinned() -> None:
    issuer = Issuer(issuer=ISSUER, audience=AUDIENCE, jwks=jwks(RS))
    assert issuer.algorithms == {"RS256", "PS256", "ES256", "EdDSA"}
    assert issuer.require_typ is True  # A17: the opt-out is off unless asked for
    assert issuer.required_claims == ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")


async def test_default_algorithms_each_work(validator: JWTValidator, clock: FakeClock) -> None:
    for signer in (RS, EC, ED):
        assert await validator.verify(TokenFactory(signer, clock=clock).mint())


async def test_handles_looks_only_at_the_shape(validator: JWTValidator) -> None:
    assert validator.handles("a.b.c")
    assert not validator.handles("opaque-token")
    assert not validator.handles("a.b")
    assert not validator.handles("a.b.c.d.e")


async def test_a_dev_style_issuer_with_static_keys_needs_no_url(build: Build,
                                                                clock: FakeClock,
                                                                network: FakeNetwork) -> None:
    validator = build(issuer="urn:gemini-scale:dev-issuer", jwks=jwks(EC))
    token = TokenFactory(EC, issuer="urn:gemini-scale:dev-issuer", clock=clock).mint()
    assert (await validator.verify(token)).issuer == "urn:gemini-scale:dev-issuer"
    assert network.requests == []


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"algorithms": frozenset({"none"})}, id="none"),
        pytest.param({"algorithms": frozenset({"None"})}, id="None"),
        pytest.param({"algorithms": frozenset({"RS256", "HS256"})}, id="HS256"),
        pytest.param({"algorithms": frozenset({"hs512"})}, id="hs512"),
        pytest.param({"algorithms": frozenset({"RS1"})}, id="unknown-alg"),
        pytest.param({"algorithms": frozenset()}, id="no-alg"),
        pytest.param({"jwks_url": "https://as.example/jwks", "jwks": jwks(RS)},
                     id="two-key-sources"),
        pytest.param({"jwks_url": "ftp://as.example/jwks"}, id="ftp-jwks"),
        pytest.param({"issuer": "urn:no-discovery"}, id="no-discovery-possible"),
        pytest.param({"issuer": "https://as.example/?tenant=1"}, id="issuer-with-query"),
        pytest.param({"issuer": ""}, id="empty-issuer"),
        pytest.param({"audience": ""}, id="empty-audience"),
        pytest.param({"audience": []}, id="no-audience"),
        pytest.param({"audience": ["ok", ""]}, id="an-empty-audience"),
        pytest.param({"leeway": -1}, id="negative-leeway"),
        pytest.param({"leeway": float("nan")}, id="nan-leeway"),
        pytest.param({"max_token_age": 0}, id="zero-age"),
        pytest.param({"max_lifetime": -5}, id="negative-lifetime"),
        pytest.param({"jwks_ttl": 0}, id="zero-ttl"),
        pytest.param({"jwks_cooldown": -1}, id="negative-cooldown"),
        pytest.param({"required_claims": ("iss", "aud", "sub")}, id="exp-not-required"),
        pytest.param({"required_claims": ("exp", "aud")}, id="iss-not-required"),
        pytest.param({"scope_claims": ("roles",)}, id="unknown-scope-claim"),
        pytest.param({"tenant_claim": ""}, id="empty-tenant-claim"),
    ],
)
def test_bad_issuer_settings_are_refused_at_construction(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Issuer(**{"issuer": ISSUER, "audience": AUDIENCE, **settings})


def test_bad_validator_settings_are_refused() -> None:
    issuer = Issuer(issuer=ISSUER, audience=AUDIENCE, jwks=jwks(RS))
    with pytest.raises(ConfigurationError):
        JWTValidator([])
    with pytest.raises(ConfigurationError):
        JWTValidator([issuer, Issuer(issuer=ISSUER, audience="other", jwks=jwks(EC))])
    with pytest.raises(ConfigurationError):
        JWTValidator([issuer], max_token_bytes=0)
    with pytest.raises(ConfigurationError):
        JWTValidator([issuer], cache_size=-1)
    secret_only = Issuer(issuer=ISSUER, audience=AUDIENCE,
                         jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    with pytest.raises(ConfigurationError):  # a static set with nothing usable in it
        JWTValidator([secret_only])


# ------------------------------------------------------------------------------------------
# A09-A16: header attacks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"\x01" * 32], ids=["empty", "random"])
async def test_a09_alg_none_is_refused(validator: JWTValidator, tokens: TokenFactory,
                                       network: FakeNetwork, alg: str, signature: bytes) -> None:
    header = json.dumps({"alg": alg, "typ": "at+jwt", "kid": "kid1"})
    token = tokens.raw(header, json.dumps(tokens.claims()), signature=signature)
    assert await refusal(validator, token) in {MALFORMED, ALGORITHM}
    assert network.requests == []


def _rsa_public_encodings() -> dict[str, bytes]:
    public = RS.public
    ser = serialization
    numbers = public.public_numbers()
    return {
        "pem-spki": public.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo),
        "pem-pkcs1": public.public_bytes(ser.Encoding.PEM, ser.PublicFormat.PKCS1),
        "der": public.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo),
        "jwk-json": json.dumps(RS.jwk).encode(),
        "n-bytes": numbers.n.to_bytes(256, "big"),
        "openssh": public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH),
    }


@pytest.mark.parametrize("encoding", list(_rsa_public_encodings()))
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_a10_hmac_with_the_rsa_public_key_is_refused(
    validator: JWTValidator, tokens: TokenFactory, network: FakeNetwork, encoding: str, alg: str
) -> None:
    secret = _rsa_public_encodings()[encoding]
    forger = Signer(secret, alg, "kid1")
    token = tokens.mint(signer=forger)
    assert await refusal(validator, token) == ALGORITHM
    assert network.requests == []


async def test_a11_a_key_declaring_rs256_verifies_nothing_else(build: Build,
                                                                tokens: TokenFactory) -> None:
    validator = build(jwks=jwks(RS), algorithms=frozenset({"RS256", "RS512", "PS256"}))
    assert await validator.verify(tokens.mint())
    for alg in ("RS512", "PS256"):
        # Correctly signed with the same private key under the other algorithm.
        assert await refusal(validator, tokens.mint(header={"alg": alg})) == NO_KEY


async def test_a11_an_es256_key_never_verifies_es384(build: Build, clock: FakeClock) -> None:
    for declare in (True, False):
        signer = ec_signer("ec-256", "ES256", declare_alg=declare)
        validator = build(jwks=jwks(signer), algorithms=frozenset({"ES256", "ES384"}))
        factory = TokenFactory(signer, clock=clock)
        assert await validator.verify(factory.mint())
        # A P-256 key signing with SHA-384: the curve does not fit ES384.
        token = factory.mint(header={"alg": "ES384"}, sign_alg="ES384")
        assert await refusal(validator, token) == NO_KEY


async def test_a11_key_type_decides_never_the_token(build: Build, clock: FakeClock) -> None:
    rsa_any = rsa_signer("shared", declare_alg=False)
    ec_any = ec_signer("other", declare_alg=False)
    validator = build(jwks=jwks(rsa_any, ec_any),
                      algorithms=frozenset({"RS256", "PS256", "ES256"}))
    factory = TokenFactory(rsa_any, clock=clock)
    # An EC signature under an RSA key's kid, and the reverse: never cross-verified.
    assert await refusal(validator, factory.mint(header={"alg": "ES256"}, signer=Signer(
        ec_any.private, "ES256", "shared"))) == NO_KEY
    assert await refusal(validator, factory.mint(signer=Signer(rsa_any.private, "RS256",
                                                               "other"))) == NO_KEY
    # The header's alg is the one used: a PKCS#1 v1.5 signature labelled PS256 and the
    # reverse both fail, though the key allows both algorithms.
    mislabelled = factory.mint(header={"alg": "PS256"}, sign_alg="RS256")
    assert await refusal(validator, mislabelled) == SIGNATURE
    assert await refusal(validator, factory.mint(sign_alg="PS256")) == SIGNATURE
    assert await validator.verify(factory.mint(header={"alg": "PS256"}))


_AUDITED = ("open", "socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system")
_audit_log: list[list[str]] = []  # non-empty while a test watches


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _audit_log and event in _AUDITED:
        _audit_log[-1].append(event)


sys.addaudithook(_audit)


@pytest.mark.parametrize(
    "kid",
    ["../../../../dev/null", "' OR '1'='1", "", "A" * 3000, "A" * 10_240, "a\x00b", 123, ["a"],
     {"$ne": 1}, None, True],
    ids=["path", "sql", "empty", "3KB", "10KB", "nul", "int", "list", "object", "null", "bool"],
)
async def test_a12_hostile_kids_touch_nothing(validator: JWTValidator, tokens: TokenFactory,
                                              idp: FakeIdP, kid: Any) -> None:
    assert await validator.verify(tokens.mint())  # warm: 1 fetch
    token = tokens.mint(header={"kid": kid}, signer=ATTACKER)
    _audit_log.append([])
    try:
        assert await refusal(validator, token) in {MALFORMED, NO_KEY, TOO_LARGE}
    finally:
        seen = _audit_log.pop()
    assert seen == []  # no file, socket or process was touched
    assert idp.jwks_hits == 1  # the cool-down holds: no refetch for a junk kid


async def test_a12_junk_kids_refetch_at_most_once_per_cooldown(
    validator: JWTValidator, tokens: TokenFactory, idp: FakeIdP, clock: FakeClock
) -> None:
    assert await validator.verify(tokens.mint())
    clock.advance(31)
    for kid in ("../x", "' OR 1=1", "", "z" * 100):
        assert await refusal(validator, tokens.mint(header={"kid": kid}, signer=ATTACKER)) == NO_KEY
    assert idp.jwks_hits == 2


@pytest.mark.parametrize("with_kid", [True, False])
async def test_a13_an_embedded_jwk_is_never_a_key(build: Build, clock: FakeClock,
                                                  network: FakeNetwork, with_kid: bool) -> None:
    validator = build(jwks=jwks(RS))  # one key, so a kid-less token uses it
    attacker = Signer(ATTACKER.private, "RS256", "kid1" if with_kid else None)
    token = TokenFactory(attacker, clock=clock).mint(header={"jwk": ATTACKER.jwk})
    assert await refusal(validator, token) == SIGNATURE
    assert network.requests == []


@pytest.mark.parametrize("member", ["jku", "x5u"])
@pytest.mark.parametrize(
    "url",
    ["https://as.example/evil.json", "http://127.0.0.1:9/evil.json", "http://169.254.169.254/",
     "file:///etc/passwd"],
)
async def test_a14_jku_and_x5u_are_never_fetched(build: Build, tokens: TokenFactory,
                                                 idp: FakeIdP, network: FakeNetwork,
                                                 member: str, url: str) -> None:
    idp.script("/evil.json", body=jwks(Signer(ATTACKER.private, "RS256", "evil")))
    validator = build()
    assert await validator.verify(tokens.mint())
    for kid in ("evil", "kid1"):
        token = tokens.mint(header={member: url, "kid": kid}, signer=ATTACKER)
        assert await refusal(validator, token) in {NO_KEY, SIGNATURE}
    assert network.urls == [idp.jwks_url]
    static = build(jwks=jwks(RS))
    before = len(network.requests)
    assert await refusal(static, tokens.mint(header={member: url}, signer=ATTACKER)) == SIGNATURE
    assert len(network.requests) == before


async def test_a15_an_x5c_chain_is_never_a_key(validator: JWTValidator, tokens: TokenFactory,
                                               network: FakeNetwork) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "as.example")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ATTACKER.public).serial_number(1)
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=36500))
        .sign(ATTACKER.private, hashes.SHA256())
    )
    chain = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    for header in ({"x5c": chain}, {"x5c": chain, "kid": DROP}):
        assert await refusal(validator, tokens.mint(header=header, signer=ATTACKER)) in {
            SIGNATURE, NO_KEY,
        }
    assert network.urls == [idp_url("/jwks")]


@pytest.mark.parametrize(
    "header",
    [{"crit": ["exp"]}, {"crit": ["foo"], "foo": 1}, {"crit": []}, {"crit": "kid"},
     {"crit": None}, {"crit": ["b64"], "b64": False}],
)
async def test_a16_any_crit_is_refused(validator: JWTValidator, tokens: TokenFactory,
                                       network: FakeNetwork, header: dict[str, Any]) -> None:
    assert await refusal(validator, tokens.mint(header=header)) == CRITICAL
    assert network.requests == []


# ------------------------------------------------------------------------------------------
# A17, A24: explicit typing and cross-JWT confusion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typ",
    [DROP, "JWT", "jwt", "dpop+jwt", "application/jwt", "at+jwt ", " at+jwt", "at+jwt\n",
     "at+jwt; charset=utf-8", "logout+jwt", "", 1, None, ["at+jwt"], "\uff41\uff54+jwt"],
    ids=repr,
)
async def test_a17_typ_other_than_at_jwt_is_refused(validator: JWTValidator,
                                                    tokens: TokenFactory, typ: Any) -> None:
    assert await refusal(validator, tokens.mint(header={"typ": typ})) == WRONG_TYPE


@pytest.mark.parametrize(
    "typ", ["at+jwt", "application/at+jwt", "AT+JWT", "application/AT+JWT", "at+JWT"]
)
async def test_a17_the_valid_spellings_of_at_jwt(validator: JWTValidator,
                                                 tokens: TokenFactory, typ: str) -> None:
    assert await validator.verify(tokens.mint(header={"typ": typ}))


@pytest.mark.parametrize("typ", [DROP, "JWT", "jwt", "application/jwt", "at+jwt"])
async def test_a17_opt_out_admits_untyped_and_generic_jwts(build: Build, tokens: TokenFactory,
                                                           typ: Any) -> None:
    validator = build(require_typ=False)
    assert await validator.verify(tokens.mint(header={"typ": typ}))


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ({"typ": "JWT"}, {"nonce": "n-0S6_WzA2Mj"}),
        ({"typ": DROP}, {"nonce": "n-0S6_WzA2Mj"}),
        ({"typ": DROP}, {"events": {"http://schemas.openid.net/event/backchannel-logout": {}}}),
        ({"typ": "dpop+jwt"}, {}),
        ({"typ": "logout+jwt"}, {}),
        ({"typ": "secevent+jwt"}, {}),
    ],
)
async def test_a17_a24_opt_out_still_refuses_other_kinds(build: Build, tokens: TokenFactory,
                                                         header: dict[str, Any],
                                                         claims: dict[str, Any]) -> None:
    validator = build(require_typ=False)
    assert await refusal(validator, tokens.mint(header=header, claims=claims)) == WRONG_TYPE


def _id_token(tokens: TokenFactory) -> str:
    return tokens.mint(header={"typ": "JWT"}, claims={
        "aud": "client-1", "nonce": "n-0S6", "azp": "client-1",
        "auth_time": int(tokens.clock.time()), "client_id": DROP, "scope": DROP,
    })


def _logout_token(tokens: TokenFactory) -> str:
    return tokens.mint(header={"typ": "logout+jwt"}, claims={
        "aud": AUDIENCE, "sid": "08a5019c", "scope": DROP,
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    })


def _dpop_proof(tokens: TokenFactory) -> str:
    return tokens.raw(
        json.dumps({"typ": "dpop+jwt", "alg": "RS256", "jwk": RS.jwk}),
        json.dumps({"jti": "e1j3V_bKic8-LAEB", "htm": "POST", "iat": int(tokens.clock.time()),
                    "htu": "https://api.example/v1beta/models/x:generateContent"}),
    )


@pytest.mark.parametrize("kind", [_id_token, _logout_token, _dpop_proof])
@pytest.mark.parametrize("require_typ", [True, False])
async def test_a24_other_jwts_are_not_access_tokens(build: Build, tokens: TokenFactory,
                                                    kind: Callable[[TokenFactory], str],
                                                    require_typ: bool) -> None:
    validator = build(require_typ=require_typ)
    assert await refusal(validator, kind(tokens)) in {WRONG_TYPE, MISSING_CLAIM}


# ------------------------------------------------------------------------------------------
# A18-A23: claims
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"])
async def test_a18_each_required_claim(validator: JWTValidator, tokens: TokenFactory,
                                       network: FakeNetwork, claim: str) -> None:
    assert await refusal(validator, tokens.mint(claims={claim: DROP})) == MISSING_CLAIM
    assert network.requests == []  # refused before any key was needed


async def test_a18_relaxed_required_claims(build: Build, tokens: TokenFactory) -> None:
    validator = build(required_claims=("iss", "exp", "aud"))
    principal = await validator.verify(tokens.mint(claims={
        "sub": DROP, "client_id": DROP, "azp": "svc-7", "iat": DROP, "jti": DROP,
    }))
    assert principal.subject == "svc-7"  # no sub: the client is the subject
    assert principal.client_id == "svc-7"
    assert await refusal(validator, tokens.mint(claims={"sub": DROP, "client_id": DROP})) == (
        MISSING_CLAIM
    )


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "1800000300"}, {"exp": 1.5e9}, {"exp": 1800000300.0}, {"exp": -1},
        {"exp": 2**64}, {"exp": True}, {"exp": None}, {"exp": [1800000300]},
        {"iat": True}, {"iat": "1800000000"}, {"iat": 1800000000.5}, {"iat": -5},
        {"nbf": "0"}, {"nbf": 1.5}, {"nbf": False},
        {"aud": 123}, {"aud": [1, 2]}, {"aud": {}}, {"aud": None}, {"aud": [["x"]]},
        {"aud": [AUDIENCE, 5]},
        {"iss": {}}, {"iss": 123}, {"iss": None}, {"iss": [ISSUER]},
        {"sub": 123}, {"sub": None}, {"sub": ""},
        {"client_id": 5}, {"azp": ["x"]}, {"jti": 5},
        {"scope": ["gemini.generate"]}, {"scope": 5}, {"scope": None},
    ],
    ids=repr,
)
async def test_a19_claim_types_are_strict(validator: JWTValidator, tokens: TokenFactory,
                                          network: FakeNetwork, claims: dict[str, Any]) -> None:
    assert await refusal(validator, tokens.mint(claims=claims)) in {BAD_CLAIM, MISSING_CLAIM}
    assert network.requests == []


@pytest.mark.parametrize(
    ("claims", "accepted", "message"),
    [
        ({"exp": -LEEWAY - 1}, False, EXPIRED),
        ({"exp": -LEEWAY}, False, EXPIRED),
        ({"exp": -LEEWAY + 1}, True, None),
        ({"nbf": LEEWAY + 1}, False, NOT_YET_VALID),
        ({"nbf": LEEWAY}, True, None),
        ({"nbf": LEEWAY - 1}, True, None),
        ({"iat": LEEWAY + 1}, False, NOT_YET_VALID),
        ({"iat": LEEWAY}, True, None),
    ],
    ids=repr,
)
async def test_a20_leeway_boundaries(validator: JWTValidator, tokens: TokenFactory,
                                     clock: FakeClock, claims: dict[str, int], accepted: bool,
                                     message: str | None) -> None:
    now = int(clock.time())
    values = {"iat": now - 300, **{name: now + delta for name, delta in claims.items()}}
    token = tokens.mint(claims=values)
    if accepted:
        assert await validator.verify(token)
    else:
        assert await refusal(validator, token) == message


async def test_a20_leeway_is_configurable(build: Build, tokens: TokenFactory,
                                          clock: FakeClock) -> None:
    now = int(clock.time())
    strict = build(leeway=0)
    assert await refusal(strict, tokens.mint(claims={"iat": now - 60, "exp": now})) == EXPIRED
    assert await strict.verify(tokens.mint(claims={"iat": now - 60, "exp": now + 1}))


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"iat": LEEWAY + 60}, NOT_YET_VALID),
        ({"iat": 0, "exp": 30 * 86_400}, TOO_LONG),
        ({"iat": 0, "exp": 10 * 365 * 86_400}, TOO_LONG),
        ({"iat": -86_400 - LEEWAY, "exp": 100}, TOO_OLD),
    ],
    ids=["future-iat", "30-day-lifetime", "10-year-exp", "too-old"],
)
async def test_a21_iat_and_lifetime_caps(validator: JWTValidator, tokens: TokenFactory,
                                         clock: FakeClock, claims: dict[str, int],
                                         message: str) -> None:
    now = int(clock.time())
    token = tokens.mint(claims={name: now + delta for name, delta in claims.items()})
    assert await refusal(validator, token) == message


async def test_a21_caps_are_configurable(build: Build, tokens: TokenFactory,
                                         clock: FakeClock) -> None:
    now = int(clock.time())
    ten_years = tokens.mint(claims={"iat": now, "exp": now + 10 * 365 * 86_400})
    assert await build(max_lifetime=None).verify(ten_years)
    old = tokens.mint(claims={"iat": now - 3 * 86_400, "exp": now + 100})
    assert await refusal(build(max_lifetime=None), old) == TOO_OLD
    assert await build(max_lifetime=None, max_token_age=None).verify(old)
    no_iat = tokens.mint(claims={"iat": DROP, "exp": now + 2 * 86_400})
    lax = build(required_claims=("iss", "exp", "aud", "sub"))
    assert await refusal(lax, no_iat) == TOO_LONG  # without iat the cap counts from now


@pytest.mark.parametrize(
    "iss",
    ["https://as.example", "https://AS.example/", "http://as.example/", "https://as.example/ ",
     "https://as.example/.", "https://as.example//", " https://as.example/", "https://evil.example/"],
)
@pytest.mark.parametrize("discover", [False, True], ids=["jwks_url", "discovery"])
async def test_a22_issuer_must_match_exactly_and_costs_no_fetch(
    build: Build, tokens: TokenFactory, network: FakeNetwork, iss: str, discover: bool
) -> None:
    validator = build(discover=discover)
    assert await refusal(validator, tokens.mint(claims={"iss": iss})) == UNTRUSTED
    assert network.requests == []


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [
        (AUDIENCE, True),
        (["other", AUDIENCE], True),
        ([AUDIENCE, AUDIENCE], True),
        (["other"], False),
        (AUDIENCE.upper(), False),
        (AUDIENCE + "/", False),
        ("", False),
        ([], False),
    ],
    ids=repr,
)
async def test_a23_audience(validator: JWTValidator, tokens: TokenFactory,
                            network: FakeNetwork, aud: Any, accepted: bool) -> None:
    token = tokens.mint(claims={"aud": aud})
    if accepted:
        assert await validator.verify(token)
    else:
        assert await refusal(validator, token) == AUDIENCE_REFUSED
        assert network.requests == []


async def test_a23_several_configured_audiences(build: Build, tokens: TokenFactory) -> None:
    validator = build(audience=("https://api.example/gemini", "gemini-gateway"))
    assert await validator.verify(tokens.mint(claims={"aud": "gemini-gateway"}))
    assert await validator.verify(tokens.mint(claims={"aud": ["x", "gemini-gateway"]}))
    assert await refusal(validator, tokens.mint(claims={"aud": "gemini"})) == AUDIENCE_REFUSED


# ------------------------------------------------------------------------------------------
# A25-A27: signatures, structure, size
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signer", [RS, EC, ED], ids=["RS256", "ES256", "EdDSA"])
async def test_a25_every_bit_flip_of_a_signature_is_refused(validator: JWTValidator,
                                                            clock: FakeClock,
                                                            signer: Signer) -> None:
    token = TokenFactory(signer, clock=clock).mint()
    bits = len(signature_of(token)) * 8
    refused = set()
    for bit in range(bits):
        refused.add(await refusal(validator, flip_bit(token, bit)))
    assert refused == {SIGNATURE}
    assert validator.stats.signatures == bits
    assert await validator.verify(token)


@pytest.mark.parametrize("signer", [RS, EC, ED], ids=["RS256", "ES256", "EdDSA"])
async def test_a25_length_and_encoding_mutations(validator: JWTValidator, clock: FakeClock,
                                                 signer: Signer) -> None:
    token = TokenFactory(signer, clock=clock).mint()
    for mutated in (
        truncate_signature(token),
        truncate_signature(token, 32),
        with_signature(token, signature_of(token) + b"\x00"),
        with_signature(token, b"\x00" + signature_of(token)),
        pad_signature(token),
        token + "==",
        noncanonical_signature(token),
        with_signature(token, b""),
        with_signature(token, signature_of(token).hex()),
    ):
        assert await refusal(validator, mutated) in {SIGNATURE, MALFORMED}
    assert await validator.verify(token)


async def test_a25_ecdsa_der_and_zero_signatures(validator: JWTValidator,
                                                 clock: FakeClock) -> None:
    token = TokenFactory(EC, clock=clock).mint()
    assert await refusal(validator, der_signature(token)) == SIGNATURE
    assert await refusal(validator, with_signature(token, bytes(64))) == SIGNATURE  # r = s = 0
    # r = s = n (the curve order) reduces to zero as well
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    assert await refusal(validator, with_signature(token, order.to_bytes(32, "big") * 2)) == (
        SIGNATURE
    )
    assert await validator.verify(token)


def _segments(tokens: TokenFactory) -> tuple[str, str, str]:
    header, payload, signature = tokens.mint().split(".")
    return header, payload, signature


STRUCTURE_CASES: dict[str, Callable[[TokenFactory], str]] = {
    "two-segments": lambda t: ".".join(_segments(t)[:2]),
    "four-segments": lambda t: ".".join((*_segments(t), "AAAA")),
    "five-segments-jwe": lambda t: ".".join(
        (b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"})), "AAAA", "AAAA", "AAAA",
         "AAAA")
    ),
    "empty-header": lambda t: "." + ".".join(_segments(t)[1:]),
    "empty-payload": lambda t: f"{_segments(t)[0]}..{_segments(t)[2]}",
    "empty-signature": lambda t: ".".join((*_segments(t)[:2], "")),
    "header-not-json": lambda t: t.raw("not json", json.dumps(t.claims())),
    "header-json-array": lambda t: t.raw('["alg", "RS256"]', json.dumps(t.claims())),
    "header-json-null": lambda t: t.raw("null", json.dumps(t.claims())),
    "duplicate-alg": lambda t: t.raw(
        '{"alg":"none","alg":"RS256","typ":"at+jwt","kid":"kid1"}', json.dumps(t.claims())
    ),
    "duplicate-same-alg": lambda t: t.raw(
        '{"alg":"RS256","alg":"RS256","typ":"at+jwt","kid":"kid1"}', json.dumps(t.claims())
    ),
    "duplicate-iss": lambda t: t.raw(
        json.dumps(t.header()),
        json.dumps(t.claims())[:-1] + ', "iss": "https://evil.example/"}',
    ),
    "bom-header": lambda t: t.raw(b"\xef\xbb\xbf" + json.dumps(t.header()).encode(),
                                  json.dumps(t.claims())),
    "bom-payload": lambda t: t.raw(json.dumps(t.header()),
                                   b"\xef\xbb\xbf" + json.dumps(t.claims()).encode()),
    "utf16-header": lambda t: t.raw(json.dumps(t.header()).encode("utf-16"),
                                    json.dumps(t.claims())),
    "utf16-payload": lambda t: t.raw(json.dumps(t.header()),
                                     json.dumps(t.claims()).encode("utf-16-le")),
    "invalid-utf8": lambda t: t.raw(json.dumps(t.header()),
                                    json.dumps(t.claims()).encode()[:-1] + b', "x": "\xff"}'),
    "payload-array": lambda t: t.raw(json.dumps(t.header()), json.dumps([t.claims()])),
    "payload-string": lambda t: t.raw(json.dumps(t.header()), '"claims"'),
    "payload-nan": lambda t: t.raw(json.dumps(t.header()),
                                   json.dumps(t.claims())[:-1] + ', "x": NaN}'),
    "payload-trailing-garbage": lambda t: t.raw(json.dumps(t.header()),
                                                json.dumps(t.claims()) + "x"),
    "plus-in-header": lambda t: t.mint().replace(".", "+.", 1),
    "slash-in-signature": lambda t: t.mint() + "/",
    "padded-header": lambda t: "==.".join(t.mint().split(".", 1)),
    "space-inside": lambda t: t.mint().replace(".", ". ", 1),
    "non-ascii": lambda t: t.mint() + "é",
    "nul": lambda t: t.mint() + "\x00",
    "impossible-length": lambda t: "A" + t.mint(),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
async def test_a26_structure_and_encoding(validator: JWTValidator, tokens: TokenFactory,
                                          network: FakeNetwork, case: str) -> None:
    token = STRUCTURE_CASES[case](tokens)
    assert await refusal(validator, token) in {MALFORMED, ALGORITHM, UNTRUSTED}
    assert network.requests == []


async def test_a26_deep_nesting_is_never_a_crash(validator: JWTValidator,
                                                  tokens: TokenFactory) -> None:
    nested = json.dumps(tokens.claims())[:-1] + ', "x": ' + "[" * 2000 + "]" * 2000 + "}"
    outcome: object
    try:
        outcome = await validator.verify(tokens.raw(json.dumps(tokens.header()), nested))
    except InvalidTokenError as refused:
        outcome = refused.description
    assert outcome == MALFORMED or isinstance(outcome, Principal)


async def test_a26_json_whitespace_is_still_json(validator: JWTValidator,
                                                 tokens: TokenFactory) -> None:
    token = tokens.raw(" " + json.dumps(tokens.header(), indent=1) + "\n",
                       json.dumps(tokens.claims(), indent=2))
    assert await validator.verify(token)


@pytest.mark.parametrize("size", [8193, 15 * 1024, 1024 * 1024])
async def test_a27_oversized_tokens_are_refused_before_decoding(
    validator: JWTValidator, tokens: TokenFactory, network: FakeNetwork, size: int
) -> None:
    token = tokens.mint()
    huge = token + "A" * (size - len(token))
    started = time.perf_counter()
    assert await refusal(validator, huge) == TOO_LARGE
    assert time.perf_counter() - started < 0.05
    assert validator.stats.decoded == 0
    assert network.requests == []


async def test_a27_the_limit_is_exact(build: Build, tokens: TokenFactory) -> None:
    token = tokens.mint()
    assert await build(validator={"max_token_bytes": len(token)}).verify(token)
    tight = build(validator={"max_token_bytes": len(token) - 1})
    assert await refusal(tight, token) == TOO_LARGE
    assert tight.stats.decoded == 0


# ------------------------------------------------------------------------------------------
# A34: the verified-token cache
# ------------------------------------------------------------------------------------------


async def test_a34_a_cached_token_is_rechecked_against_the_clock(
    validator: JWTValidator, tokens: TokenFactory, clock: FakeClock
) -> None:
    token = tokens.mint()  # exp = now + 300
    first = await validator.verify(token)
    assert await validator.verify(token) is first
    assert validator.stats.cache_hits == 1
    assert validator.stats.signatures == 1
    clock.advance(300 + LEEWAY - 1)
    assert await validator.verify(token) is first
    clock.advance(2)  # now exp + leeway + 1
    assert await refusal(validator, token) == EXPIRED
    assert await refusal(validator, token) == EXPIRED  # and it stays out of the cache
    assert validator.stats.cache_hits == 2


async def test_a34_max_token_age_holds_for_cached_tokens(build: Build, tokens: TokenFactory,
                                                         clock: FakeClock) -> None:
    validator = build(max_lifetime=None)
    now = int(clock.time())
    token = tokens.mint(claims={"iat": now - 86_400 - LEEWAY + 10, "exp": now + 3600})
    assert await validator.verify(token)
    assert await validator.verify(token)
    clock.advance(10)
    assert await refusal(validator, token) == TOO_OLD


async def test_a34_the_cache_is_bounded_and_keyed_by_the_whole_token(
    build: Build, tokens: TokenFactory
) -> None:
    validator = build(validator={"cache_size": 2})
    first, second, third = tokens.mint(), tokens.mint(), tokens.mint()
    for token in (first, second, third, third):
        await validator.verify(token)
    assert validator.stats.signatures == 3
    await validator.verify(first)  # evicted by the third: verified again
    assert validator.stats.signatures == 4
    await refusal(validator, flip_bit(first, 7))  # one bit away is another token
    assert validator.stats.signatures == 5


async def test_cache_can_be_disabled(build: Build, tokens: TokenFactory) -> None:
    validator = build(validator={"cache_size": 0})
    token = tokens.mint()
    await validator.verify(token)
    await validator.verify(token)
    assert validator.stats.cache_hits == 0
    assert validator.stats.signatures == 2


# ------------------------------------------------------------------------------------------
# A37 (claims side): scopes, tenant, client
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope_claims", "claims", "scopes"),
    [
        (("scope",), {"scope": "a b  c "}, {"a", "b", "c"}),
        (("scope",), {"scope": ""}, set()),
        (("scope",), {"scope": DROP}, set()),
        (("scope",), {"scope": "a\tb"}, {"a\tb"}),  # RFC 6749 §3.3: only spaces separate
        (("scope",), {"scp": ["x", "y"]}, {"gemini.generate", "gemini.read"}),  # scp ignored
        (("scp",), {"scp": ["x", "y"], "scope": "z"}, {"x", "y"}),
        (("scp",), {"scp": []}, set()),
        (("scope", "scp"), {"scp": ["x"], "scope": "y"}, {"x", "y"}),
        ((), {"scope": ["not", "even", "checked"]}, set()),
    ],
    ids=repr,
)
async def test_a37_scope_claims(build: Build, tokens: TokenFactory,
                                scope_claims: tuple[str, ...], claims: dict[str, Any],
                                scopes: set[str]) -> None:
    validator = build(scope_claims=scope_claims)
    assert (await validator.verify(tokens.mint(claims=claims))).scopes == scopes


@pytest.mark.parametrize(
    "claims", [{"scope": ["a"]}, {"scp": [1]}, {"scp": None}], ids=repr
)
async def test_a37_scope_claims_of_the_wrong_shape_are_invalid(
    build: Build, tokens: TokenFactory, claims: dict[str, Any]
) -> None:
    validator = build(scope_claims=("scope", "scp"))
    assert await refusal(validator, tokens.mint(claims=claims)) == BAD_CLAIM


@pytest.mark.parametrize(
    ("tenant_claim", "claims", "tenant"),
    [
        ("tenant", {"tenant": "acme"}, "acme"),
        ("tenant", {"tenant": 42}, None),
        ("tenant", {}, None),
        ("org_id", {"org_id": "o-1", "tenant": "acme"}, "o-1"),
        (None, {"tenant": "acme"}, None),
    ],
)
async def test_tenant_claim(build: Build, tokens: TokenFactory, tenant_claim: str | None,
                            claims: dict[str, Any], tenant: str | None) -> None:
    validator = build(tenant_claim=tenant_claim)
    assert (await validator.verify(tokens.mint(claims=claims))).tenant == tenant


async def test_client_id_falls_back_to_azp(build: Build, tokens: TokenFactory) -> None:
    validator = build(required_claims=("iss", "exp", "aud", "sub", "iat", "jti"))
    principal = await validator.verify(tokens.mint(claims={"client_id": DROP, "azp": "web"}))
    assert principal.client_id == "web"
    assert principal.subject == "user-1"


# ------------------------------------------------------------------------------------------
# Several issuers
# ------------------------------------------------------------------------------------------


async def test_two_issuers_each_with_its_own_audience_and_keys(clock: FakeClock) -> None:
    other_issuer = "https://login.other.example/tenant-7/v2"
    first = FakeIdP(signers=(RS,))
    second = FakeIdP(other_issuer, signers=(EC,))
    network = FakeNetwork(first, second)
    async with network.client() as client:
        validator = JWTValidator(
            [
                Issuer(issuer=ISSUER, audience=AUDIENCE, jwks_url=first.jwks_url),
                Issuer(issuer=other_issuer, audience="api://gemini"),  # by discovery
            ],
            http_client=client,
            clock=clock,
        )
        try:
            ours = TokenFactory(RS, clock=clock)
            theirs = TokenFactory(EC, issuer=other_issuer, audience="api://gemini", clock=clock)
            assert (await validator.verify(ours.mint())).issuer == ISSUER
            assert (await validator.verify(theirs.mint())).issuer == other_issuer
            assert network.urls == [
                first.jwks_url,
                "https://login.other.example/.well-known/oauth-authorization-server/tenant-7/v2",
                second.jwks_url,
            ]
            # Each issuer's audience and keys are its own.
            assert await refusal(validator, ours.mint(claims={"aud": "api://gemini"})) == (
                AUDIENCE_REFUSED
            )
            assert await refusal(validator, theirs.mint(claims={"aud": AUDIENCE})) == (
                AUDIENCE_REFUSED
            )
            crossed = TokenFactory(RS, issuer=other_issuer, audience="api://gemini", clock=clock)
            assert await refusal(validator, crossed.mint()) == NO_KEY
            crossed_kid = crossed.mint(signer=Signer(ec_signer().private, "ES256", EC.kid))
            assert await refusal(validator, crossed_kid) == SIGNATURE
        finally:
            await validator.aclose()


# ------------------------------------------------------------------------------------------
# A36 at this level: refusals say nothing about the input
# ------------------------------------------------------------------------------------------


async def test_refusal_messages_are_fixed_and_leak_nothing(build: Build, clock: FakeClock,
                                                           idp: FakeIdP) -> None:
    secret_kid = "kid-SECRET-4711"
    secret_iss = "https://issuer-SECRET.example/"
    secret_aud = "aud-SECRET-0815"
    signer = Signer(RS.private, "RS256", secret_kid)
    idp.set_signers(Signer(RS.private, "RS256", secret_kid, dict(RS.jwk, kid=secret_kid)))
    validator = build(audience=secret_aud)
    factory = TokenFactory(signer, audience=secret_aud, clock=clock)
    now = int(clock.time())
    bad = [
        factory.mint(claims={"iss": secret_iss}),
        factory.mint(claims={"aud": "x" + secret_aud}),
        factory.mint(claims={"exp": now - 1000}),
        factory.mint(header={"kid": secret_kid + "x"}),
        factory.mint(header={"typ": "JWT-" + secret_kid}),
        factory.mint(header={"alg": "HS256"}, signer=Signer(b"k", "HS256", secret_kid)),
        flip_bit(factory.mint(), 3),
        factory.mint(claims={"scope": [secret_kid]}),
        factory.mint() + "A" * 9000,
        "garbage." + secret_kid,
    ]
    for token in bad:
        with pytest.raises(InvalidTokenError) as caught:
            await validator.verify(token)
        text = " ".join(str(arg) for arg in caught.value.args) + caught.value.description
        assert caught.value.description in ALL_MESSAGES
        fragments = [part for part in token.split(".") if len(part) >= 8]
        for fragment in (secret_kid, secret_iss, secret_aud, ISSUER, *fragments):
            assert fragment not in text


async def test_a37_azure_scp_is_a_space_delimited_string(
    build: Build, tokens: TokenFactory
) -> None:
    validator = build(scope_claims=("scope", "scp"))
    principal = await validator.verify(tokens.mint(claims={"scope": DROP, "scp": "a b"}))
    assert principal.scopes == {"a", "b"}
