"""Client addresses behind trusted proxies (uvicorn's test matrix, hardened) and the bucket
identities rate limits key on (research/security.md B08-B11, B14, B24)."""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from example_app.dev_issuer import DevIssuer
from gemini_scale import (
    APIKeyEntry,
    APIKeys,
    ConfigurationError,
    Issuer,
    OAuth2Middleware,
    Principal,
    RequestContext,
    RouteMatch,
)
from gemini_scale.keys import (
    DIMENSIONS,
    UNKNOWN_CLIENT,
    Identity,
    TrustedProxies,
    check_dimensions,
    client_address,
    identity,
)
from gemini_scale.routing import CONTEXT_KEY
from gemini_scale.types import Receive, Scope, Send

# -- TrustedProxies: which peers are proxies -----------------------------------------------

_TRUSTED_NOTHING: list[str] = []
_TRUSTED_IPv4_ADDRESSES = "127.0.0.1, 10.0.0.1"
_TRUSTED_IPv4_NETWORKS = ["127.0.0.0/8", "10.0.0.0/8"]
_TRUSTED_IPv6_ADDRESSES = [
    "2001:db8::",
    "2001:0db8:0001:0000:0000:0ab9:C0A8:0102",
    "2001:db8:3333:4444:5555:6666:1.2.3.4",  # a dual address
    "::11.22.33.44",  # a dual (IPv4-compatible, not mapped) address
]
_TRUSTED_IPv6_NETWORKS = "2001:db8:abcd:0012::0/64"
_TRUSTED_MAPPED = ["::ffff:192.168.0.0/112", "::ffff:1.1.1.1"]

_HOSTS = [
    "127.0.0.0",
    "127.0.0.1",
    "127.1.1.1",
    "10.0.0.1",
    "10.1.1.1",
    "192.168.0.1",
    "1.1.1.1",
    "2001:db8::",
    "2001:db8:abcd:0012::0",
    "2001:db8:abcd:0012::1:1",
    "::",
    "::1",
    "2001:db8:3333:4444:5555:6666:102:304",  # aka 2001:db8:3333:4444:5555:6666:1.2.3.4
    "::b16:212c",  # aka ::11.22.33.44
    "::ffff:127.0.0.1",  # IPv4-mapped: the IPv4 address
    "::ffff:192.168.0.1",
    "some-literal",
    "unix:///foo/bar",
    "*",
    "",
]

# Which of _HOSTS each configuration trusts (literals never: only addresses are proxies).
_TRUSTS = {
    "nothing": (_TRUSTED_NOTHING, set()),
    "ipv4 addresses": (_TRUSTED_IPv4_ADDRESSES, {"127.0.0.1", "10.0.0.1", "::ffff:127.0.0.1"}),
    "ipv4 networks": (
        _TRUSTED_IPv4_NETWORKS,
        {"127.0.0.0", "127.0.0.1", "127.1.1.1", "10.0.0.1", "10.1.1.1", "::ffff:127.0.0.1"},
    ),
    "ipv6 addresses": (
        _TRUSTED_IPv6_ADDRESSES,
        {"2001:db8::", "2001:db8:3333:4444:5555:6666:102:304", "::b16:212c"},
    ),
    "ipv6 networks": (
        _TRUSTED_IPv6_NETWORKS,
        {"2001:db8:abcd:0012::0", "2001:db8:abcd:0012::1:1"},
    ),
    "ipv4-mapped networks": (
        _TRUSTED_MAPPED,
        {"192.168.0.1", "::ffff:192.168.0.1", "1.1.1.1"},
    ),
}


@pytest.mark.parametrize(
    ("init", "host", "expected"),
    [
        pytest.param(init, host, host in trusted, id=f"{name}-{host or 'empty'}")
        for name, (init, trusted) in _TRUSTS.items()
        for host in _HOSTS
    ],
)
def test_trusted_proxies_contain(init: str | list[str], host: str, expected: bool) -> None:
    assert (host in TrustedProxies(init)) is expected


@pytest.mark.parametrize(
    "init",
    [
        "*",
        ["*"],
        ["10.0.0.1", " * "],
        "0.0.0.0/0",
        ["::/0"],
        ["::ffff:0:0/96"],  # every IPv4-mapped address, i.e. 0.0.0.0/0
        [ipaddress.ip_network("0.0.0.0/0")],
    ],
)
def test_trusting_everyone_is_refused(init: Any) -> None:
    """B10: uvicorn's ``"*"`` takes the leftmost entry, which the client writes."""
    with pytest.raises(ConfigurationError, match=r"every|leftmost"):
        TrustedProxies(init)


@pytest.mark.parametrize(
    "init",
    [["some-literal"], "unix:///foo/bar", ["/foo/bar"], ["10.0.0.1", "garba*gewith*"], [42]],
)
def test_literals_are_not_proxies(init: Any) -> None:
    with pytest.raises(ConfigurationError, match="not an IP address or network"):
        TrustedProxies(init)


def test_trusted_proxies_accept_what_settings_parse() -> None:
    from gemini_scale import load_settings

    settings = load_settings(
        {"GEMINI_SCALE_DEV_ISSUER": "1", "GEMINI_SCALE_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}
    )
    trusted = TrustedProxies(settings.trusted_networks)
    assert trusted == TrustedProxies("10.0.0.0/8, ::1, 10.0.0.0/8")
    assert "10.2.3.4" in trusted
    assert "::1" in trusted
    assert TrustedProxies(trusted) == trusted
    assert not TrustedProxies()
    assert "127.0.0.1" not in TrustedProxies()


# -- client_address through HTTP (uvicorn's test_proxy_headers.py shape) --------------------


async def echo_client(
    scope: Scope, receive: Receive, send: Send, *, trusted: TrustedProxies
) -> None:
    await PlainTextResponse(client_address(scope, trusted))(scope, receive, send)


def client_for(
    trusted: str | list[str], client: tuple[str, int] = ("127.0.0.1", 123)
) -> httpx.AsyncClient:
    proxies = TrustedProxies(trusted)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await echo_client(scope, receive, send, trusted=proxies)

    transport = httpx.ASGITransport(app=app, client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def address(
    trusted: str | list[str],
    headers: Sequence[tuple[str, str]] = (),
    peer: tuple[str, int] = ("127.0.0.1", 123),
) -> str:
    async with client_for(trusted, peer) as client:
        response = await client.get("/", headers=httpx.Headers(list(headers), encoding="latin-1"))
    assert response.status_code == 200
    return response.text


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        # trusted proxy
        ("127.0.0.1", "1.2.3.4"),
        (["127.0.0.1"], "1.2.3.4"),
        # trusted proxy list
        (["127.0.0.1", "10.0.0.1"], "1.2.3.4"),
        ("127.0.0.1, 10.0.0.1", "1.2.3.4"),
        # trusted proxy network (uvicorn#1068)
        ("127.0.0.0/24, 10.0.0.1", "1.2.3.4"),
        # request from an untrusted proxy: the peer
        ("192.168.0.1", "127.0.0.1"),
        ("192.168.0.0/16", "127.0.0.1"),
        ([], "127.0.0.1"),
        # a client running on the proxy host itself: every entry trusted, so the leftmost
        (["127.0.0.1", "1.2.3.4"], "1.2.3.4"),
    ],
)
async def test_trusted_hosts(trusted: str | list[str], expected: str) -> None:
    assert await address(trusted, [("X-Forwarded-For", "1.2.3.4")]) == expected


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        # uvicorn's malformed matrix
        ("", "127.0.0.1"),
        (" , ", "127.0.0.1"),
        (", , ", "127.0.0.1"),
        (" , 10.0.0.1", "127.0.0.1"),
        ("9.9.9.9 , , , 10.0.0.1", "127.0.0.1"),
        (", , 9.9.9.9", "9.9.9.9"),
        (", , 9.9.9.9, , ", "127.0.0.1"),
        # entries that are not addresses, where the walk reaches them: the peer
        ("unknown", "127.0.0.1"),
        ("9.9.9.9, unknown, 10.0.0.1", "127.0.0.1"),
        ("evil.example", "127.0.0.1"),
        ("1.2.3.4 5.6.7.8", "127.0.0.1"),
        ("01.2.3.4", "127.0.0.1"),
        ("1.2.3.4:99999", "127.0.0.1"),
        ("1.2.3.4:", "127.0.0.1"),
        ("1.2.3.4:80:80", "127.0.0.1"),
        ("[1.2.3.4]", "127.0.0.1"),
        ("[2001:db8::1", "127.0.0.1"),
        ("[2001:db8::1]x", "127.0.0.1"),
        ("2001:db8::1:80]", "127.0.0.1"),
        ("\xf0\xfd\xfd\xfd", "127.0.0.1"),
        ("unix:", "127.0.0.1"),
        ("1" * 200, "127.0.0.1"),
        # garbage left of the first untrusted entry is never read
        ("\xf0\xfd\xfd\xfd, unix:, 1.2.3.4", "1.2.3.4"),
        ("garbage, 1.2.3.4, 10.0.0.7", "1.2.3.4"),
        # ports some proxies append are dropped; IPv6 is canonical
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:DB8:0::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:0DB8::0001", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("[::ffff:1.2.3.4]:80", "1.2.3.4"),
        ("fe80::1%eth0", "fe80::1"),
        ("\t1.2.3.4 ,\t10.0.0.1 ", "1.2.3.4"),
        # a trusted entry written as IPv4-mapped is still trusted
        ("1.2.3.4, ::ffff:10.0.0.1", "1.2.3.4"),
    ],
)
async def test_malformed_lists(forwarded_for: str, expected: str) -> None:
    trusted = "127.0.0.1, 10.0.0.0/8"
    assert await address(trusted, [("X-Forwarded-For", forwarded_for)]) == expected


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [
        # all proxies are trusted
        (["127.0.0.1", "10.0.2.1", "192.168.0.2"], "1.2.3.4"),
        # order doesn't matter
        (["10.0.2.1", "192.168.0.2", "127.0.0.1"], "1.2.3.4"),
        # the first untrusted entry from the right is the client
        (["192.168.0.2", "127.0.0.1"], "10.0.2.1"),
        # mixed addresses and networks
        (["127.0.0.1", "10.0.0.0/8", "192.168.0.2"], "1.2.3.4"),
    ],
)
async def test_multiple_proxies(trusted: list[str], expected: str) -> None:
    headers = [("X-Forwarded-For", "1.2.3.4, 10.0.2.1, 192.168.0.2")]
    assert await address(trusted, headers) == expected


@pytest.mark.parametrize(
    ("peer", "trusted", "expected"),
    [
        ("::1", ["::1"], "1.2.3.4"),
        ("::1", ["127.0.0.1"], "::1"),
        ("::ffff:127.0.0.1", ["127.0.0.1"], "1.2.3.4"),  # a dual-stack socket's IPv4 peer
        ("::ffff:127.0.0.1", ["10.0.0.1"], "127.0.0.1"),
        ("2001:DB8::0:1", ["2001:db8::/32"], "1.2.3.4"),
        ("2001:DB8::0:1", [], "2001:db8::1"),
    ],
)
async def test_ipv6_peers(peer: str, trusted: list[str], expected: str) -> None:
    headers = [("X-Forwarded-For", "1.2.3.4")]
    assert await address(trusted, headers, peer=(peer, 1)) == expected


async def test_b09_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    """B09: the peer 127.0.0.2 is not a proxy; whatever it claims, it is the client."""
    seen = set()
    async with client_for("127.0.0.1", client=("127.0.0.2", 5000)) as client:
        for n in range(50):
            spoofed = {"X-Forwarded-For": f"198.51.100.{n}", "X-Real-IP": f"203.0.113.{n}"}
            seen.add((await client.get("/", headers=spoofed)).text)
    assert seen == {"127.0.0.2"}


@pytest.mark.parametrize(
    "forwarded_for",
    ["evil, 203.0.113.7, 127.0.0.1", "evil, 203.0.113.7", "1.1.1.1, 203.0.113.7, 127.0.0.1"],
)
async def test_b10_attacker_prepended_entries_are_never_the_client(forwarded_for: str) -> None:
    """B10: the rightmost untrusted entry (the one our proxy wrote), never the leftmost."""
    assert await address("127.0.0.1", [("X-Forwarded-For", forwarded_for)]) == "203.0.113.7"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # attacker's line first, the proxy's appended line second: the proxy's entry
        (["198.51.100.66", "203.0.113.7"], "203.0.113.7"),
        # the reverse order is what a proxy that prepends would send: documented, not guessed
        (["203.0.113.7", "198.51.100.66"], "198.51.100.66"),
        # a dict of headers (last line wins) would see only "10.0.0.1" and answer 10.0.0.1
        (["203.0.113.7", "10.0.0.1"], "203.0.113.7"),
        (["203.0.113.7, 10.0.0.2", "10.0.0.1"], "203.0.113.7"),
        # a line that ends in a comma joins like any other
        (["198.51.100.66,", "203.0.113.7"], "203.0.113.7"),
        # an empty last line is an empty entry where our proxies write: the peer
        (["203.0.113.7", ""], "127.0.0.1"),
    ],
)
async def test_b11_field_lines_join_in_arrival_order(lines: list[str], expected: str) -> None:
    """B11: RFC 9110 §5.3: several lines are one list, in order, walked from the right."""
    headers = [("X-Forwarded-For", line) for line in lines]
    assert await address("127.0.0.1, 10.0.0.0/8", headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("Forwarded", "for=1.2.3.4")],
        [("Forwarded", 'for="[2001:db8::1]"'), ("X-Real-IP", "1.2.3.4")],
        [("X-Forwarded-Host", "1.2.3.4"), ("True-Client-IP", "1.2.3.4")],
    ],
)
async def test_b11_forwarded_and_other_headers_are_ignored(
    headers: list[tuple[str, str]],
) -> None:
    assert await address("127.0.0.1", headers) == "127.0.0.1"


def http_scope(client: Any = ("127.0.0.1", 123), **extra: Any) -> Scope:
    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": [], **extra}
    if client is not ...:
        scope["client"] = client
    return scope


@pytest.mark.parametrize("client", [..., None, ("", 0), [None, 0]])
def test_no_peer_is_the_unknown_bucket(client: Any) -> None:
    """Only a missing peer gives the fixed bucket; forwarded headers cannot be trusted then."""
    scope = http_scope(client, headers=[(b"x-forwarded-for", b"1.2.3.4")])
    assert client_address(scope, TrustedProxies(["127.0.0.1"])) == UNKNOWN_CLIENT


def test_a_peer_that_is_not_an_address_is_the_client() -> None:
    """Starlette's TestClient reports ``testclient``; a unix socket, a path: never proxies."""
    scope = http_scope(["testclient", 50000], headers=[(b"x-forwarded-for", b"1.2.3.4")])
    assert client_address(scope, TrustedProxies(["127.0.0.1"])) == "testclient"


def test_header_names_are_matched_whatever_their_case() -> None:
    scope = http_scope(headers=[(b"X-Forwarded-For", b"1.2.3.4")])
    assert client_address(scope, TrustedProxies(["127.0.0.1"])) == "1.2.3.4"


# -- Identity ------------------------------------------------------------------------------

TRUSTED = TrustedProxies(["127.0.0.1"])
GENERATE = "/v1beta/models/{model}:generateContent"


def principal(subject: str = "alice", **fields: Any) -> Principal:
    return Principal(**{"issuer": "https://idp.example", "subject": subject, **fields})


def request_scope(
    who: Principal | None = None,
    *,
    template: str | None = GENERATE,
    params: dict[str, str] | None = None,
    client: tuple[str, int] = ("127.0.0.1", 123),
) -> Scope:
    route = None
    if template is not None:
        route = RouteMatch(
            template, {"model": "gemini-2.5-flash"} if params is None else params, {}
        )
    state = {} if who is None else {"principal": who}
    return http_scope(client, state=state, **{CONTEXT_KEY: RequestContext(route, who)})


def tag(scope: Scope, dimensions: str | Sequence[str]) -> str:
    found = identity(scope, dimensions, trusted=TRUSTED)
    assert found is not None
    return found.tag


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("principal", ("principal",)),
        (["model", "principal"], ("principal", "model")),
        (("client_ip", "route", "tenant"), ("tenant", "route", "client_ip")),
        (list(reversed(DIMENSIONS)), DIMENSIONS),
    ],
)
def test_dimensions_have_one_canonical_order(given: Any, canonical: tuple[str, ...]) -> None:
    assert check_dimensions(given) == canonical
    scope = request_scope(principal(issuer=APIKeys.ISSUER, tenant="acme"))
    found = identity(scope, given, trusted=TRUSTED)
    assert found is not None
    assert found.dimensions == canonical
    assert found == identity(scope, canonical, trusted=TRUSTED)


@pytest.mark.parametrize("bad", [[], "user", ["principal", "principal"], ["principal", "ip"]])
def test_bad_dimensions_are_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="at least one"):
        check_dimensions(bad)
    with pytest.raises(ConfigurationError):
        identity(request_scope(principal()), bad, trusted=TRUSTED)


def test_tags_are_stable_across_releases() -> None:
    """Store keys are built from tags: a change would reset every bucket on deploy."""
    who = principal(tenant="acme")
    dims = ("principal", "model", "route", "client_ip")
    found = identity(request_scope(who), dims, trusted=TRUSTED)
    assert found is not None
    assert found.parts == (
        ("principal", '["https://idp.example","acme","alice"]'),
        ("model", "gemini-2.5-flash"),
        ("route", GENERATE),
        ("client_ip", "127.0.0.1"),
    )
    assert found.tag == "8d501f47aa0d44fb0ebf63de"


B14_SUBJECTS = [
    "alice",
    "alice}{bob",
    "alice}",
    "{alice",
    "a:b:c",
    "a|b",
    "*",
    "alice\nbob",
    "alice\r\n",
    '","',
    '["x"]',
    "\\",
    "\ud800",  # a lone surrogate: JSON claims may carry one
    "é",
    "e\u0301",  # the same glyph, decomposed: a different subject
    "x" * 10_000,
    "",
]


def test_b14_no_two_principals_collide_and_tags_stay_well_formed() -> None:
    """B14: hostile subjects, issuers and tenants give distinct, bounded, hash-tag-safe tags."""
    principals = [
        principal(subject, issuer=issuer, tenant=tenant)
        for subject in B14_SUBJECTS
        for issuer in ("https://a.example", "https://b.example", "https://a.example|x")
        for tenant in (None, "t1", "t2")
    ]
    # Principal.key ("<issuer>|<subject>") collides here; the identity must not.
    principals.append(principal("x|alice", issuer="https://a.example"))
    assert principals[-1].key == principal("alice", issuer="https://a.example|x").key
    assert len(set(principals)) == len(principals)
    tags = [tag(request_scope(who), "principal") for who in principals]
    assert len(set(tags)) == len(principals)
    assert all(re.fullmatch(r"[0-9a-f]{24}", t) for t in tags)


def test_b14_the_same_subject_under_two_issuers_is_two_buckets() -> None:
    one = principal("alice", issuer="https://a.example")
    two = principal("alice", issuer="https://b.example")
    assert tag(request_scope(one), "principal") != tag(request_scope(two), "principal")


@pytest.mark.parametrize("subject", B14_SUBJECTS)
def test_describe_is_short_printable_and_holds_no_secret(subject: str) -> None:
    who = principal(subject, claims={"secret": "tok-123"})
    found = identity(request_scope(who), ["principal", "tenant"], trusted=TRUSTED)
    assert found is not None
    text = found.describe()
    assert text.isprintable()
    assert len(text) < 2 * 64 + 60
    assert "tok-123" not in text
    assert "idp.example" not in text
    if len(subject) < 64 and subject.isprintable():
        assert text == f"principal={subject}, tenant=(principal {subject})"


def test_describe_names_every_dimension() -> None:
    found = identity(
        request_scope(principal(tenant="acme"), params={"model": "Gemini-2.5-Flash"}),
        DIMENSIONS[:2] + DIMENSIONS[3:],
        trusted=TRUSTED,
    )
    assert found is not None
    assert found.describe() == (
        f"principal=alice, tenant=acme, model=gemini-2.5-flash, route={GENERATE}, "
        "client_ip=127.0.0.1"
    )


def test_identities_compare_by_parts() -> None:
    assert Identity((("route", "/x"),)) == Identity((("route", "/x"),))
    assert Identity((("route", "/x"),)).tag != Identity((("model", "/x"),)).tag
    with pytest.raises(ConfigurationError):
        Identity(())


def test_tenant_is_shared_by_its_principals_and_never_by_tenantless_ones() -> None:
    acme_alice = principal("alice", tenant="acme")
    acme_bob = principal("bob", tenant="acme")
    key_holder = principal("batch", issuer=APIKeys.ISSUER, tenant="acme")
    assert len({tag(request_scope(p), "tenant") for p in (acme_alice, acme_bob, key_holder)}) == 1

    loners = [principal("alice"), principal("bob"), principal("alice", tenant="")]
    tenant_tags = [tag(request_scope(p), "tenant") for p in loners]
    assert tenant_tags[0] != tenant_tags[1]  # no shared bucket for the tenant-less
    assert tenant_tags[0] == tenant_tags[2]  # an empty tenant claim is no tenant
    # a tenant named like a principal is still not that principal's bucket
    named = principal("x", tenant='["https://idp.example",null,"alice"]')
    assert tag(request_scope(named), "tenant") not in tenant_tags


def test_b24_the_same_subject_in_two_tenants_is_two_principals() -> None:
    """B24 (and API keys, whose operator-chosen subjects may repeat across tenants)."""
    one = principal("ci", issuer=APIKeys.ISSUER, tenant="acme")
    two = principal("ci", issuer=APIKeys.ISSUER, tenant="globex")
    for dimension in ("principal", "tenant", "api_key"):
        assert tag(request_scope(one), dimension) != tag(request_scope(two), dimension)


def test_api_key_applies_only_to_api_key_principals() -> None:
    holder = principal("batch", issuer=APIKeys.ISSUER)
    assert identity(request_scope(principal()), "api_key", trusted=TRUSTED) is None
    found = identity(request_scope(holder), "api_key", trusted=TRUSTED)
    assert found is not None
    assert found.describe() == "api_key=batch"
    assert found.tag != tag(request_scope(holder), "principal")


@pytest.mark.parametrize(
    "model", ["gemini-2.5-flash", "models/gemini-2.5-flash", "Gemini-2.5-FLASH"]
)
def test_model_is_normalised(model: str) -> None:
    scope = request_scope(params={"model": model})
    assert identity(scope, "model", trusted=TRUSTED) == Identity((("model", "gemini-2.5-flash"),))


def test_dimensions_without_a_value_make_the_limit_not_apply() -> None:
    anonymous = request_scope(None)
    for dimension in ("principal", "tenant", "api_key", ["principal", "client_ip"]):
        assert identity(anonymous, dimension, trusted=TRUSTED) is None
    assert identity(request_scope(params={}), "model", trusted=TRUSTED) is None
    assert identity(request_scope(template=None), "model", trusted=TRUSTED) is None
    assert identity(request_scope(template=None), "route", trusted=TRUSTED) is None
    # without any gemini-scale context: the client address is all there is
    bare = http_scope(("203.0.113.9", 1))
    assert identity(bare, "route", trusted=TRUSTED) is None
    assert identity(bare, "client_ip", trusted=TRUSTED) == Identity((("client_ip", "203.0.113.9"),))


def test_the_context_principal_is_preferred_to_state() -> None:
    """Our own context object first; ``state`` is writable by anything in front of us."""
    scope = request_scope(principal("alice"))
    scope["state"]["principal"] = principal("mallory")
    found = identity(scope, "principal", trusted=TRUSTED)
    assert found is not None
    assert found.describe() == "principal=alice"


# -- identities through the real OAuth2Middleware ------------------------------------------

AUDIENCE = "https://gemini-scale.test"
API_KEY = "svc-0123456789abcdef0123456789abcdef"
FIRST = DevIssuer(audience=AUDIENCE, issuer="https://first.example")
SECOND = DevIssuer(audience=AUDIENCE, issuer="https://second.example")


def keyed_app(trusted: TrustedProxies = TRUSTED) -> Starlette:
    """Answers, for the dimensions in ``?d=a,b``, the request's identity tag and description."""

    async def endpoint(request: Request) -> JSONResponse:
        dims = request.query_params["d"].split(",")
        found = identity(request.scope, dims, trusted=trusted)
        return JSONResponse(None if found is None else [found.tag, found.describe()])

    routes = [
        Route("/v1beta/models/{model}:generateContent", endpoint, methods=["POST"]),
        Route("/v1/models/{model}:generateContent", endpoint, methods=["POST"]),
        Route("/healthz", endpoint),
    ]
    api_keys = APIKeys({APIKeys.hash_key(API_KEY): APIKeyEntry(subject="batch", tenant="acme")})
    issuers = [Issuer(issuer=i.issuer, audience=AUDIENCE, jwks=i.jwks()) for i in (FIRST, SECOND)]
    auth = Middleware(OAuth2Middleware, issuers=issuers, api_keys=api_keys)
    return Starlette(routes=routes, middleware=[auth])


@pytest.fixture
async def keyed() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=keyed_app(), client=("127.0.0.1", 123))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def bearer(issuer: DevIssuer = FIRST, subject: str = "alice", **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {issuer.mint(subject=subject, **claims)}"}


async def keyed_as(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    dims: str,
    path: str = "/v1beta/models/gemini-2.5-flash:generateContent",
) -> Any:
    response = await client.post(path, params={"d": dims}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def test_b08_the_principal_bucket_ignores_spoofable_headers(
    keyed: httpx.AsyncClient,
) -> None:
    """B08: one valid token, rotating X-Forwarded-For and X-Real-IP: one bucket."""
    token = bearer()
    seen = set()
    for n in range(20):
        headers = {**token, "x-forwarded-for": f"198.51.100.{n}", "x-real-ip": f"192.0.2.{n}"}
        seen.add(tuple(await keyed_as(keyed, headers, "principal")))
    assert len(seen) == 1
    assert seen.pop()[1] == "principal=alice"


async def test_b14_issuers_through_http(keyed: httpx.AsyncClient) -> None:
    first = await keyed_as(keyed, bearer(FIRST), "principal")
    second = await keyed_as(keyed, bearer(SECOND), "principal")
    hostile = await keyed_as(keyed, bearer(FIRST, "alice}{bob"), "principal")
    assert len({first[0], second[0], hostile[0]}) == 3
    assert hostile[1] == "principal=alice}{bob"


async def test_b24_tenants_and_versions_through_http(keyed: httpx.AsyncClient) -> None:
    """B24: tenants separate buckets; versions share one unless the key names the route."""
    v1 = "/v1/models/gemini-2.5-flash:generateContent"
    acme = bearer(tenant="acme")
    globex = bearer(tenant="globex")
    assert (await keyed_as(keyed, acme, "principal"))[0] != (
        await keyed_as(keyed, globex, "principal")
    )[0]
    assert await keyed_as(keyed, acme, "principal") == await keyed_as(keyed, acme, "principal", v1)
    assert await keyed_as(keyed, acme, "principal,route") != await keyed_as(
        keyed, acme, "principal,route", v1
    )
    # the API key's tenant is the token's tenant: one tenant bucket
    assert await keyed_as(keyed, {"x-goog-api-key": API_KEY}, "tenant") == await keyed_as(
        keyed, acme, "tenant"
    )


async def test_api_keys_through_http(keyed: httpx.AsyncClient) -> None:
    as_key = await keyed_as(keyed, {"x-goog-api-key": API_KEY}, "api_key,model")
    assert as_key[1] == "api_key=batch, model=gemini-2.5-flash"
    assert API_KEY not in as_key[1]
    assert await keyed_as(keyed, bearer(), "api_key,model") is None


async def test_public_routes_have_no_principal(keyed: httpx.AsyncClient) -> None:
    response = await keyed.get("/healthz", params={"d": "principal"})
    assert response.status_code == 200
    assert response.json() is None
    ip = await keyed.get(
        "/healthz", params={"d": "client_ip"}, headers={"x-forwarded-for": "1.2.3.4"}
    )
    assert ip.json()[1] == "client_ip=1.2.3.4"


async def test_every_dimension_through_http(keyed: httpx.AsyncClient) -> None:
    dims = ",".join(d for d in DIMENSIONS if d != "api_key")
    tags = set()
    for subject, model, forwarded in itertools.product(
        ("alice", "bob"), ("gemini-2.5-flash", "gemini-2.5-pro"), ("1.2.3.4", "5.6.7.8")
    ):
        headers = {**bearer(subject=subject), "x-forwarded-for": forwarded}
        path = f"/v1beta/models/{model}:generateContent"
        tags.add((await keyed_as(keyed, headers, dims, path))[0])
    assert len(tags) == 8


@pytest.mark.parametrize("value", ["alice", "[1]", "{}", "[]", '["a",null,"bob"]'])
def test_describe_copes_with_identities_built_by_hand(value: str) -> None:
    text = Identity((("principal", value),)).describe()
    assert text == ("principal=bob" if value.startswith('["a"') else f"principal={value}")
