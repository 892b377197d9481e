"""``RateLimitMiddleware``: requests and Gemini tokens, reserved before and settled after."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Collection, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import anyio
from mypy_extensions import mypyc_attr

from gemini_scale.body import JSON_KEY, BodyRefusedError, load_json_body
from gemini_scale.errors import ConfigurationError, send_error
from gemini_scale.keys import Identity, TrustedProxies, identity
from gemini_scale.memo import remember
from gemini_scale.policies import LimitKey, Policy, RateLimitPolicy
from gemini_scale.principal import Principal
from gemini_scale.ratelimit.answers import quota_details, rate_limit_headers
from gemini_scale.ratelimit.engine import (
    Decision,
    Limit,
    RateLimiter,
    Reservation,
    StoreErrorMode,
    StoreFailureError,
    same_length,
)
from gemini_scale.ratelimit.usage import COUNTS, AnswerUsage, Count, estimate_request_tokens
from gemini_scale.routing import (
    CACHE_HIT_KEY,
    DECISIONS_KEY,
    USAGE_KEY,
    GeminiMiddleware,
    PathSet,
    RequestContext,
    Rules,
    message_dict,
    policy_for,
    route_path,
    scope_get,
)
from gemini_scale.stores.base import Store
from gemini_scale.types import SYSTEM_CLOCK, ASGIApp, Clock, Message, Receive, Scope, Send

logger = logging.getLogger("gemini_scale.ratelimit")

#: Gemini methods whose answers cost tokens (``countTokens`` is free).
TOKEN_METHODS = (
    ":generateContent",
    ":streamGenerateContent",
    ":embedContent",
    ":batchEmbedContents",
)
_IDENTITY_CACHE_SIZE = 10_000
_CLIENT_IP: tuple[LimitKey, ...] = ("client_ip",)
#: Longest ``X-Forwarded-For`` (all lines) whose bucket is memoised; longer ones are parsed.
_FORWARDED_MEMO_MAX = 256


class _Plan(NamedTuple):
    """A policy's constants, worked out once."""

    limits: tuple[Limit, ...]
    has_tokens: bool
    unestimated_costs: tuple[int, ...]
    """Costs of a token-charging request whose estimate is 0 (one request, no tokens)."""
    request_limits: tuple[Limit, ...]
    """The limits a request that charges no tokens meets: its token budgets are not its
    business (listing models or counting tokens is not refused for spent tokens)."""
    request_costs: tuple[int, ...]
    dimensions: tuple[LimitKey, ...]
    """The policy's key: what its buckets are keyed on."""
    by_address: bool
    """The policy keys on the client address alone (the per-address limiter)."""
    by_route: bool
    """The policy's buckets depend on the route (``model`` or ``route`` among its keys)."""
    buckets: dict[Any, tuple[Principal, Identity | None]]
    """Memoised buckets of verified principals: by the principal's id, with the route's
    template and model when ``by_route`` (see :meth:`RateLimitMiddleware._identity`); bounded
    with the other plans' memos, together."""


@mypyc_attr(allow_interpreted_subclasses=True)
class RateLimitMiddleware(GeminiMiddleware):
    """Limit requests and Gemini tokens per principal (or tenant, API key, model, route,
    client address), exactly across replicas sharing a store.

    Every limit that applies to a request is checked and charged in one store round trip,
    all or nothing (a refused request is charged nothing). Token limits reserve an estimate
    before the app runs (prompt text plus ``maxOutputTokens``, see
    :func:`~gemini_scale.ratelimit.usage.estimate_request_tokens`) and settle to the real
    ``usageMetadata`` read from the answer as it streams past (JSON or SSE, never buffered):
    refunded on an error answer or a cache hit, kept for a complete answer without usage,
    and the prompt's estimate for one cut short before it reported any.

    Options:
        store: where the counters live (``MemoryStore`` or ``RedisStore``); or ``limiter``.
        default: the policy for routes without a ``@rate_limit`` mark or rule.
        rules: central rules, path template -> :class:`RateLimitPolicy`.
        trusted_proxies: CIDRs whose ``X-Forwarded-For`` is believed (client address keys),
            or a :class:`~gemini_scale.keys.TrustedProxies` (its ``ipv6_prefix``, 64 by
            default, sets how wide an IPv6 client's bucket is).
        on_store_error: ``"local"`` (per-replica limits in memory), ``"open"`` or ``"closed"``.
        count: which usage settles token limits: ``"total"``, ``"input"`` or ``"output"``.
        default_output_tokens: reserved output when a request sets no ``maxOutputTokens``.
        max_body_bytes: largest body read for the estimate (when no outer layer read it).
        token_methods: path suffixes whose answers cost tokens.
        headers: add ``RateLimit-Policy`` / ``RateLimit`` to limited responses.
        refund_delay: seconds a refund to a shared store may wait for its bucket's next
            acquire, which carries it in the same script (``0``: a round trip at once).
        exempt: request paths this limiter neither limits nor counts (probes, metrics
            scrapes); an entry ending in ``/`` exempts everything under it.
    """

    span_name = "gemini_scale.rate_limit"

    enforces = frozenset({RateLimitPolicy})
    #: Whether route marks and rules apply (the per-address limiter uses only its default).
    route_policies: ClassVar[bool] = True
    #: Prefix of this limiter's names in the RateLimit headers.
    name_prefix: ClassVar[str] = ""
    #: Store namespace of this limiter's counters: limiters never share a counter.
    #: (These three are ClassVars so that mypyc keeps a subclass's values.)
    namespace: ClassVar[str] = "rl"

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        limiter: RateLimiter | None = None,
        default: RateLimitPolicy | None = None,
        rules: Mapping[str, Policy | Sequence[Policy]] | None = None,
        trusted_proxies: TrustedProxies | Collection[str] = (),
        on_store_error: StoreErrorMode = "local",
        count: Count = "total",
        default_output_tokens: int = 1024,
        max_body_bytes: int = 20 * 1024 * 1024,
        token_methods: Sequence[str] = TOKEN_METHODS,
        headers: bool = True,
        refund_delay: float = 1.0,
        exempt: Collection[str] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(app)
        if count not in COUNTS:
            raise ConfigurationError(f"count must be total, input or output: {count!r}")
        if limiter is None:
            if store is None:
                from gemini_scale.stores.memory import MemoryStore

                store = MemoryStore(clock=clock)
            limiter = RateLimiter(
                store,
                on_store_error=on_store_error,
                clock=clock,
                namespace=self.namespace,
                refund_delay=refund_delay,
            )
        self.limiter = limiter
        self.default = default
        self._rules = Rules(rules)
        self.trusted = TrustedProxies(trusted_proxies)
        self.count = count
        self.default_output_tokens = default_output_tokens
        self.max_body_bytes = max_body_bytes
        self.token_methods = tuple(token_methods)
        self._token_suffixes = _token_suffixes(self.token_methods)
        self._suffixes_of = self.token_methods
        self.headers = headers
        # The class's settings, read per request: compiled, an instance's attribute is read
        # directly, a ClassVar through the type.
        self._route_policies = self.route_policies
        self._name_prefix = self.name_prefix
        self.exempt = PathSet(exempt) if exempt else None
        self._limits: dict[RateLimitPolicy, tuple[Limit, ...]] = {}
        self._plans: dict[int, tuple[RateLimitPolicy, _Plan]] = {}
        self._memoised = 0  # buckets memoised across the plans (bounded together)
        self._budgets: dict[tuple[int, str], tuple[RateLimitPolicy, str]] = {}
        self._addresses: dict[tuple[Any, tuple[bytes, ...]], Identity | None] = {}

    async def before_shutdown(self) -> None:
        """Send the refunds the limiter still owes its store, while the store is open."""
        await self.limiter.aclose()

    def limits_of(self, policy: RateLimitPolicy) -> tuple[Limit, ...]:
        """The engine's limits for a policy (computed once per policy)."""
        found = self._limits.get(policy)
        if found is None:
            found = tuple(
                [Limit.from_item("requests", item) for item in policy.requests]
                + [Limit.from_item("tokens", item) for item in policy.tokens]
            )
            self._limits[policy] = found
        return found

    def _plan(self, policy: RateLimitPolicy) -> _Plan:
        """Per-policy constants. Memoised by the policy's identity (held in the entry):
        hashing a policy's parsed limits would cost more than the lookup saves."""
        found = self._plans.get(id(policy))
        if found is not None and found[0] is policy:
            return found[1]
        limits = self.limits_of(policy)
        request_limits = tuple(limit for limit in limits if limit.kind == "requests")
        plan = _Plan(
            limits,
            any(limit.kind == "tokens" for limit in limits),
            tuple(1 if limit.kind == "requests" else 0 for limit in limits),
            request_limits,
            (1,) * len(request_limits),
            policy.key,
            policy.key == _CLIENT_IP,
            "model" in policy.key or "route" in policy.key,
            {},
        )
        self._plans[id(policy)] = (policy, plan)
        return plan

    def _identity(self, scope: Scope, context: RequestContext, plan: _Plan) -> Identity | None:
        """:func:`~gemini_scale.keys.identity` for the plan's policy key, memoised for
        verified principals: hashing the canonical encoding is most of a memory limiter's
        cost, and a principal's bucket does not change between its requests (bounded; the
        client address is never memoised). Keyed by the principal object's identity, held
        in the entry so the id cannot be reused meanwhile (a verified token's principal is
        one cached object)."""
        dimensions = plan.dimensions
        if plan.by_address:
            return self._address_identity(scope)
        principal = context.principal
        if not isinstance(principal, Principal):
            # principal_of(scope), what identity() falls back to, inlined: compiled here
            state = scope_get(scope, "state")
            principal = state.get("principal") if isinstance(state, dict) else None
            if not isinstance(principal, Principal):
                principal = None
        if principal is None or "client_ip" in dimensions:
            return identity(scope, dimensions, trusted=self.trusted)
        key: Any = id(principal)
        if plan.by_route:
            route = context.route
            key = (
                key,
                route.template if route is not None else None,
                route.params.get("model") if route is not None else None,
            )
        buckets = plan.buckets
        found = buckets.get(key)
        if found is not None and found[0] is principal:
            return found[1]
        bucket = identity(scope, dimensions, trusted=self.trusted)
        if self._memoised >= _IDENTITY_CACHE_SIZE:  # one bound for all the plans' memos
            for _, each in self._plans.values():
                each.buckets.clear()
            self._memoised = 0
        buckets[key] = (principal, bucket)
        self._memoised += 1
        return bucket

    def _address_identity(self, scope: Scope) -> Identity | None:
        """The ``client_ip`` bucket, memoised by what decides it: the peer and, behind
        trusted proxies, the ``X-Forwarded-For`` lines (parsing addresses and hashing is
        most of the per-address limiter's cost; bounded)."""
        client = scope.get("client")
        peer = client[0] if client else None
        forwarded: tuple[bytes, ...] = ()
        if self.trusted and self.trusted.trusts_peer(peer):  # only then is X-Forwarded-For read
            forwarded = tuple(
                value for name, value in scope["headers"] if name.lower() == b"x-forwarded-for"
            )
            if sum(map(len, forwarded)) > _FORWARDED_MEMO_MAX:  # not worth keeping
                return identity(scope, _CLIENT_IP, trusted=self.trusted)
        key = (peer, forwarded)
        found = self._addresses.get(key)
        if found is None:
            found = identity(scope, _CLIENT_IP, trusted=self.trusted)
            remember(self._addresses, key, found, _IDENTITY_CACHE_SIZE)
        return found

    def _budget(self, policy: RateLimitPolicy, context: RequestContext) -> str:
        """Which budget a policy's counters belong to: the default policy's are shared by
        every route it covers; a route's own policy (mark or rule) has its own, stable
        across replicas (a digest of the route template and the policy)."""
        if policy is self.default:
            return ""
        template = context.route.template if context.route is not None else ""
        memo = (id(policy), template)
        found = self._budgets.get(memo)
        if found is not None and found[0] is policy:
            return found[1]
        signature = "|".join(
            [template, *map(str, policy.requests), "/", *map(str, policy.tokens), *policy.key]
        )
        budget = hashlib.sha256(signature.encode()).hexdigest()[:12]
        remember(self._budgets, memo, (policy, budget), _IDENTITY_CACHE_SIZE)
        return budget

    def _policy_of(self, scope: Scope, context: RequestContext) -> RateLimitPolicy | None:
        """The policy this request meets (``None``: exempt, or no limit applies)."""
        if self.exempt is not None and route_path(scope) in self.exempt:
            return None
        found = (
            policy_for(context, self._rules, RateLimitPolicy, scope)
            if self._route_policies
            else None
        )
        return found or self.default

    def _bucket(
        self, scope: Scope, context: RequestContext, plan: _Plan
    ) -> tuple[tuple[LimitKey, ...], Identity]:
        """The request's bucket, and the dimensions it was keyed on."""
        dimensions = plan.dimensions
        bucket = self._identity(scope, context, plan)
        if bucket is None:
            # A dimension this request lacks: a route without {model} keys on the rest (a
            # listing is per principal, not per model); without a principal (a public
            # route), on the client address. Never one bucket shared by everyone.
            narrower = tuple(d for d in dimensions if d not in ("model", "route"))
            if narrower and narrower != dimensions:
                dimensions = narrower
                bucket = identity(scope, dimensions, trusted=self.trusted)
            if bucket is None:
                dimensions = ("client_ip",)
                bucket = identity(scope, dimensions, trusted=self.trusted)
        assert bucket is not None
        return dimensions, bucket

    def _headed(
        self, context: RequestContext, plan: _Plan, decision: Decision
    ) -> list[tuple[str, Sequence[Limit], Decision]] | None:
        """Note ``decision`` for the ``RateLimit`` headers; the decisions whose headers this
        layer adds (the outermost limiter writes them for every limiter the request met)."""
        extras = context.extras
        decisions: list[tuple[str, Sequence[Limit], Decision]] | None = extras.get(DECISIONS_KEY)
        owner = decisions is None
        if decisions is None:
            decisions = extras[DECISIONS_KEY] = []
        decisions.append((self._name_prefix, plan.limits, decision))
        return decisions if owner and self.headers else None

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        policy = self._policy_of(scope, context)
        if policy is None:
            await self.app(scope, receive, send)
            return
        plan = self._plan(policy)
        method = self._token_method(scope) if plan.has_tokens else None
        charges_tokens = method is not None
        limits = plan.limits if charges_tokens else plan.request_limits
        if not limits:
            await self.app(scope, receive, send)
            return
        dimensions, bucket = self._bucket(scope, context, plan)
        costs: Sequence[int] = plan.request_costs
        if method is not None:  # (charges_tokens)
            try:
                receive = await load_json_body(scope, receive, context, self.max_body_bytes)
            except BodyRefusedError as refused:
                await send_error(send, refused.code, refused.message)
                return
            estimate = self._estimate(method, context, self.count)
            costs = (
                [1 if limit.kind == "requests" else estimate for limit in limits]
                if estimate
                else plan.unestimated_costs
            )
        limiter = self.limiter
        try:
            decision = (
                limiter.acquire_now(bucket.tag, limits, costs, scope=self._budget(policy, context))
                if limiter.synchronous
                else await limiter.acquire(
                    bucket.tag, limits, costs, scope=self._budget(policy, context)
                )
            )
        except StoreFailureError:
            await send_error(
                send,
                503,
                "Rate limiting is unavailable; please retry.",
                headers={"retry-after": "1"},
            )
            return
        headed = self._headed(context, plan, decision)
        reservation = decision.reservation if charges_tokens else None
        if headed is not None and reservation is None:
            send = _RateLimitHeaders(send, headed)
        if not decision.allowed:
            await self._refuse(send, decision, dimensions, bucket, context)
            return
        if reservation is None:
            await self.app(scope, receive, send)
            return
        # Call the app, reading the answer's usage (and adding the ``RateLimit`` headers of
        # ``headed``) as it passes, then settle the reservation: before the answer's last
        # body message goes on (see _AnswerSettler), else when the app returns.
        answer = AnswerUsage(self.count)
        context.extras[USAGE_KEY] = answer  # the metrics layer reads the usage too
        settler = _AnswerSettler(
            self, send, decision=decision, limits=limits, costs=costs, answer=answer,
            context=context, headed=headed,
        )
        # Not ``try``/``finally``: mypyc miscompiles an ``await`` in a ``finally`` clause (an
        # exception thrown into the app and handled there, as anyio handles a cancellation,
        # is raised again by the coroutine that awaits this one).
        try:
            await self.app(scope, receive, settler)
        except BaseException:
            if not settler.settled:
                await _completed(settler.settle_unfinished(scope))
            raise
        if not settler.settled:
            await _completed(settler.settle_unfinished(scope))

    async def _refuse(
        self,
        send: Send,
        decision: Decision,
        dimensions: tuple[LimitKey, ...],
        bucket: Identity,
        context: RequestContext,
    ) -> None:
        """Answer a refused request: 429 with ``QuotaFailure`` and ``RetryInfo``."""
        route = context.route
        labels = (
            {"model": route.params["model"]}
            if "model" in dimensions and route is not None and "model" in route.params
            else {}
        )
        message, details = quota_details(decision, dimensions, labels)
        logger.info("rate limited %s: %s", bucket.describe(), message)
        headers = {"retry-after": str(decision.retry_after)}
        await send_error(send, 429, message, details=details, headers=headers)

    def _token_method(self, scope: Scope) -> str | None:
        """The Gemini method (``generateContent``) of a request whose answer costs tokens
        (a POST to a path ending in one of ``token_methods``), else ``None``."""
        if scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if self._suffixes_of is not self.token_methods:  # (changed since: read it again)
            self._token_suffixes = _token_suffixes(self.token_methods)
            self._suffixes_of = self.token_methods
        for suffix, method in self._token_suffixes:
            if path.endswith(suffix):
                return method or _path_method(path)
        return None

    def _estimate(self, method: str, context: RequestContext, count: Count) -> int:
        """The request's token estimate, priced for ``count`` (its body as parsed)."""
        return estimate_request_tokens(
            context.extras.get(JSON_KEY),
            default_output_tokens=self.default_output_tokens,
            method=method,
            count=count,
        )

    def _unfinished_charge(
        self, scope: Scope, answer: AnswerUsage, context: RequestContext
    ) -> int | None:
        """What an answer cut short (the client went away, the app raised) costs when it
        reported no usage before it stopped: the prompt, which the upstream had by then
        (``None``, the reservation standing, for a 304 the cache settles as a whole)."""
        if answer.status == 304 or answer.tokens is not None:
            return None
        if self.count == "output":
            return 0
        return self._estimate(_path_method(scope["path"]), context, "input")

    def _settlement(
        self,
        decision: Decision,
        limits: Sequence[Limit],
        costs: Sequence[int],
        answer: AnswerUsage,
        context: RequestContext,
        *,
        unfinished: int | None = None,
    ) -> list[int] | None:
        """Settle ``decision``'s reservation to what ``answer`` reported (or, reporting
        nothing, to ``unfinished`` when given) at once, the usual case (``None``); else the
        deltas that a round trip (:func:`_settle_shielded`) must send."""
        deltas = _deltas(limits, costs, answer, context, unfinished)
        if self.limiter.settle_now(decision.reservation, deltas):
            return None
        return deltas


@mypyc_attr(allow_interpreted_subclasses=True)
class IPRateLimitMiddleware(RateLimitMiddleware):
    """A cheap per-client-address limit that runs *before* authentication (DESIGN.md §3).

    The address comes only from ``trusted_proxies``. Route marks and rules are not its
    business (the principal limiter enforces them), so it only applies ``default``, which
    is required and keyed by ``client_ip``.
    """

    enforces = frozenset()
    span_name = "gemini_scale.rate_limit.client_ip"
    route_policies = False
    name_prefix = "ip-"
    namespace = "rl-ip"

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: str = "600/minute",
        store: Store | None = None,
        limiter: RateLimiter | None = None,
        trusted_proxies: TrustedProxies | Collection[str] = (),
        on_store_error: StoreErrorMode = "local",
        headers: bool = True,
        exempt: Collection[str] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(
            app,
            store=store,
            limiter=limiter,
            default=RateLimitPolicy.parse(limit, key="client_ip"),
            trusted_proxies=trusted_proxies,
            on_store_error=on_store_error,
            headers=headers,
            exempt=exempt,
            clock=clock,
        )


class _AnswerSettler:
    """The ``send`` a token-charging request's app gets: it reads the answer's usage as the
    messages pass (never holding one back), adds the ``RateLimit`` headers, and settles the
    reservation before the answer's last body message goes on, so a client that waits for
    each answer finds its refund in place for its next call (layers inside may still be
    working, a cache storing the answer, when the client already has it).

    A plain callable returning the awaitable of the ``send`` it wraps (a settlement that
    needs a round trip first is awaited in a coroutine of its own): no coroutine of its own
    per message, which is most of what a wrapper costs."""

    def __init__(
        self,
        middleware: RateLimitMiddleware,
        send: Send,
        *,
        decision: Decision,
        limits: Sequence[Limit],
        costs: Sequence[int],
        answer: AnswerUsage,
        context: RequestContext,
        headed: list[tuple[str, Sequence[Limit], Decision]] | None,
    ) -> None:
        self.middleware = middleware
        self.send = send
        self.decision = decision
        self.limits = limits
        self.costs = costs
        self.answer = answer
        self.context = context
        self.headed = headed
        self.settled = False

    def __call__(self, message: Message) -> Awaitable[None]:
        sent = message_dict(message)
        kind: str = sent["type"]
        if kind == "http.response.body":
            more = bool(sent.get("more_body", False))
            answer = self.answer
            answer.feed(sent.get("body", b""), more)
            # (a 304 from a cache is settled later: its body reaches the reading then)
            if not more and not self.settled and answer.status != 304:
                deltas = self.middleware._settlement(
                    self.decision, self.limits, self.costs, answer, self.context
                )
                if deltas is not None:  # a round trip first, when the message is sent
                    return self._settled_then_sent(deltas, sent)
                self.settled = True
        elif kind == "http.response.start":
            self.answer.start(sent["status"], sent.get("headers", ()))
            headed = self.headed
            if headed is not None:
                _add_rate_limit_headers(sent, headed)
        return self.send(sent)

    async def _settled_then_sent(self, deltas: Sequence[int], message: Message) -> None:
        # Settled only once this runs: a send never awaited leaves it to settle_unfinished,
        # and one run after the app returned finds it settled by that.
        if not self.settled:
            self.settled = True
            await _settle_shielded(self.middleware.limiter, self.decision.reservation, deltas)
        await self.send(message)

    def settle_unfinished(self, scope: Scope) -> Coroutine[Any, Any, None] | None:
        """Settle an answer that did not finish (the app returned or raised first): at once,
        or by the round trip returned to await."""
        self.settled = True
        middleware, answer = self.middleware, self.answer
        unfinished = middleware._unfinished_charge(scope, answer, self.context)
        deltas = middleware._settlement(
            self.decision, self.limits, self.costs, answer, self.context, unfinished=unfinished
        )
        if deltas is None:
            return None
        return _settle_shielded(middleware.limiter, self.decision.reservation, deltas)


class _RateLimitHeaders:
    """The ``send`` of a request that charges no tokens: adds the ``RateLimit`` headers to
    the answer's start (a plain callable, like :class:`_AnswerSettler`)."""

    def __init__(
        self, send: Send, decisions: list[tuple[str, Sequence[Limit], Decision]]
    ) -> None:
        self.send = send
        self.decisions = decisions

    def __call__(self, message: Message) -> Awaitable[None]:
        sent = message_dict(message)
        kind: str = sent["type"]
        if kind == "http.response.start":
            _add_rate_limit_headers(sent, self.decisions)
        return self.send(sent)


def _token_suffixes(token_methods: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(suffix, the Gemini method it names when it is ``:method``, else ``""``) each."""
    return tuple(
        (suffix, suffix[1:] if suffix.rfind(":") == 0 else "") for suffix in token_methods
    )


def _path_method(path: str) -> str:
    """The Gemini method a request path names (``generateContent``)."""
    return path.rpartition(":")[2]


async def _completed(later: Coroutine[Any, Any, None] | None) -> None:
    """Await a settlement's round trip, if :meth:`_AnswerSettler.settle_unfinished` returned one."""
    if later is not None:
        await later


async def _settle_shielded(
    limiter: RateLimiter, reservation: Reservation | None, deltas: Sequence[int]
) -> None:
    with anyio.CancelScope(shield=True):  # a settlement begun is never cut short
        await limiter.settle(reservation, deltas)


def _add_rate_limit_headers(
    start: dict[str, Any], decisions: list[tuple[str, Sequence[Limit], Decision]]
) -> None:
    extra = rate_limit_headers(decisions)
    if extra:
        headers = start.get("headers")
        # A new list (the app's may be reused): one concatenation when it is a list.
        start["headers"] = headers + extra if type(headers) is list else [*(headers or ()), *extra]


def _deltas(
    limits: Sequence[Limit],
    costs: Sequence[int],
    answer: AnswerUsage,
    context: RequestContext,
    unfinished: int | None = None,
) -> list[int]:
    """``actual - reserved`` per limit: settle tokens to the real usage (DESIGN.md §3)."""
    status = answer.status
    if context.extras.get(CACHE_HIT_KEY) or status is None or status >= 400:
        actual: int | None = 0  # a hit or an error answer costs no tokens: refund it all
    else:
        actual = answer.tokens  # what the answer reported (all of it, or so far)
        if actual is None:
            actual = unfinished  # cut short before any usage: the prompt (None: as reserved)
    same_length(limits, costs)
    return [  # indexed: compiled, zip(strict=True) costs more than the work (see engine)
        0 if limits[i].kind != "tokens" else (costs[i] if actual is None else actual) - costs[i]
        for i in range(len(limits))
    ]
