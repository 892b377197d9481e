"""Who a request's quota belongs to: the client address behind trusted proxies, and the
bucket identities rate limits are keyed on.

Trust is explicit (STYLE habit 7). The client address comes from ``X-Forwarded-For`` only
when the connecting peer is a proxy the operator named (an IPv6 client's bucket is its /64,
not one of the many addresses it can send from); a bucket that needs a verified
principal is never replaced by a shared fallback bucket; and a bucket's store key is a
digest of a canonical encoding, so no subject, model or header value can collide with
another or break a Redis Cluster hash tag.

The same identities are offered as slowapi ``key_func``\\ s (:func:`principal_key`,
:func:`tenant_key`, :func:`client_ip_key`, :func:`model_key`, :func:`route_key`) for
services that already limit with slowapi.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeAlias

from gemini_scale.auth.api_keys import APIKeys
from gemini_scale.auth.middleware import principal_of
from gemini_scale.errors import ConfigurationError
from gemini_scale.memo import remember
from gemini_scale.policies import LIMIT_KEYS, LimitKey
from gemini_scale.principal import Principal
from gemini_scale.routing import CONTEXT_KEY, RequestContext
from gemini_scale.types import Scope

if TYPE_CHECKING:
    from starlette.requests import Request

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The client address when the server reports no peer at all (``scope["client"]`` absent or
#: ``None``: uvicorn on a unix socket, some test clients). Every such request shares it.
UNKNOWN_CLIENT: Final = "unknown"
_PEERS_MEMO: Final = 1024

#: Every bucket dimension, in the canonical order of :attr:`Identity.parts`.
DIMENSIONS: Final[tuple[LimitKey, ...]] = LIMIT_KEYS

_XFF: Final = b"x-forwarded-for"
_OWS: Final = " \t"  # RFC 9110 §5.6.3 optional whitespace around list members
_MAX_ENTRY: Final = 100  # longer than any address with brackets, zone and port
_TAG_HEX: Final = 24  # 96 bits: collisions are out of reach at any realistic cardinality
_TAG_DOMAIN: Final = b"gemini-scale:identity:v1\x00"
_SHOWN: Final = 64  # characters of a value describe() shows
#: The IPv6 prefix one client address bucket covers by default: a /64 is one IPv6 subnet
#: (RFC 7421), the least a subscriber or host is given; it may send from any address in it
#: (privacy addresses rotate on their own), so a bucket per address would not limit it.
DEFAULT_IPV6_PREFIX: Final = 64


# -- client address ----------------------------------------------------------------------


def _canonical(ip: IPAddress) -> IPAddress:
    """One spelling per address: IPv4-mapped IPv6 becomes IPv4, IPv6 zones are dropped."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def _ip(text: str, version: int | None = None) -> IPAddress | None:
    """``text`` as a canonical address (of IP ``version`` as written, when given)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _canonical(ip) if version in (None, ip.version) else None


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 65535


def _forwarded_ip(entry: str) -> IPAddress | None:
    """One ``X-Forwarded-For`` member as an address, or ``None`` when it is not one.

    Accepted: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443`` (some proxies append the port; it is dropped).
    """
    entry = entry.strip(_OWS)
    if not entry or len(entry) > _MAX_ENTRY:
        return None
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _valid_port(port[1:]))):
            return None
        return _ip(host, 6)
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return _ip(host, 4) if _valid_port(port) else None
    return _ip(entry)


def _network(value: object, position: int) -> IPNetwork:
    if isinstance(value, str) and value.strip() == "*":
        raise ConfigurationError(
            f"trusted proxy #{position} is '*': trusting every peer would take the leftmost "
            "X-Forwarded-For entry, which the client writes. Name your proxies' networks."
        )
    try:
        if isinstance(value, str):
            network = ipaddress.ip_network(value.strip(), strict=False)
        elif isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            network = value
        elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            network = ipaddress.ip_network(value)
        else:
            raise TypeError
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"trusted proxy #{position} ({value!r}) is not an IP address or network (CIDR)"
        ) from exc
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    if network.prefixlen == 0:
        raise ConfigurationError(
            f"trusted proxy #{position} covers every address, which is the same as "
            "'*': the client would choose its own address. Name your proxies' networks."
        )
    return network


@dataclass(frozen=True, slots=True, init=False)
class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` is believed.

    ``TrustedProxies(["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"])``; a plain string is read
    as a comma-separated list (``GEMINI_SCALE_TRUSTED_PROXIES``), and
    ``TrustedProxies(settings.trusted_networks)`` takes parsed settings. Empty: trust no one.

    It also says how wide a client address bucket is: ``ipv6_prefix`` (default 64) groups
    an IPv6 client's addresses by that prefix (:func:`client_bucket`). A copy
    (``TrustedProxies(other)``) keeps ``other``'s prefix unless one is given.

    Raises:
        ConfigurationError: an entry is not an address or network, or it covers every
            address (``"*"``, ``0.0.0.0/0``, ``::/0``): uvicorn's ``"*"`` takes the leftmost
            ``X-Forwarded-For`` entry, which the client writes (research/security.md B10);
            or ``ipv6_prefix`` is not a prefix length from 1 to 128.
    """

    networks: tuple[IPNetwork, ...]
    """The trusted networks; IPv4-mapped IPv6 networks are stored as IPv4."""
    ipv6_prefix: int
    """The prefix length of an IPv6 client's bucket (:func:`client_bucket`); 128 keys on
    the full address. IPv4 clients are always one address."""
    _peers: dict[object, bool] = field(repr=False, compare=False, hash=False)

    def __init__(
        self,
        networks: Iterable[str | IPNetwork | IPAddress] = (),
        *,
        ipv6_prefix: object = None,  # an int or None; anything else is refused below
    ) -> None:
        if ipv6_prefix is None:  # a copy keeps the original's grouping
            ipv6_prefix = (
                networks.ipv6_prefix if isinstance(networks, TrustedProxies)
                else DEFAULT_IPV6_PREFIX
            )
        if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int) or not (
            1 <= ipv6_prefix <= 128
        ):
            raise ConfigurationError(
                f"ipv6_prefix must be a prefix length from 1 to 128 (64: one subscriber's "
                f"network, 128: one address), got {ipv6_prefix!r}"
            )
        if isinstance(networks, str):
            networks = [part for part in networks.split(",") if part.strip()]
        parsed = tuple(_network(value, n) for n, value in enumerate(networks, start=1))
        object.__setattr__(self, "networks", tuple(dict.fromkeys(parsed)))
        object.__setattr__(self, "ipv6_prefix", ipv6_prefix)
        object.__setattr__(self, "_peers", {})

    def trusts_peer(self, peer: object) -> bool:
        """Whether the TCP peer (``scope["client"][0]``, a string or ``None``) is a trusted
        proxy; remembered per peer (bounded), since the same few peers ask on every request."""
        found = self._peers.get(peer)
        if found is None:
            found = isinstance(peer, str) and peer in self
            remember(self._peers, peer, found, _PEERS_MEMO)
        return found

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` (an IP string or address object) is a trusted proxy."""
        if isinstance(address, str):
            ip = _ip(address)
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            ip = _canonical(address)
        else:
            return False
        return ip is not None and any(ip in network for network in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        """The networks, so ``TrustedProxies(other)`` copies ``other``."""
        return iter(self.networks)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host = client[0]
    return host if isinstance(host, str) and host else None


def client_address(scope: Scope, trusted: TrustedProxies) -> str:
    """The client's address, believing ``X-Forwarded-For`` only from ``trusted`` proxies.

    uvicorn's ``ProxyHeadersMiddleware`` semantics, hardened:

    - The peer (``scope["client"][0]``) is not trusted: the peer is the client and
      ``X-Forwarded-For`` is ignored. A peer that is not an IP (a unix socket path,
      ``"testclient"``) is never trusted and is returned as the server reported it.
    - The peer is trusted: every ``x-forwarded-for`` field line is joined with ``,`` in
      arrival order (RFC 9110 §5.3; never a dict's last line), and the list is walked from
      the right, skipping trusted entries. The first untrusted entry is the client. If that
      entry is empty or not an address (``unknown``, garbage, a host name), the list is
      malformed where our own proxies wrote it, and the **peer** is the client (uvicorn's
      ``", , 9.9.9.9, , "`` case). Entries left of it are never read, so a client cannot
      choose its address by prepending (``evil, 203.0.113.7, <proxy>`` gives
      ``203.0.113.7``). If every entry is trusted, the leftmost is the client (a client on a
      proxy host). No ``X-Forwarded-For`` at all: the peer.
    - RFC 7239 ``Forwarded`` and ``X-Real-IP`` are ignored.
    - No peer at all (``scope["client"]`` absent or ``None``): :data:`UNKNOWN_CLIENT`, one
      shared bucket; this is the only case that yields it.

    Addresses are canonical: IPv4-mapped IPv6 (``::ffff:1.2.3.4``) is the IPv4 address,
    IPv6 is compressed lower case without a zone, and a port in an entry is dropped.
    """
    return str(_client(scope, trusted))


def client_bucket(scope: Scope, trusted: TrustedProxies) -> str:
    """What the ``client_ip`` dimension keys on: :func:`client_address`, with an IPv6
    client widened to its ``trusted.ipv6_prefix`` network (``2001:db8:0:1::/64``).

    One subscriber or host holds a whole IPv6 /64 and may send from any address in it, so
    a bucket per IPv6 address would never fill (research/security.md A41). IPv4 (and
    IPv4-mapped IPv6, which is IPv4) stays one address, as do :data:`UNKNOWN_CLIENT` and a
    peer that is not an IP; ``ipv6_prefix=128`` keys on the full IPv6 address.
    """
    client = _client(scope, trusted)
    prefix = trusted.ipv6_prefix
    if isinstance(client, ipaddress.IPv6Address) and prefix < 128:
        if client in _NAT64:  # an IPv4 client through a NAT64 gateway: that address
            return str(ipaddress.IPv4Address(int(client) & 0xFFFF_FFFF))
        if client in _TEREDO:  # the low bits name the client (behind its NAT)
            return str(client)
        host_bits = 128 - prefix
        network = ipaddress.IPv6Address(int(client) >> host_bits << host_bits)
        return f"{network}/{prefix}"
    return str(client)


#: IPv6 ranges whose low 64 bits, not their /64, tell clients apart: NAT64 (RFC 6052's
#: well-known prefix) embeds an IPv4 client, Teredo (RFC 4380) a client behind its NAT.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_TEREDO: Final = ipaddress.IPv6Network("2001::/32")


def _client(scope: Scope, trusted: TrustedProxies) -> IPAddress | str:
    """:func:`client_address` before it is written out: an address, or the peer as the
    server reported it when that is not an IP, or :data:`UNKNOWN_CLIENT`."""
    peer = _peer(scope)
    if peer is None:
        return UNKNOWN_CLIENT
    peer_ip = _ip(peer)
    if peer_ip is None:
        return peer
    if peer_ip not in trusted:
        return peer_ip
    return _forwarded_client(scope, peer_ip, trusted)


def _forwarded_client(scope: Scope, peer: IPAddress, trusted: TrustedProxies) -> IPAddress:
    """The client named by ``X-Forwarded-For`` behind the trusted ``peer`` (see above)."""
    lines = [value for name, value in scope.get("headers") or () if name.lower() == _XFF]
    if not lines:
        return peer
    client = peer
    for entry in reversed(b",".join(lines).decode("latin-1").split(",")):
        ip = _forwarded_ip(entry)
        if ip is None:
            return peer
        client = ip
        if ip not in trusted:
            break
    return client


# -- bucket identities -------------------------------------------------------------------


def _encode(*values: str | None) -> str:
    return json.dumps(values, separators=(",", ":"))


def _shown(text: str) -> str:
    """``text`` safe for one log line: truncated, control characters escaped."""
    clipped = text[:_SHOWN] + ("…" if len(text) > _SHOWN else "")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)


@dataclass(frozen=True, slots=True)
class Identity:
    """What one bucket belongs to: ``(dimension, canonical value)`` pairs.

    ``principal``, ``tenant`` and ``api_key`` values are JSON arrays (issuer, tenant and
    subject; or the tenant alone); the others are plain strings. :attr:`tag` names the
    bucket in store keys; add the limit's own name to it, since two limits on the same
    dimensions share a tag.
    """

    parts: tuple[tuple[str, str], ...]
    """Dimension and value pairs, in :data:`DIMENSIONS` order."""
    tag: str = field(init=False, repr=False, compare=False)
    """A stable hex digest of :attr:`parts`: safe inside a Redis hash tag ``{...}``."""

    def __post_init__(self) -> None:
        if not self.parts or not all(
            isinstance(name, str) and isinstance(value, str) for name, value in self.parts
        ):
            raise ConfigurationError("Identity needs one or more (dimension, value) string pairs")
        # JSON of strings is unambiguous (every quote, comma, bracket and control character
        # is escaped) and ASCII-only, so lone surrogates from a JSON claim still hash.
        encoded = json.dumps(self.parts, separators=(",", ":")).encode("ascii")
        digest = hashlib.sha256(_TAG_DOMAIN + encoded).hexdigest()[:_TAG_HEX]
        object.__setattr__(self, "tag", digest)

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The dimension names, in order."""
        return tuple(name for name, _ in self.parts)

    def describe(self) -> str:
        """A short, log-safe description (``principal=alice, model=gemini-2.5-flash``).

        Principals show only their subject (truncated); nothing here is ever a credential.
        """
        return ", ".join(f"{name}={_describe_value(name, value)}" for name, value in self.parts)


def _describe_value(name: str, value: str) -> str:
    decoded = _json_strings(value) if name in ("principal", "tenant", "api_key") else None
    if not decoded:
        return _shown(value)
    if len(decoded) == 1:  # a tenant
        return _shown(decoded[0])
    subject = _shown(decoded[-1])
    return f"(principal {subject})" if name == "tenant" else subject


def _json_strings(value: str) -> list[str] | None:
    """The ``[issuer, tenant, subject]`` or ``[tenant]`` array of a value (else ``None``)."""
    try:
        decoded = json.loads(value)
    except ValueError:  # an Identity built by hand
        return None
    if isinstance(decoded, list) and all(isinstance(v, str | None) for v in decoded):
        return [v or "" for v in decoded]
    return None


def _principal(scope: Scope, context: RequestContext | None) -> Principal | None:
    if context is not None and isinstance(context.principal, Principal):
        return context.principal
    return principal_of(scope)


def _who(principal: Principal) -> str:
    # RFC 8725 §3.8: a subject means something only under its issuer. The tenant is part of
    # it too: API-key subjects are operator-chosen names that may repeat across tenants.
    return _encode(principal.issuer, principal.tenant or None, principal.subject)


def _model(context: RequestContext | None) -> str | None:
    if context is None or context.route is None:
        return None
    model = context.route.params.get("model")
    if model is None:
        return None
    return model.removeprefix("models/").lower()


def _value(
    dimension: str, scope: Scope, context: RequestContext | None, trusted: TrustedProxies
) -> str | None:
    if dimension == "client_ip":
        return client_bucket(scope, trusted)
    if dimension == "model":
        return _model(context)
    if dimension == "route":
        return context.route.template if context is not None and context.route else None
    principal = _principal(scope, context)
    return None if principal is None else _principal_value(dimension, principal)


def _principal_value(dimension: str, principal: Principal) -> str | None:
    if dimension == "tenant":
        return _encode(principal.tenant) if principal.tenant else _who(principal)
    if dimension == "api_key" and principal.issuer != APIKeys.ISSUER:
        return None
    return _who(principal)


def check_dimensions(dimensions: str | Sequence[str]) -> tuple[str, ...]:
    """``dimensions`` validated and in canonical order (a string is one dimension).

    Policies call this at construction so a typo fails start-up, not a request.

    Raises:
        ConfigurationError: none given, an unknown name, or a name given twice.
    """
    names = (dimensions,) if isinstance(dimensions, str) else tuple(dimensions)
    unknown = [name for name in names if name not in DIMENSIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigurationError(
            f"rate-limit key {list(names)!r}: name each of {', '.join(DIMENSIONS)} "
            "at most once, and at least one"
        )
    return tuple(name for name in DIMENSIONS if name in names)


def identity(
    scope: Scope, dimensions: str | Sequence[str], *, trusted: TrustedProxies
) -> Identity | None:
    """The bucket a request falls in for a limit keyed on ``dimensions``.

    - ``principal``: the verified principal (issuer, tenant and subject together: the same
      ``sub`` under two issuers or two tenants is two buckets).
    - ``tenant``: the principal's tenant; a principal without one is its own tenant (never
      one bucket shared by all tenant-less callers). Tenant names are one namespace across
      issuers, so API keys and tokens naming the same tenant share its bucket.
    - ``api_key``: the principal when it came from an API key (``APIKeys.ISSUER``).
    - ``model``: the route's ``model`` path parameter without a ``models/`` prefix, lower
      case.
    - ``route``: the template of the route the request resolved to (``/v1/...`` and
      ``/v1beta/...`` are two routes unless a version layer resolves both to one).
    - ``client_ip``: :func:`client_bucket` behind ``trusted``: the client address, an IPv6
      client's widened to its ``trusted.ipv6_prefix`` network (a /64 by default).

    Returns ``None`` when a dimension has no value for this request: no verified principal
    (authentication did not run, or the route is public), a principal that is not an API
    key for ``api_key``, no ``model`` parameter, or no matched route. The limit then does
    not apply to the request; the caller decides whether that is acceptable.

    Raises:
        ConfigurationError: ``dimensions`` is invalid (see :func:`check_dimensions`).
    """
    context = scope.get(CONTEXT_KEY)
    if not isinstance(context, RequestContext):
        context = None
    parts: list[tuple[str, str]] = []
    for dimension in check_dimensions(dimensions):
        value = _value(dimension, scope, context, trusted)
        if value is None:
            return None
        parts.append((dimension, value))
    return Identity(tuple(parts))


# -- slowapi key functions ---------------------------------------------------------------

_NO_TRUST: Final = TrustedProxies()
_NEEDS: Final = {
    "principal": "a verified principal (OAuth2Middleware in front, a route that is not public)",
    "model": "a route with a {model} path parameter, resolved by a gemini-scale middleware",
    "route": "a route resolved by a gemini-scale middleware in front of the app",
}


def _slowapi_key(request: Request, dimension: str, trusted: TrustedProxies = _NO_TRUST) -> str:
    found = identity(request.scope, dimension, trusted=trusted)
    if found is None:
        needs = _NEEDS.get(dimension, _NEEDS["principal"])
        raise ConfigurationError(
            f"the slowapi key function {dimension}_key needs {needs}; "
            f"{request.method} {request.url.path} has none"
        )
    return f"{dimension}:{found.tag}"


def principal_key(request: Request) -> str:
    """slowapi ``key_func``: one bucket per verified principal (``principal:<tag>``).

    Raises:
        ConfigurationError: the request has no verified principal (no ``OAuth2Middleware``
            in front, or a public route): a shared bucket would be wrong.
    """
    return _slowapi_key(request, "principal")


def tenant_key(request: Request) -> str:
    """slowapi ``key_func``: one bucket per tenant, or per principal without a tenant.

    Raises:
        ConfigurationError: the request has no verified principal.
    """
    return _slowapi_key(request, "tenant")


def model_key(request: Request) -> str:
    """slowapi ``key_func``: one bucket per Gemini model (all callers together).

    Raises:
        ConfigurationError: no gemini-scale middleware resolved a route with ``{model}``.
    """
    return _slowapi_key(request, "model")


def route_key(request: Request) -> str:
    """slowapi ``key_func``: one bucket per route template (all callers together).

    Raises:
        ConfigurationError: no gemini-scale middleware resolved the request's route.
    """
    return _slowapi_key(request, "route")


def client_ip_key(*, trusted: object) -> Callable[[Request], str]:
    """A slowapi ``key_func`` keyed on :func:`client_bucket` behind ``trusted``.

    ``Limiter(key_func=client_ip_key(trusted=TrustedProxies(["10.0.0.0/8"])))``; unlike
    slowapi's ``get_ipaddr`` it believes ``X-Forwarded-For`` only from those proxies, and
    an IPv6 client is one bucket per ``trusted.ipv6_prefix`` network (a /64 by default).
    """
    if not isinstance(trusted, TrustedProxies):
        raise ConfigurationError("client_ip_key(trusted=...) takes a TrustedProxies")
    # slowapi passes the request only to a parameter named ``request``, found by
    # inspect.signature: a partial of a module-level function keeps one when compiled with
    # mypyc (a compiled closure has none, nor has a function with a default of an object).
    return functools.partial(_client_ip_key, trusted=trusted)


def _client_ip_key(request: Request, *, trusted: TrustedProxies) -> str:
    """slowapi ``key_func``: one bucket per client address (``client_ip:<tag>``)."""
    return _slowapi_key(request, "client_ip", trusted)


__all__ = [
    "DEFAULT_IPV6_PREFIX",
    "DIMENSIONS",
    "UNKNOWN_CLIENT",
    "Identity",
    "TrustedProxies",
    "check_dimensions",
    "client_address",
    "client_bucket",
    "client_ip_key",
    "identity",
    "model_key",
    "principal_key",
    "route_key",
    "tenant_key",
]
