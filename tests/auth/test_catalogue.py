"""security.md §4A, cases A01-A41, through the HTTP stack: ``OAuth2Middleware`` in front of
an app that counts its calls, with keys from a fake identity provider that counts fetches.

Every refusal is checked the same way (``assert_refused``): the status, the RFC 6750
challenge, Google's envelope, ``Cache-Control: no-store``, no call reached the app, and the
presented credential appears in no header, body or captured log line. Validator-level
details of each case (every bit flip, every encoding) live in ``test_jwt.py``/``test_jwks.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gemini_scale import (
    APIKeyEntry,
    APIKeys,
    IntrospectionValidator,
    Issuer,
    JWTValidator,
    OAuth2Middleware,
    public,
    requires_scopes,
)
from tests.auth.fake_idp import FakeIdP, FakeNetwork
from tests.auth.tokens import (
    AUDIENCE,
    DROP,
    ISSUER,
    FakeClock,
    TokenFactory,
    b64url,
    ec_signer,
    flip_bit,
    pad_signature,
    rsa_signer,
    truncate_signature,
)

RS = rsa_signer("kid1")
ATTACKER = rsa_signer("kid1", slot=1)
EC = ec_signer("ec1")
KID2 = rsa_signer("kid2", slot=2)
GENERATE = "/v1beta/models/gemini-x:generateContent"
CHALLENGE = 'Bearer realm="gemini-scale"'
SERVICE_KEY = "svc-key-0123456789abcdef0123456789abcdef"


@dataclass
class Stack:
    """The app under test and the counters the assertions read."""

    client: httpx.AsyncClient
    idp: FakeIdP
    network: FakeNetwork
    clock: FakeClock
    tokens: TokenFactory
    calls: list[str] = field(default_factory=list)


def build_app(calls: list[str], **options: Any) -> Starlette:
    async def generate(request: Request) -> Response:
        calls.append("generate")
        return JSONResponse({"ok": True, "sub": request.user.display_name})

    async def listing(request: Request) -> Response:
        calls.append("listing")
        return JSONResponse({"models": []})

    async def health(request: Request) -> Response:
        calls.append("health")
        return PlainTextResponse("ok")

    async def preflight(request: Request) -> Response:
        calls.append("preflight")
        return PlainTextResponse("cors", headers={"access-control-allow-origin": "*"})

    routes = [
        Route(GENERATE, requires_scopes("gemini.generate")(generate), methods=["POST", "OPTIONS"]),
        Route("/v1beta/models", requires_scopes("gemini.read")(listing)),
        Route("/healthz", public(health)),
        Route("/preflight", preflight, methods=["OPTIONS"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(OAuth2Middleware, **options)])


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with make_stack() as made:
        yield made


class make_stack:  # noqa: N801 (used like a function)
    """``async with make_stack(**middleware_options) as stack``."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    async def __aenter__(self) -> Stack:
        clock = FakeClock()
        idp = FakeIdP(signers=(RS, EC))
        network = FakeNetwork(idp)
        self._http = network.client()
        calls: list[str] = []
        self._validator = JWTValidator(
            [Issuer(issuer=ISSUER, audience=AUDIENCE, jwks_url=idp.jwks_url)],
            http_client=self._http,
            clock=clock,
        )
        options = {"jwt": self._validator, **self.options}
        app = build_app(calls, **options)
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw"
        )
        return Stack(self._client, idp, network, clock, TokenFactory(RS, clock=clock), calls)

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
        await self._validator.aclose()
        await self._http.aclose()


def assert_refused(
    response: httpx.Response,
    stack: Stack,
    caplog: pytest.LogCaptureFixture,
    *,
    status: int,
    error: str | None,
    secret: str | None,
) -> None:
    """The universal assertions of security.md §3 for a refused request."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status
    assert (
        body["status"]
        == {
            400: "INVALID_ARGUMENT",
            401: "UNAUTHENTICATED",
            403: "PERMISSION_DENIED",
            503: "UNAVAILABLE",
        }[status]
    )
    assert body["message"]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/json")
    assert "set-cookie" not in response.headers
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    else:
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith(CHALLENGE)
        if error is None:
            assert challenge == CHALLENGE
        else:
            assert f'error="{error}"' in challenge
    assert stack.calls == []
    if secret:
        assert secret not in response.text
        for value in response.headers.values():
            assert secret not in value
        assert secret not in caplog.text
        for fragment in secret.split("."):
            if len(fragment) > 16:
                assert fragment not in response.text
                assert fragment not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def call(
    stack: Stack,
    token: str | None = None,
    *,
    headers: list[tuple[str, str | bytes]] | None = None,
    path: str = GENERATE,
    method: str = "POST",
    query: str = "",
    content: bytes = b"{}",
    content_type: str = "application/json",
) -> httpx.Response:
    raw: list[tuple[str, str | bytes]] = [("content-type", content_type)]
    if token is not None:
        raw.append(("authorization", f"Bearer {token}"))
    raw.extend(headers or [])
    url = path + (f"?{query}" if query else "")
    return await stack.client.request(method, url, headers=raw, content=content)


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


# --- Table-driven cases: (id, how to make the request, expected status, RFC 6750 error) ---

Make = Callable[[Stack], tuple[dict[str, Any], str | None]]


def bearer(make_token: Callable[[TokenFactory], str]) -> Make:
    def make(stack: Stack) -> tuple[dict[str, Any], str | None]:
        token = make_token(stack.tokens)
        return {"token": token}, token

    return make


def raw_header(value: str, secret: str | None = None) -> Make:
    def make(stack: Stack) -> tuple[dict[str, Any], str | None]:
        return {"headers": [("authorization", value.encode("latin-1"))]}, secret

    return make


def valid_plus(**extra: Any) -> Make:
    def make(stack: Stack) -> tuple[dict[str, Any], str | None]:
        token = stack.tokens.mint()
        return {"token": token, **extra}, token

    return make


def duplicate_header(first_valid: bool) -> Make:
    def make(stack: Stack) -> tuple[dict[str, Any], str | None]:
        token = stack.tokens.mint()
        pair = [("authorization", f"Bearer {token}"), ("authorization", "Bearer junk")]
        return {"headers": pair if first_valid else pair[::-1]}, token

    return make


def hs256_with_public_key(stack: Stack) -> tuple[dict[str, Any], str | None]:
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = RS.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64json({"alg": "HS256", "typ": "at+jwt", "kid": "kid1"})
    payload = b64json(stack.tokens.claims())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(signature)}"
    return {"token": token}, token


def random_kid(stack: Stack) -> tuple[dict[str, Any], str | None]:
    token = stack.tokens.mint(header={"kid": uuid.uuid4().hex}, signer=ATTACKER)
    return {"token": token}, token


CASES: list[tuple[str, Make, int, str | None]] = [
    ("A01 no credentials", lambda s: ({}, None), 401, None),
    ("A02 basic scheme", raw_header("Basic dXNlcjpwYXNz"), 401, None),
    ("A02 token scheme", raw_header("Token abc"), 401, None),
    ("A04 empty bearer", raw_header("Bearer"), 400, "invalid_request"),
    ("A04 bearer and a space", raw_header("Bearer "), 400, "invalid_request"),
    ("A04 Bearer-invalid", raw_header("Bearer-invalid"), 401, None),
    ("A05 quote in token", raw_header('Bearer ab"c', 'ab"c'), 401, "invalid_token"),
    ("A05 comma in token", raw_header("Bearer ab,cd", "ab,cd"), 401, "invalid_token"),
    ("A05 non-ascii", raw_header("Bearer ab\u00e9cd", None), 401, "invalid_token"),
    ("A06 header and query", valid_plus(query="access_token=other"), 400, "invalid_request"),
    (
        "A06 header and form body",
        valid_plus(
            content=b"access_token=other&x=1",
            content_type="application/x-www-form-urlencoded",
        ),
        400,
        "invalid_request",
    ),
    ("A07 duplicate header, valid first", duplicate_header(True), 400, "invalid_request"),
    ("A07 duplicate header, junk first", duplicate_header(False), 400, "invalid_request"),
    (
        "A08 token only in the query",
        lambda s: ({"query": f"access_token={s.tokens.mint()}"}, None),
        401,
        None,
    ),
    ("A08 jwt query parameter", lambda s: ({"query": f"jwt={s.tokens.mint()}"}, None), 401, None),
    (
        "A09 alg none",
        bearer(
            lambda t: t.raw(
                json.dumps({"alg": "none", "typ": "at+jwt"}),
                json.dumps(t.claims()),
                signature=b"",
            )
        ),
        401,
        "invalid_token",
    ),
    (
        "A09 alg nOnE",
        bearer(
            lambda t: t.raw(
                json.dumps({"alg": "nOnE", "typ": "at+jwt"}),
                json.dumps(t.claims()),
                signature=b"x",
            )
        ),
        401,
        "invalid_token",
    ),
    ("A10 HS256 with the RSA public key", hs256_with_public_key, 401, "invalid_token"),
    (
        "A11 RS512 with an RS256 key",
        bearer(lambda t: t.mint(header={"alg": "RS512"})),
        401,
        "invalid_token",
    ),
    (
        "A11 PS256 with an RS256 key",
        bearer(lambda t: t.mint(header={"alg": "PS256"})),
        401,
        "invalid_token",
    ),
    (
        "A12 kid path traversal",
        bearer(lambda t: t.mint(header={"kid": "../../../../dev/null"}, signer=ATTACKER)),
        401,
        "invalid_token",
    ),
    (
        "A12 kid SQL",
        bearer(lambda t: t.mint(header={"kid": "' OR '1'='1"}, signer=ATTACKER)),
        401,
        "invalid_token",
    ),
    (
        "A12 kid integer",
        bearer(lambda t: t.mint(header={"kid": 123}, signer=ATTACKER)),
        401,
        "invalid_token",
    ),
    (
        "A13 embedded jwk",
        bearer(lambda t: t.mint(header={"jwk": ATTACKER.jwk}, signer=ATTACKER)),
        401,
        "invalid_token",
    ),
    (
        "A14 jku",
        bearer(
            lambda t: t.mint(
                header={"jku": "http://169.254.169.254/evil.json", "kid": "evil"}, signer=ATTACKER
            )
        ),
        401,
        "invalid_token",
    ),
    (
        "A14 x5u",
        bearer(
            lambda t: t.mint(header={"x5u": "file:///etc/passwd", "kid": "evil"}, signer=ATTACKER)
        ),
        401,
        "invalid_token",
    ),
    (
        "A15 x5c",
        bearer(lambda t: t.mint(header={"x5c": ["MIIB"]}, signer=ATTACKER)),
        401,
        "invalid_token",
    ),
    ("A16 crit exp", bearer(lambda t: t.mint(header={"crit": ["exp"]})), 401, "invalid_token"),
    ("A16 crit empty", bearer(lambda t: t.mint(header={"crit": []})), 401, "invalid_token"),
    ("A17 typ absent", bearer(lambda t: t.mint(header={"typ": DROP})), 401, "invalid_token"),
    ("A17 typ JWT", bearer(lambda t: t.mint(header={"typ": "JWT"})), 401, "invalid_token"),
    (
        "A17 typ trailing space",
        bearer(lambda t: t.mint(header={"typ": "at+jwt "})),
        401,
        "invalid_token",
    ),
    ("A18 no jti", bearer(lambda t: t.mint(claims={"jti": DROP})), 401, "invalid_token"),
    (
        "A18 no client_id",
        bearer(lambda t: t.mint(claims={"client_id": DROP})),
        401,
        "invalid_token",
    ),
    ("A18 no exp", bearer(lambda t: t.mint(claims={"exp": DROP})), 401, "invalid_token"),
    ("A19 exp string", bearer(lambda t: t.mint(claims={"exp": "123"})), 401, "invalid_token"),
    ("A19 aud integer", bearer(lambda t: t.mint(claims={"aud": 123})), 401, "invalid_token"),
    (
        "A19 scope list",
        bearer(lambda t: t.mint(claims={"scope": ["gemini.generate"]})),
        401,
        "invalid_token",
    ),
    (
        "A20 expired beyond leeway",
        bearer(
            lambda t: t.mint(
                claims={"exp": int(t.clock.time()) - 61, "iat": int(t.clock.time()) - 300}
            )
        ),
        401,
        "invalid_token",
    ),
    (
        "A20 nbf beyond leeway",
        bearer(lambda t: t.mint(claims={"nbf": int(t.clock.time()) + 61})),
        401,
        "invalid_token",
    ),
    (
        "A21 iat in the future",
        bearer(lambda t: t.mint(claims={"iat": int(t.clock.time()) + 120})),
        401,
        "invalid_token",
    ),
    (
        "A21 ten-year lifetime",
        bearer(lambda t: t.mint(claims={"exp": int(t.clock.time()) + 10 * 365 * 86400})),
        401,
        "invalid_token",
    ),
    (
        "A22 issuer without slash",
        bearer(lambda t: t.mint(claims={"iss": ISSUER.rstrip("/")})),
        401,
        "invalid_token",
    ),
    (
        "A22 issuer upper case",
        bearer(lambda t: t.mint(claims={"iss": ISSUER.upper()})),
        401,
        "invalid_token",
    ),
    (
        "A23 other audience",
        bearer(lambda t: t.mint(claims={"aud": ["other"]})),
        401,
        "invalid_token",
    ),
    ("A23 empty audience", bearer(lambda t: t.mint(claims={"aud": ""})), 401, "invalid_token"),
    (
        "A24 ID token",
        bearer(lambda t: t.mint(header={"typ": "JWT"}, claims={"nonce": "n", "aud": "client-1"})),
        401,
        "invalid_token",
    ),
    (
        "A24 DPoP proof as bearer",
        bearer(lambda t: t.mint(header={"typ": "dpop+jwt"})),
        401,
        "invalid_token",
    ),
    ("A25 flipped bit", bearer(lambda t: flip_bit(t.mint(), 7)), 401, "invalid_token"),
    (
        "A25 truncated signature",
        bearer(lambda t: truncate_signature(t.mint())),
        401,
        "invalid_token",
    ),
    ("A25 padded signature", bearer(lambda t: pad_signature(t.mint())), 401, "invalid_token"),
    ("A26 two segments", bearer(lambda t: ".".join(t.mint().split(".")[:2])), 401, "invalid_token"),
    ("A26 five segments", bearer(lambda t: t.mint() + ".a.b"), 401, "invalid_token"),
    (
        "A26 duplicate alg",
        bearer(
            lambda t: t.raw(
                '{"alg":"none","alg":"RS256","typ":"at+jwt","kid":"kid1"}', json.dumps(t.claims())
            )
        ),
        401,
        "invalid_token",
    ),
    (
        "A26 payload array",
        bearer(lambda t: t.raw(json.dumps(t.header()), json.dumps([t.claims()]))),
        401,
        "invalid_token",
    ),
    (
        "A27 oversized token",
        bearer(lambda t: t.mint(claims={"pad": "x" * 9000})),
        401,
        "invalid_token",
    ),
    (
        "A37 scope missing",
        bearer(lambda t: t.mint(claims={"scope": "gemini.read"})),
        403,
        "insufficient_scope",
    ),
    (
        "A37 scopes in scp only",
        bearer(lambda t: t.mint(claims={"scope": DROP, "scp": ["gemini.generate"]})),
        403,
        "insufficient_scope",
    ),
    (
        "A38 preflight without bypass",
        lambda s: (
            {
                "method": "OPTIONS",
                "headers": [
                    ("origin", "https://app.example"),
                    ("access-control-request-method", "POST"),
                ],
            },
            None,
        ),
        401,
        None,
    ),
    ("A40 DPoP scheme", raw_header("DPoP abc.def.ghi"), 401, None),
    (
        "A40 DPoP-bound token as bearer",
        bearer(
            lambda t: t.mint(claims={"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}})
        ),
        401,
        "invalid_token",
    ),
]


@pytest.mark.parametrize(("case", "make", "status", "error"), CASES, ids=[c[0] for c in CASES])
async def test_refusals(
    stack: Stack,
    caplog: pytest.LogCaptureFixture,
    case: str,
    make: Make,
    status: int,
    error: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    request, secret = make(stack)
    response = await call(stack, **request)
    assert_refused(response, stack, caplog, status=status, error=error, secret=secret)
    if case.startswith(("A01", "A02", "A04", "A05", "A07", "A08", "A09", "A22", "A27")):
        assert stack.idp.jwks_hits == 0, "no key fetch for a refusal decided before keys"
    if case.startswith(("A12", "A13", "A14", "A15")):
        assert all(u.startswith(stack.idp.origin) for u in stack.network.urls)
        assert stack.idp.jwks_hits <= 1


@pytest.mark.parametrize(
    "authorization", ["bearer {t}", "BEARER {t}", "Bearer   {t}", "Bearer {t}"]
)
async def test_a03_scheme_case_and_spacing_are_accepted(stack: Stack, authorization: str) -> None:
    token = stack.tokens.mint()
    response = await call(stack, headers=[("authorization", authorization.format(t=token))])
    assert response.status_code == 200
    assert stack.calls == ["generate"]


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "application/AT+JWT"])
async def test_a17_valid_types(stack: Stack, typ: str) -> None:
    assert (await call(stack, stack.tokens.mint(header={"typ": typ}))).status_code == 200


@pytest.mark.parametrize("leeway_edge", [-59, 59])
async def test_a20_inside_the_leeway_is_accepted(stack: Stack, leeway_edge: int) -> None:
    now = int(stack.clock.time())
    claims = {"exp": now + 1 - 60, "iat": now - 120} if leeway_edge < 0 else {"nbf": now + 59}
    assert (await call(stack, stack.tokens.mint(claims=claims))).status_code == 200


@pytest.mark.parametrize("aud", [AUDIENCE, ["other", AUDIENCE]])
async def test_a23_audiences_that_contain_ours(stack: Stack, aud: Any) -> None:
    assert (await call(stack, stack.tokens.mint(claims={"aud": aud}))).status_code == 200


async def test_a25_every_bit_of_one_signature(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    token = stack.tokens.mint()
    bits = len(token.split(".")[2]) * 6 - 6  # the last char's spare bits are A25's other case
    for bit in range(0, bits, 1):
        response = await call(stack, flip_bit(token, bit))
        assert response.status_code == 401, bit
    assert stack.calls == []


async def test_a27_oversized_headers_are_refused_quickly(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    for size in (8 * 1024 + 1, 15 * 1024, 1024 * 1024):
        token = "a" * size
        started = loop.time()
        response = await call(stack, token)
        assert loop.time() - started < 0.05
        assert_refused(response, stack, caplog, status=401, error="invalid_token", secret=token)
    assert stack.idp.jwks_hits == 0


async def test_a28_hostile_jwks_keeps_the_good_keys(stack: Stack) -> None:
    assert (await call(stack, stack.tokens.mint())).status_code == 200  # warm
    stack.idp.script("/jwks", body={"keys": [{"kty": "oct", "k": "c2VjcmV0"}] * 10_000})
    stack.clock.advance(3600)  # stale: the next request refreshes in the background
    for _ in range(3):
        assert (await call(stack, stack.tokens.mint())).status_code == 200


async def test_a29_rotation_single_flight(stack: Stack) -> None:
    assert (await call(stack, stack.tokens.mint())).status_code == 200
    stack.idp.set_signers(RS, KID2)
    stack.clock.advance(31)  # past the refetch cool-down
    before = stack.idp.jwks_hits
    rotated = TokenFactory(KID2, clock=stack.clock)
    responses = await asyncio.gather(*(call(stack, rotated.mint()) for _ in range(100)))
    assert [r.status_code for r in responses] == [200] * 100
    assert stack.idp.jwks_hits - before == 1


async def test_a30_random_kids_cannot_force_refetches(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    good = stack.tokens.mint()
    assert (await call(stack, good)).status_code == 200
    for index in range(1000):
        request, _ = random_kid(stack)
        response = await call(stack, **request)
        assert response.status_code == 401
        if index % 100 == 0:
            assert (await call(stack, good)).status_code == 200
    assert stack.idp.jwks_hits <= 2  # the warm-up, and at most one refetch per cool-down


async def test_a31_cold_cache_idp_down_is_503_then_recovers(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    stack.idp.script("/jwks", status=500, body={"error": "down"})
    token = stack.tokens.mint()
    response = await call(stack, token)
    assert_refused(response, stack, caplog, status=503, error=None, secret=token)
    stack.idp.reset("/jwks")
    stack.clock.advance(2)  # past the one-second retry pause
    assert (await call(stack, token)).status_code == 200


async def test_a32_warm_cache_idp_hanging(stack: Stack) -> None:
    assert (await call(stack, stack.tokens.mint())).status_code == 200
    stack.idp.script("/jwks", hang=True)
    stack.clock.advance(3600)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        assert (await call(stack, stack.tokens.mint())).status_code == 200
    assert loop.time() - started < 1.0  # known keys never wait for the hanging refresh


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("<html>hi</html>", "text/html"),
        ({"keys": {}}, "application/json"),
        ({"nokeys": []}, "application/json"),
        ("{not json", "application/json"),
    ],
)
async def test_a33_bad_jwks_answers_never_poison(
    stack: Stack, body: Any, content_type: str
) -> None:
    assert (await call(stack, stack.tokens.mint())).status_code == 200
    payload = body.encode() if isinstance(body, str) else body
    stack.idp.script("/jwks", body=payload, content_type=content_type)
    stack.clock.advance(3600)
    for _ in range(3):
        assert (await call(stack, stack.tokens.mint())).status_code == 200


async def test_a34_a_cached_token_expires_with_time(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    token = stack.tokens.mint()
    assert (await call(stack, token)).status_code == 200
    stack.calls.clear()
    stack.clock.advance(300 + 60 + 1)
    response = await call(stack, token)
    assert_refused(response, stack, caplog, status=401, error="invalid_token", secret=token)


async def test_a35_no_credential_or_identity_reaches_the_app_unverified() -> None:
    seen: dict[str, Any] = {}

    async def echo(request: Request) -> Response:
        seen["user"] = request.user.display_name
        seen["principal"] = request.state.principal.subject
        return PlainTextResponse("ok")

    clock = FakeClock()
    tokens = TokenFactory(RS, clock=clock)
    validator = JWTValidator(
        [Issuer(issuer=ISSUER, audience=AUDIENCE, jwks={"keys": [RS.jwk]})], clock=clock
    )
    app = Starlette(
        routes=[Route("/x", echo)], middleware=[Middleware(OAuth2Middleware, jwt=validator)]
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get(
            "/x",
            headers={
                "authorization": f"Bearer {tokens.mint()}",
                "x-user-id": "admin",
                "x-principal": "admin",
            },
        )
    assert response.status_code == 200
    assert seen == {"user": "user-1", "principal": "user-1"}  # from the token, not headers


async def test_a36_refusals_reveal_nothing(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    for token in (
        stack.tokens.mint(claims={"aud": "other"}),
        stack.tokens.mint(claims={"iss": "https://evil.example/"}),
        stack.tokens.mint(header={"kid": "secret-kid-name"}, signer=ATTACKER),
    ):
        response = await call(stack, token)
        text = response.text + json.dumps(dict(response.headers))
        for leak in (AUDIENCE, ISSUER, "evil.example", "secret-kid-name", "Traceback"):
            assert leak not in text
        assert response.headers["www-authenticate"].startswith(CHALLENGE)


async def test_a37_scope_granted(stack: Stack) -> None:
    token = stack.tokens.mint(claims={"scope": "gemini.read"})
    assert (await call(stack, token, path="/v1beta/models", method="GET")).status_code == 200
    response = await call(stack, token)
    assert response.status_code == 403
    assert 'scope="gemini.generate"' in response.headers["www-authenticate"]


async def test_a38_preflight_bypass_when_configured() -> None:
    async with make_stack(cors_preflight=True) as stack:
        preflight = await stack.client.options(
            "/preflight",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 200
        assert stack.calls == ["preflight"]
        stack.calls.clear()
        bare_options = await stack.client.options("/preflight")  # not a preflight
        assert bare_options.status_code == 401
        assert stack.calls == []


@pytest.mark.parametrize(
    ("answer", "status"),
    [({"active": False}, 401), ({"active": "true", "sub": "u"}, 401), (None, 503)],
)
async def test_a39_introspection(
    caplog: pytest.LogCaptureFixture, answer: dict[str, Any] | None, status: int
) -> None:
    async def endpoint(request: httpx.Request) -> httpx.Response:
        if answer is None:
            return httpx.Response(500, json={"error": "down"})
        return httpx.Response(200, json=answer)

    http = httpx.AsyncClient(transport=httpx.MockTransport(endpoint))
    introspection = IntrospectionValidator(
        endpoint="https://as.example/introspect",
        client_id="rs",
        client_secret="s3cr3t",
        issuer=ISSUER,
        http_client=http,
    )
    calls: list[str] = []
    app = build_app(calls, introspection=introspection)
    opaque = "opaque-token-0123456789abcdef"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(GENERATE, headers={"authorization": f"Bearer {opaque}"})
    await http.aclose()
    stack = Stack(c, FakeIdP(), FakeNetwork(), FakeClock(), TokenFactory(RS), calls)
    assert_refused(
        response,
        stack,
        caplog,
        status=status,
        error="invalid_token" if status == 401 else None,
        secret=opaque,
    )
    assert "s3cr3t" not in caplog.text


async def test_api_keys_as_x_goog_api_key(caplog: pytest.LogCaptureFixture) -> None:
    keys = APIKeys(
        {
            APIKeys.hash_key(SERVICE_KEY): APIKeyEntry(
                subject="svc", scopes=frozenset({"gemini.generate"})
            )
        }
    )
    async with make_stack(api_keys=keys) as stack:
        good = await call(stack, headers=[("x-goog-api-key", SERVICE_KEY)])
        assert good.status_code == 200
        assert good.json()["sub"] == "svc"
        stack.calls.clear()
        bad = await call(stack, headers=[("x-goog-api-key", "wrong-key-value-123")])
        assert_refused(
            bad, stack, caplog, status=401, error="invalid_token", secret="wrong-key-value-123"
        )
        twice = await call(
            stack, headers=[("x-goog-api-key", SERVICE_KEY), ("x-goog-api-key", SERVICE_KEY)]
        )
        assert_refused(
            twice, stack, caplog, status=400, error="invalid_request", secret=SERVICE_KEY
        )


async def test_public_routes_need_nothing(stack: Stack) -> None:
    assert (await stack.client.get("/healthz")).status_code == 200
    assert stack.calls == ["health"]


def test_the_catalogue_is_covered() -> None:
    """Every case id of §4A appears in this module (A41 belongs to the per-IP limiter)."""
    import pathlib

    text = pathlib.Path(__file__).read_text().upper()
    for number in range(1, 41):
        assert f"A{number:02d}" in text, number
