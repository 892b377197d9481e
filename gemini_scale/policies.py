"""Frozen policy values and the mark-only route decorators.

A decorator attaches one policy to the endpoint function and returns the *same* function:
it never wraps it, never changes its signature. Middlewares find the policies of the matched
route through :mod:`gemini_scale.routing`, which also refuses to run when a route declares a
policy that no middleware in its stack enforces.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeVar

from gemini_scale.errors import ConfigurationError

if TYPE_CHECKING:
    from limits import RateLimitItem

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute under which a decorated endpoint carries its policies.
MARK_ATTRIBUTE = "__gemini_scale_policies__"

CacheScope = Literal["principal", "tenant", "shared"]
GenerationMode = Literal["off", "deterministic", "all"]
GENERATION_MODES: tuple[GenerationMode, ...] = ("off", "deterministic", "all")
LimitKey = Literal["principal", "tenant", "api_key", "model", "route", "client_ip"]
LIMIT_KEYS: tuple[LimitKey, ...] = ("principal", "tenant", "api_key", "model", "route", "client_ip")


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Base of every policy: a frozen value saying *what* should happen on a route."""

    kind: ClassVar[str] = "policy"
    """A short name used in messages (``cache``, ``rate_limit``, ...)."""


#: The methods a :class:`CachePolicy` may cache (the safe ones, and Gemini's POST calls).
CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD", "POST", "QUERY"})


@dataclass(frozen=True, slots=True, kw_only=True)
class CachePolicy(Policy):
    """Cache the route's successful answers (enforced by ``CacheMiddleware``)."""

    kind: ClassVar[str] = "cache"
    ttl: float
    """Seconds an entry lives."""
    scope: CacheScope = "principal"
    """Whose entry it is: the caller (default), the caller's tenant, or everyone."""
    tags: tuple[str, ...] = ()
    """Extra invalidation tags; the model and the principal are always tags."""
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    """Methods that may be served from cache (``HEAD`` is served from the ``GET`` entry)."""
    vary: tuple[str, ...] = ()
    """Request headers (lower-case) whose values become part of the key."""
    generation: GenerationMode | None = None
    """Which ``generateContent`` answers may be cached: ``off``, ``deterministic``
    (temperature 0, at most one candidate) or ``all``; ``None``: the middleware's setting."""
    streams: bool | None = None
    """Whether streamed answers (``streamGenerateContent``, SSE or the JSON array) may be
    recorded and replayed; ``None``: the middleware's setting (off by default)."""
    max_bytes: int | None = None
    """Largest answer stored, in bytes; ``None``: the middleware's ``max_entry_bytes``."""

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int | float):
            raise ConfigurationError(f"cache ttl must be a number of seconds, got {self.ttl!r}")
        if not self.ttl > 0 or self.ttl == float("inf"):
            raise ConfigurationError(f"cache ttl must be positive and finite, got {self.ttl!r}")
        if self.scope not in ("principal", "tenant", "shared"):
            raise ConfigurationError(
                f"cache scope must be principal, tenant or shared: {self.scope!r}"
            )
        if not self.methods or not all(
            isinstance(m, str) and m.isalpha() and m.isupper() for m in self.methods
        ):
            raise ConfigurationError(f"cache methods must be upper-case names: {self.methods!r}")
        unsafe = sorted(set(self.methods) - CACHEABLE_METHODS)
        if unsafe:  # DELETE, PURGE...: always the app's business (C25)
            raise ConfigurationError(
                f"cache methods must be among GET, HEAD, POST and QUERY, got {unsafe!r}"
            )
        if not all(
            isinstance(h, str) and h and h == h.lower() and h != "*" and h.isprintable()
            and " " not in h
            for h in self.vary
        ):
            raise ConfigurationError(f"cache vary must be lower-case header names: {self.vary!r}")
        if not all(isinstance(t, str) and t for t in self.tags):
            raise ConfigurationError(f"cache tags must be non-empty strings: {self.tags!r}")
        if self.generation is not None and self.generation not in GENERATION_MODES:
            raise ConfigurationError(
                f"cache generation must be off, deterministic or all: {self.generation!r}"
            )
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
            or self.max_bytes < 1
        ):
            raise ConfigurationError(f"cache max_bytes must be a positive int: {self.max_bytes!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy(Policy):
    """Limit requests and Gemini tokens (enforced by ``RateLimitMiddleware``)."""

    kind: ClassVar[str] = "rate_limit"
    requests: tuple[RateLimitItem, ...] = ()
    """Request limits, parsed from the ``limits`` string syntax (``"60/minute;1000/day"``)."""
    tokens: tuple[RateLimitItem, ...] = ()
    """Gemini token limits in the same syntax."""
    key: tuple[LimitKey, ...] = ("principal",)
    """What a bucket belongs to: one dimension or a combination, e.g. ``("principal",
    "model")`` for a budget per caller and model."""

    def __post_init__(self) -> None:
        key: object = self.key
        if isinstance(key, str):  # a single dimension given as a plain string
            object.__setattr__(self, "key", (key,))
        unknown = set(self.key) - set(LIMIT_KEYS)
        if unknown or not self.key or len(set(self.key)) != len(self.key):
            raise ConfigurationError(
                f"rate limit key must be among {', '.join(LIMIT_KEYS)}: {self.key!r}"
            )
        if not self.requests and not self.tokens:
            raise ConfigurationError("a rate limit policy needs request or token limits")
        for kind, items in (("request", self.requests), ("token", self.tokens)):
            windows = [item.get_expiry() for item in items]
            if len(set(windows)) != len(windows):
                raise ConfigurationError(
                    f"two {kind} limits with the same window: keep the stricter one"
                )

    @classmethod
    def parse(
        cls,
        requests: str | None = None,
        *,
        tokens: str | None = None,
        key: LimitKey | tuple[LimitKey, ...] = "principal",
    ) -> RateLimitPolicy:
        """Build from limit strings, refusing malformed ones with :class:`ConfigurationError`."""
        keys = (key,) if isinstance(key, str) else tuple(key)
        return cls(requests=parse_limits(requests), tokens=parse_limits(tokens), key=keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionPolicy(Policy):
    """A route's lifecycle across API versions (enforced by ``VersionMiddleware``).

    Version names are those of the bundle the request is versioned by. A request of a
    version before ``added``, or of ``removed`` and later, is answered 404 naming the
    ``replacement``; answers of a deprecated route carry ``Deprecation``, ``Sunset`` and
    ``Link`` headers.
    """

    kind: ClassVar[str] = "version"
    added: str | None = None
    """First version that has the route."""
    deprecated: dt.datetime | dt.date | None = None
    """When the route was deprecated (sent as RFC 9745 ``Deprecation``)."""
    sunset: dt.datetime | dt.date | None = None
    """When it goes away (RFC 8594 ``Sunset``)."""
    removed: str | None = None
    """First version without the route."""
    replacement: str | None = None
    """What to call instead (a path or URL), named in refusals and in
    ``Link: <...>; rel="successor-version"``."""
    info: str | None = None
    """A URL about the deprecation, sent as ``Link: <...>; rel="deprecation"``."""

    def __post_init__(self) -> None:
        for name in ("deprecated", "sunset"):
            object.__setattr__(self, name, utc_datetime(getattr(self, name), name))
        for name in ("added", "removed", "replacement", "info"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, str) or not value or not value.isprintable()
                or any(c in value for c in '<>" ')
            ):
                raise ConfigurationError(f"version {name} must be a plain string: {value!r}")
        if self.added is not None and self.added == self.removed:
            raise ConfigurationError("a route cannot be added and removed in one version")


def utc_datetime(value: dt.datetime | dt.date | None, what: str) -> dt.datetime | None:
    """``value`` as an aware datetime (a date is its midnight UTC; a naive time is UTC)."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        if not isinstance(value, dt.date):
            raise ConfigurationError(f"{what} must be a date or datetime, got {value!r}")
        value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScopePolicy(Policy):
    """OAuth scopes the caller must hold (enforced by ``OAuth2Middleware``)."""

    kind: ClassVar[str] = "scopes"
    scopes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicPolicy(Policy):
    """The route needs no credential (health, metrics, docs)."""

    kind: ClassVar[str] = "public"


def parse_limits(text: str | None) -> tuple[RateLimitItem, ...]:
    """Parse ``"60/minute;1000/day"`` with ``limits``; ``None`` or ``""`` gives no limits."""
    if not text:
        return ()
    from limits import parse_many  # deferred: only services with limits pay for the import

    try:
        items = tuple(parse_many(text))
    except ValueError as exc:
        raise ConfigurationError(f"invalid rate limit {text!r}: {exc}") from exc
    if any(item.amount <= 0 for item in items):
        raise ConfigurationError(f"invalid rate limit {text!r}: amounts must be positive")
    if _ZERO_WINDOW.search(text):  # limits reads "60/0 minute" as 60 per minute
        raise ConfigurationError(f"invalid rate limit {text!r}: windows must be positive")
    return items


_ZERO_WINDOW: Final = re.compile(r"/\s*0+\s*[A-Za-z]")


def policies_of(endpoint: object) -> Mapping[type[Policy], Policy]:
    """The policies an endpoint was marked with (empty when none)."""
    marks = getattr(endpoint, MARK_ATTRIBUTE, None)
    return marks if isinstance(marks, dict) else {}


def mark(policy: Policy) -> Callable[[F], F]:
    """A decorator that attaches ``policy`` to an endpoint and returns the endpoint unchanged.

    One policy per kind and endpoint: marking twice with the same kind is a
    :class:`ConfigurationError`, not a silent override.
    """

    def decorate(endpoint: F) -> F:
        marks = dict(policies_of(endpoint))
        kind = type(policy)
        if kind in marks:
            name = getattr(endpoint, "__qualname__", repr(endpoint))
            raise ConfigurationError(f"{name} already has a {policy.kind} policy")
        marks[kind] = policy
        try:
            setattr(endpoint, MARK_ATTRIBUTE, marks)
        except AttributeError as exc:
            raise ConfigurationError(
                f"cannot mark {endpoint!r}: policies attach to plain functions"
            ) from exc
        return endpoint

    return decorate


def cache(
    ttl: float,
    *,
    scope: CacheScope = "principal",
    tags: tuple[str, ...] = (),
    methods: tuple[str, ...] = ("GET", "HEAD"),
    vary: tuple[str, ...] = (),
    generation: GenerationMode | None = None,
    streams: bool | None = None,
    max_bytes: int | None = None,
) -> Callable[[F], F]:
    """Mark a route as cacheable for ``ttl`` seconds (see :class:`CachePolicy`)."""
    return mark(
        CachePolicy(
            ttl=ttl,
            scope=scope,
            tags=tuple(tags),
            methods=frozenset(m.upper() for m in methods),
            vary=tuple(h.lower() for h in vary),
            generation=generation,
            streams=streams,
            max_bytes=max_bytes,
        )
    )


def rate_limit(
    requests: str | None = None,
    *,
    tokens: str | None = None,
    key: LimitKey | tuple[LimitKey, ...] = "principal",
) -> Callable[[F], F]:
    """Mark a route with request and token limits (see :class:`RateLimitPolicy`)."""
    return mark(RateLimitPolicy.parse(requests, tokens=tokens, key=key))


def version(
    *,
    added: str | None = None,
    deprecated: dt.datetime | dt.date | None = None,
    sunset: dt.datetime | dt.date | None = None,
    removed: str | None = None,
    replacement: str | None = None,
    info: str | None = None,
) -> Callable[[F], F]:
    """Mark a route's lifecycle across versions (see :class:`VersionPolicy`)."""
    return mark(
        VersionPolicy(
            added=added,
            deprecated=deprecated,
            sunset=sunset,
            removed=removed,
            replacement=replacement,
            info=info,
        )
    )


def requires_scopes(*scopes: str) -> Callable[[F], F]:
    """Mark a route as needing every one of ``scopes`` (see :class:`ScopePolicy`)."""
    if not scopes:
        raise ConfigurationError("requires_scopes() needs at least one scope")
    for scope in scopes:
        # RFC 6749 §3.3 scope-token: printable ASCII without space, quote or backslash.
        if not scope or any(c in ' "\\' or not 0x21 <= ord(c) <= 0x7E for c in scope):
            raise ConfigurationError(f"invalid scope name {scope!r}")
    return mark(ScopePolicy(scopes=frozenset(scopes)))


def public(endpoint: F) -> F:
    """Mark a route as needing no credential."""
    return mark(PublicPolicy())(endpoint)
