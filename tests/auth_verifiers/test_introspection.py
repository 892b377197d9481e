"""IntrospectionValidator against a fake RFC 7662 endpoint (``httpx.MockTransport``).

Every test counts the calls the endpoint received; time moves only through a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gemini_scale.auth.base import TokenVerifier
from gemini_scale.auth.errors import (
    AuthError,
    IdentityProviderUnavailableError,
    InvalidTokenError,
)
from gemini_scale.auth.introspection import IntrospectionValidator
from gemini_scale.errors import ConfigurationError
from tests.clock import FakeClock
from tests.servers import free_port, serve

ENDPOINT = "https://idp.example/oauth2/introspect"
ISSUER = "https://idp.example"
CLIENT_ID = "gemini-gateway"
CLIENT_SECRET = "client-secret-Zq8x"
TOKEN = "opaque-Tok3n.value_~+/=="
NOW = 1_700_000_000.0




Answer = Mapping[str, Any] | Callable[[httpx.Request], httpx.Response]


class FakeIntrospection:
    """The authorization server's endpoint: records requests and gives ``answer`` (a JSON
    object to send with 200, or a function of the request that builds a response or raises).
    With ``gate`` set, every request waits for it first."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.requests: list[httpx.Request] = []
        self.answer: Answer = active(clock)
        self.gate: asyncio.Event | None = None

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if callable(self.answer):
            return self.answer(request)
        return httpx.Response(200, json=dict(self.answer))

    def form(self, index: int = -1) -> dict[str, list[str]]:
        return parse_qs(self.requests[index].content.decode(), keep_blank_values=True)


def active(clock: FakeClock, **claims: Any) -> dict[str, Any]:
    """An active answer for a token that expires in an hour."""
    answer: dict[str, Any] = {
        "active": True,
        "sub": "user-42",
        "client_id": "chat-app",
        "iss": ISSUER,
        "aud": "gemini-api",
        "scope": "gemini.generate gemini.read",
        "token_type": "Bearer",
        "exp": int(clock.time()) + 3600,
        "tenant": "acme",
    }
    answer.update(claims)
    return {k: v for k, v in answer.items() if v is not None}


def status(code: int, **kwargs: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, **kwargs)


def raises(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


Factory = Callable[..., IntrospectionValidator]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def idp(clock: FakeClock) -> FakeIntrospection:
    return FakeIntrospection(clock)


@pytest.fixture
async def make(idp: FakeIntrospection, clock: FakeClock) -> AsyncIterator[Factory]:
    """Build validators wired to the fake endpoint; everything is closed afterwards."""
    opened: list[tuple[IntrospectionValidator, httpx.AsyncClient]] = []

    def build(**overrides: Any) -> IntrospectionValidator:
        client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
        options: dict[str, Any] = {
            "endpoint": ENDPOINT,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "issuer": ISSUER,
            "http_client": client,
            "clock": clock,
        }
        validator = IntrospectionValidator(**(options | overrides))
        opened.append((validator, client))
        return validator

    yield build
    for validator, client in opened:
        await validator.aclose()
        await client.aclose()


@pytest.fixture
def validator(make: Factory) -> IntrospectionValidator:
    return make(audience="gemini-api")


# --- A39 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(lambda c: {"active": False}, InvalidTokenError, id="inactive"),
        pytest.param(lambda c: active(c, exp=int(c.time()) - 1), InvalidTokenError, id="expired"),
        pytest.param(lambda c: status(500), IdentityProviderUnavailableError, id="500"),
        pytest.param(
            lambda c: raises(httpx.ReadTimeout("timed out")),
            IdentityProviderUnavailableError,
            id="timeout",
        ),
        pytest.param(lambda c: active(c, active="true"), InvalidTokenError, id="active-string"),
    ],
)
async def test_a39_introspection_answers(
    validator: IntrospectionValidator,
    idp: FakeIntrospection,
    clock: FakeClock,
    answer: Callable[[FakeClock], Answer],
    error: type[AuthError],
) -> None:
    idp.answer = answer(clock)
    with pytest.raises(error) as caught:
        await validator.verify(TOKEN)
    refusal = caught.value
    assert type(refusal) is error
    if isinstance(refusal, IdentityProviderUnavailableError):
        assert (refusal.status_code, refusal.error, refusal.retry_after) == (503, None, 5)
    else:
        assert (refusal.status_code, refusal.error) == (401, "invalid_token")
    assert idp.calls == 1


async def test_active_token_gives_its_principal(
    validator: IntrospectionValidator, idp: FakeIntrospection
) -> None:
    principal = await validator.verify(TOKEN)
    assert principal.issuer == ISSUER
    assert principal.subject == "user-42"
    assert principal.client_id == "chat-app"
    assert principal.tenant == "acme"
    assert principal.scopes == {"gemini.generate", "gemini.read"}
    assert principal.claims["aud"] == "gemini-api"
    with pytest.raises(TypeError):
        principal.claims["sub"] = "someone-else"  # type: ignore[index]
    assert isinstance(validator, TokenVerifier)


# --- the request we send -------------------------------------------------------------------


async def test_client_secret_basic(make: Factory, idp: FakeIntrospection) -> None:
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    validator = make(client_id="gate way:1", client_secret="s3cr&t:/+ é")
    await validator.verify(TOKEN)

    request = idp.requests[0]
    assert request.method == "POST"
    assert request.url == ENDPOINT
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "gate+way%3A1:s3cr%26t%3A%2F%2B+%C3%A9"
    assert idp.form() == {"token": [TOKEN], "token_type_hint": ["access_token"]}


async def test_client_secret_post(make: Factory, idp: FakeIntrospection) -> None:
    validator = make(auth_method="client_secret_post")
    await validator.verify(TOKEN)

    assert "authorization" not in idp.requests[0].headers
    assert idp.form() == {
        "token": [TOKEN],
        "token_type_hint": ["access_token"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }


@pytest.mark.parametrize(
    "token",
    ["", "two words", "tok\nen", "ümlaut", "=leading-padding", "a" * 8193],
    ids=["empty", "space", "newline", "non-ascii", "padding-first", "too-long"],
)
async def test_impossible_tokens_are_refused_without_a_call(
    validator: IntrospectionValidator, idp: FakeIntrospection, token: str
) -> None:
    with pytest.raises(InvalidTokenError):
        await validator.verify(token)
    assert idp.calls == 0


# --- what the answer must say --------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"active": None}, id="active-missing"),
        pytest.param({"active": 1}, id="active-one"),
        pytest.param({"iss": "https://evil.example"}, id="issuer-mismatch"),
        pytest.param({"iss": ["https://idp.example"]}, id="issuer-list"),
        pytest.param({"aud": "other-api"}, id="audience-mismatch"),
        pytest.param({"aud": ["other-api", "third"]}, id="audience-list-mismatch"),
        pytest.param({"aud": None}, id="audience-missing"),
        pytest.param({"aud": {"gemini-api": True}}, id="audience-object"),
        pytest.param({"token_type": "refresh_token"}, id="refresh-token"),
        pytest.param({"token_type": "Refresh_Token"}, id="refresh-token-case"),
        pytest.param({"token_type": 7}, id="token-type-number"),
        pytest.param({"sub": None}, id="subject-missing"),
        pytest.param({"sub": None, "username": "alice"}, id="no-username-fallback"),
        pytest.param({"sub": ""}, id="subject-empty"),
        pytest.param({"sub": 42}, id="subject-number"),
        pytest.param({"exp": str(int(NOW) + 60)}, id="exp-string"),
        pytest.param({"exp": True}, id="exp-bool"),
        pytest.param({"exp": int(NOW)}, id="exp-now-no-leeway"),
        pytest.param({"client_id": ["a"]}, id="client-id-list"),
        pytest.param({"tenant": 7}, id="tenant-number"),
    ],
)
async def test_answers_that_refuse_the_token(
    validator: IntrospectionValidator,
    idp: FakeIntrospection,
    clock: FakeClock,
    claims: dict[str, Any],
) -> None:
    idp.answer = active(clock, **claims)
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)


async def test_exp_overflowing_to_infinity_is_refused(
    validator: IntrospectionValidator, idp: FakeIntrospection
) -> None:
    body = b'{"active": true, "sub": "u", "aud": "gemini-api", "exp": 1e400}'
    idp.answer = status(200, content=body)
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": None}, id="issuer-absent"),
        pytest.param({"aud": ["other-api", "gemini-api"]}, id="audience-in-list"),
        pytest.param({"exp": None}, id="exp-absent"),
        pytest.param({"token_type": None}, id="token-type-absent"),
    ],
)
async def test_answers_that_accept_the_token(
    validator: IntrospectionValidator,
    idp: FakeIntrospection,
    clock: FakeClock,
    claims: dict[str, Any],
) -> None:
    idp.answer = active(clock, **claims)
    principal = await validator.verify(TOKEN)
    assert (principal.issuer, principal.subject) == (ISSUER, "user-42")


async def test_audience_is_not_required_unless_configured(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, aud=None)
    assert (await make().verify(TOKEN)).subject == "user-42"


async def test_any_configured_audience_matches(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, aud=["b"])
    assert (await make(audience=["a", "b"]).verify(TOKEN)).subject == "user-42"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("gemini.read", {"gemini.read"}),
        ("a  b c ", {"a", "b", "c"}),
        ("", set()),
        (["gemini.read"], set()),  # only the documented space-delimited string is parsed
        (None, set()),
    ],
)
async def test_scopes(
    make: Factory, idp: FakeIntrospection, clock: FakeClock, scope: object, expected: set[str]
) -> None:
    idp.answer = active(clock, scope=scope)
    assert (await make().verify(TOKEN)).scopes == expected


async def test_tenant_claim_is_configurable(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, org="globex")
    assert (await make(tenant_claim="org").verify(TOKEN)).tenant == "globex"
    assert (await make(tenant_claim=None).verify(TOKEN)).tenant is None
    idp.answer = active(clock, tenant=None, client_id=None)
    principal = await make().verify(TOKEN)
    assert (principal.tenant, principal.client_id) == (None, None)


# --- answers we cannot use: 503, never 401, never a leak -----------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(status(500), id="500"),
        pytest.param(status(502, text="Bad Gateway"), id="502"),
        pytest.param(status(401, json={"error": "invalid_client"}), id="our-credentials-refused"),
        pytest.param(status(302, headers={"location": "https://evil.example/"}), id="redirect"),
        pytest.param(status(200, content=b"<html>login</html>"), id="not-json"),
        pytest.param(status(200, content=b"\xff\xfe{}"), id="not-utf8"),
        pytest.param(status(200, json=[{"active": True}]), id="json-array"),
        pytest.param(status(200, json="active"), id="json-string"),
        pytest.param(status(200, content=b""), id="empty-body"),
        pytest.param(status(200, content=b'{"active": true, "exp": NaN}'), id="nan"),
        pytest.param(
            status(200, content=b'{"active": false, "active": true, "sub": "u"}'),
            id="duplicate-member",
        ),
        pytest.param(status(200, content=b"[" * 30_000 + b"]" * 30_000), id="deep-nesting"),
        pytest.param(raises(httpx.ConnectError("refused")), id="connect-error"),
        pytest.param(raises(httpx.ConnectTimeout("timed out")), id="connect-timeout"),
        pytest.param(raises(httpx.RemoteProtocolError("broken")), id="protocol-error"),
    ],
)
async def test_unusable_answers_mean_unavailable(
    validator: IntrospectionValidator,
    idp: FakeIntrospection,
    answer: Callable[[httpx.Request], httpx.Response],
) -> None:
    idp.answer = answer
    with pytest.raises(IdentityProviderUnavailableError) as caught:
        await validator.verify(TOKEN)
    assert caught.value.status_code == 503


async def test_oversized_answer_by_content_length(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    padding = "x" * 2000
    idp.answer = active(clock, padding=padding)
    with pytest.raises(IdentityProviderUnavailableError):
        await make(max_response_bytes=1024).verify(TOKEN)
    assert (await make(max_response_bytes=4096).verify(TOKEN)).subject == "user-42"


async def test_oversized_declared_length_is_refused_before_reading(
    validator: IntrospectionValidator, idp: FakeIntrospection
) -> None:
    body = b'{"active": true, "sub": "u", "aud": "gemini-api"}'
    idp.answer = status(200, content=body, headers={"content-length": str(1 << 30)})
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(TOKEN)


async def test_oversized_streamed_answer_is_not_read_to_the_end(
    validator: IntrospectionValidator, idp: FakeIntrospection
) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"active": true, "padding": "'
        while True:
            sent += 1
            yield b"x" * 4096

    idp.answer = lambda request: httpx.Response(200, content=endless())
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(TOKEN)
    assert sent <= 17  # 64 KiB and one chunk


async def test_whole_exchange_has_a_deadline(make: Factory, idp: FakeIntrospection) -> None:
    idp.gate = asyncio.Event()  # never set: the endpoint never answers
    validator = make(timeout=0.05)
    with pytest.raises(IdentityProviderUnavailableError):
        await asyncio.wait_for(validator.verify(TOKEN), timeout=5)
    assert idp.calls == 1


async def test_closed_injected_client_means_unavailable(idp: FakeIntrospection) -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    validator = IntrospectionValidator(
        endpoint=ENDPOINT,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        issuer=ISSUER,
        http_client=client,
    )
    await client.aclose()
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify(TOKEN)
    assert idp.calls == 0


def _secret_free(text: str) -> None:
    assert TOKEN not in text
    assert CLIENT_SECRET not in text


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda c: {"active": False}, id="inactive"),
        pytest.param(lambda c: active(c, iss="https://evil.example"), id="issuer"),
        pytest.param(lambda c: status(500), id="500"),
        pytest.param(lambda c: raises(httpx.ReadTimeout(f"timed out {TOKEN}")), id="timeout"),
        pytest.param(lambda c: status(200, content=TOKEN.encode()), id="not-json"),
        pytest.param(lambda c: status(200, content=b"x" * 70_000), id="too-large"),
        pytest.param(active, id="active"),
    ],
)
async def test_token_and_secret_never_in_errors_or_logs(
    make: Factory,
    idp: FakeIntrospection,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    answer: Callable[[FakeClock], Answer],
) -> None:
    caplog.set_level(logging.DEBUG)
    idp.answer = answer(clock)
    validator = make(audience="gemini-api")
    for _ in range(2):  # the second is answered from the cache where there is one
        try:
            await validator.verify(TOKEN)
        except (InvalidTokenError, IdentityProviderUnavailableError) as exc:
            _secret_free(str(exc))
            _secret_free(repr(exc))
            _secret_free(exc.description)
    _secret_free(caplog.text)
    _secret_free(repr(validator))
    _secret_free(" ".join(str(r.args) for r in caplog.records))


# --- caching -----------------------------------------------------------------------------


async def test_active_answer_cached_until_exp(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, exp=int(NOW) + 60)
    validator = make(positive_ttl=300)
    await validator.verify(TOKEN)
    clock.advance(59)
    await validator.verify(TOKEN)
    assert idp.calls == 1

    idp.answer = {"active": False}
    clock.advance(1)
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)
    assert idp.calls == 2


async def test_active_answer_cached_at_most_positive_ttl(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    validator = make(positive_ttl=300)  # the token lives an hour
    await validator.verify(TOKEN)
    clock.advance(299)
    await validator.verify(TOKEN)
    assert idp.calls == 1

    idp.answer = {"active": False}  # revoked meanwhile
    clock.advance(1)
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)
    assert idp.calls == 2


async def test_cache_hit_rechecks_exp_against_the_wall_clock(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, exp=int(NOW) + 60)
    validator = make()
    await validator.verify(TOKEN)
    clock.now += 120  # the wall clock jumps; monotonic time does not
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)
    assert idp.calls == 1


async def test_refusal_cached_briefly_then_asked_again(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = {"active": False}
    validator = make(negative_ttl=10)
    for _ in range(20):  # a client polling one token
        with pytest.raises(InvalidTokenError):
            await validator.verify(TOKEN)
    assert idp.calls == 1

    clock.advance(9)
    with pytest.raises(InvalidTokenError):
        await validator.verify(TOKEN)
    assert idp.calls == 1

    idp.answer = active(clock)
    clock.advance(1)
    assert (await validator.verify(TOKEN)).subject == "user-42"
    assert idp.calls == 2


async def test_claim_refusals_are_cached_too(
    validator: IntrospectionValidator, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = active(clock, aud="other-api")
    for _ in range(3):
        with pytest.raises(InvalidTokenError):
            await validator.verify(TOKEN)
    assert idp.calls == 1


async def test_unavailability_is_not_cached(
    validator: IntrospectionValidator, idp: FakeIntrospection, clock: FakeClock
) -> None:
    idp.answer = status(503)
    for _ in range(2):
        with pytest.raises(IdentityProviderUnavailableError):
            await validator.verify(TOKEN)
    idp.answer = active(clock)
    assert (await validator.verify(TOKEN)).subject == "user-42"
    assert idp.calls == 3


async def test_cache_is_keyed_per_token(
    validator: IntrospectionValidator, idp: FakeIntrospection, clock: FakeClock
) -> None:
    await validator.verify("token-a")
    idp.answer = active(clock, sub="user-b")
    assert (await validator.verify("token-b")).subject == "user-b"
    assert (await validator.verify("token-a")).subject == "user-42"
    assert idp.calls == 2


async def test_cache_is_a_bounded_lru(make: Factory, idp: FakeIntrospection) -> None:
    validator = make(cache_size=2)
    for token in ("t1", "t2", "t1", "t3"):  # t1 is used again, so t2 is the one evicted
        await validator.verify(token)
    assert idp.calls == 3
    await validator.verify("t1")
    await validator.verify("t3")
    assert idp.calls == 3
    await validator.verify("t2")
    assert idp.calls == 4


async def test_junk_tokens_do_not_evict_good_ones(
    make: Factory, idp: FakeIntrospection, clock: FakeClock
) -> None:
    validator = make(cache_size=1)
    await validator.verify(TOKEN)
    idp.answer = {"active": False}
    for n in range(5):
        with pytest.raises(InvalidTokenError):
            await validator.verify(f"guess-{n}")
    assert (await validator.verify(TOKEN)).subject == "user-42"
    assert idp.calls == 6


@pytest.mark.parametrize(
    ("option", "answer"),
    [
        ("cache_size", {"active": True, "sub": "u"}),
        ("cache_size", {"active": False}),
        ("positive_ttl", {"active": True, "sub": "u"}),
        ("negative_ttl", {"active": False}),
    ],
)
async def test_caching_can_be_disabled(
    make: Factory, idp: FakeIntrospection, option: str, answer: dict[str, Any]
) -> None:
    validator = make(**{option: 0})
    idp.answer = answer
    for _ in range(3):
        with contextlib.suppress(InvalidTokenError):
            await validator.verify(TOKEN)
    assert idp.calls == 3


# --- single flight -----------------------------------------------------------------------


async def _settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(active, None, id="active"),
        pytest.param(lambda c: {"active": False}, InvalidTokenError, id="inactive"),
        pytest.param(lambda c: status(500), IdentityProviderUnavailableError, id="500"),
        # An exp past a float's range (was a 500, and one call per waiter):
        pytest.param(
            lambda c: status(200, content=b'{"active": true, "sub": "u", "exp": 1' + b"0" * 400
                             + b"}"),
            InvalidTokenError,
            id="exp-past-a-float",
        ),
        # Anything unforeseen while asking is the endpoint's failure, shared by all:
        pytest.param(lambda c: raises(RuntimeError("transport bug")),
                     IdentityProviderUnavailableError, id="unexpected-error"),
    ],
)
async def test_single_flight(
    make: Factory,
    idp: FakeIntrospection,
    clock: FakeClock,
    answer: Callable[[FakeClock], Answer],
    error: type[Exception] | None,
) -> None:
    validator = make(cache_size=0)  # only the single flight can spare the calls
    idp.answer = answer(clock)
    idp.gate = asyncio.Event()
    tasks = [asyncio.create_task(validator.verify(TOKEN)) for _ in range(50)]
    await _settle()
    assert idp.calls == 1
    idp.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert idp.calls == 1
    if error is None:
        assert {r.subject for r in results if not isinstance(r, BaseException)} == {"user-42"}
    else:
        assert all(type(r) is error for r in results)
        assert len({id(r) for r in results}) == 50  # each waiter raises its own instance


async def test_single_flight_survives_the_asker_being_cancelled(
    make: Factory, idp: FakeIntrospection
) -> None:
    validator = make()
    idp.gate = asyncio.Event()
    asker = asyncio.create_task(validator.verify(TOKEN))
    await _settle()
    waiters = [asyncio.create_task(validator.verify(TOKEN)) for _ in range(10)]
    await _settle()
    asker.cancel()  # e.g. its client disconnected
    await _settle()
    idp.gate.set()
    principals = await asyncio.gather(*waiters)

    assert asker.cancelled()
    assert {p.subject for p in principals} == {"user-42"}
    assert idp.calls == 2  # the cancelled call, then one for all the waiters


async def test_different_tokens_fly_separately(make: Factory, idp: FakeIntrospection) -> None:
    validator = make()
    idp.gate = asyncio.Event()
    tasks = [asyncio.create_task(validator.verify(f"token-{n % 3}")) for n in range(30)]
    await _settle()
    idp.gate.set()
    await asyncio.gather(*tasks)
    assert idp.calls == 3


# --- construction and the HTTP client ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"endpoint": "http://idp.example/introspect"}, id="plain-http"),
        pytest.param({"endpoint": "/introspect"}, id="relative"),
        pytest.param({"endpoint": "ftp://idp.example/x"}, id="ftp"),
        pytest.param({"endpoint": "https://user:pw@idp.example/x"}, id="userinfo"),
        pytest.param({"client_id": ""}, id="no-client-id"),
        pytest.param({"client_secret": ""}, id="no-secret"),
        pytest.param({"issuer": ""}, id="no-issuer"),
        pytest.param({"audience": []}, id="empty-audience"),
        pytest.param({"audience": ["a", ""]}, id="blank-audience"),
        pytest.param({"auth_method": "private_key_jwt"}, id="auth-method"),
        pytest.param({"timeout": 0}, id="timeout"),
        pytest.param({"max_response_bytes": 0}, id="max-response"),
        pytest.param({"positive_ttl": -1}, id="positive-ttl"),
        pytest.param({"negative_ttl": -1}, id="negative-ttl"),
        pytest.param({"cache_size": -1}, id="cache-size"),
        pytest.param({"tenant_claim": ""}, id="tenant-claim"),
    ],
)
def test_bad_configuration(overrides: dict[str, Any]) -> None:
    options: dict[str, Any] = {
        "endpoint": ENDPOINT,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "issuer": ISSUER,
    }
    with pytest.raises(ConfigurationError) as caught:
        IntrospectionValidator(**(options | overrides))
    _secret_free(str(caught.value))


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:8080/introspect", "http://localhost/introspect", "http://[::1]/i"],
)
async def test_plain_http_allowed_to_loopback(endpoint: str) -> None:
    validator = IntrospectionValidator(
        endpoint=endpoint, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, issuer=ISSUER
    )
    await validator.aclose()


async def test_aclose_leaves_an_injected_client_open(
    validator: IntrospectionValidator, idp: FakeIntrospection
) -> None:
    await validator.verify(TOKEN)
    await validator.aclose()
    await validator.verify("another-token")
    assert idp.calls == 2


async def test_redirects_are_not_followed_even_by_a_following_client(
    idp: FakeIntrospection,
) -> None:
    idp.answer = status(307, headers={"location": "https://evil.example/introspect"})
    transport = httpx.MockTransport(idp)
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as client:
        validator = IntrospectionValidator(
            endpoint=ENDPOINT,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            issuer=ISSUER,
            http_client=client,
        )
        with pytest.raises(IdentityProviderUnavailableError):
            await validator.verify(TOKEN)
    assert [str(r.url) for r in idp.requests] == [ENDPOINT]


@pytest.fixture
def live_endpoint() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    """A real introspection endpoint on loopback, for the validator's own HTTP client."""
    seen: list[dict[str, list[str]]] = []

    async def introspect(request: Request) -> JSONResponse:
        seen.append(parse_qs((await request.body()).decode()))
        if (
            request.headers.get("authorization")
            != "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        ):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        return JSONResponse({"active": True, "sub": "live-user", "exp": 4_000_000_000})

    app = Starlette(routes=[Route("/introspect", introspect, methods=["POST"])])
    with serve(app) as server:
        yield f"{server.url}/introspect", seen


@pytest.mark.slow
async def test_own_client_against_a_live_endpoint(
    live_endpoint: tuple[str, list[dict[str, list[str]]]],
) -> None:
    url, seen = live_endpoint
    validator = IntrospectionValidator(
        endpoint=url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, issuer=ISSUER
    )
    assert seen == []  # building it opened nothing
    try:
        assert (await validator.verify(TOKEN)).subject == "live-user"
        assert seen == [{"token": [TOKEN], "token_type_hint": ["access_token"]}]
    finally:
        await validator.aclose()
    with pytest.raises(IdentityProviderUnavailableError):
        await validator.verify("another-token")  # closed: no new client is made
    assert len(seen) == 1


async def test_own_client_connection_refused_means_unavailable() -> None:
    validator = IntrospectionValidator(
        endpoint=f"http://127.0.0.1:{free_port()}/introspect",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        issuer=ISSUER,
    )
    try:
        with pytest.raises(IdentityProviderUnavailableError):
            await validator.verify(TOKEN)
    finally:
        await validator.aclose()
