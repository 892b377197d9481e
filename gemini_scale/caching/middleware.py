"""``CacheMiddleware``: answer repeated requests from a shared store, per caller."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, Literal

from mypy_extensions import mypyc_attr

from gemini_scale.auth.middleware import principal_of
from gemini_scale.body import BODY_KEY, JSON_KEY, is_json_content_type
from gemini_scale.caching.engine import CacheEngine, Flight
from gemini_scale.caching.entry import StoredResponse
from gemini_scale.caching.keys import DEFAULT_QUERY_PARAMS, UNPARSED, BodyDigests, BodyFacts
from gemini_scale.caching.recorder import Recorder
from gemini_scale.caching.request import (
    STREAM_METHOD,
    content_length,
    generation_permitted,
    header_fields,
    replay_messages,
)
from gemini_scale.caching.semantics import (
    BYPASS,
    COLLAPSED,
    HIT,
    MISS,
    NO_DIRECTIVES,
    ONLY_IF_CACHED,
    REQUESTED,
    RequestDirectives,
    etag_matches,
    not_modified_headers,
)
from gemini_scale.caching.signature import Known, Plan, Signature, Signatures
from gemini_scale.errors import ConfigurationError, StoreError, send_error
from gemini_scale.memo import remember
from gemini_scale.policies import GENERATION_MODES, CachePolicy, GenerationMode, Policy
from gemini_scale.principal import Principal
from gemini_scale.ratelimit.usage import AnswerUsage
from gemini_scale.routing import (
    CACHE_HIT_KEY,
    CACHE_OUTCOME_KEY,
    USAGE_KEY,
    GeminiMiddleware,
    RequestContext,
    Rules,
    policy_for,
)
from gemini_scale.stores.base import Store
from gemini_scale.types import SYSTEM_CLOCK, ASGIApp, Clock, Message, Receive, Scope, Send

#: ``RequestContext.extras`` key of the entry key (for ``CacheEngine.invalidate(keys=...)``).
CACHE_KEY_KEY: Final = "cache_key"

#: Request headers whose values are part of every key: content negotiation, and the
#: ``Vary: Origin, X-Origin, Referer`` Google's API answers with (gemini-api.md §1.4).
DEFAULT_VARY: Final = ("accept-encoding", "origin", "referer", "x-origin")
_PLANS_SIZE: Final = 1_000
_AGES: Final = tuple(str(age).encode() for age in range(3600))


def _is_json(content_type: bytes | None) -> bool:
    return content_type == b"application/json" or is_json_content_type(content_type)


class _Exchange:
    """One request on its way through the cache."""

    __slots__ = ("body", "context", "fields", "key", "plan", "receive", "scope", "send")

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext, plan: Plan,
        *, fields: dict[bytes, bytes],
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.context = context
        self.plan = plan
        self.fields = fields
        """The request's header fields (:func:`header_fields`)."""
        self.key = ""
        self.body: bytes | None = None
        """The body, when the cache read it (the app gets it replayed)."""

    def app_receive(self) -> Receive:
        """The ``receive`` the app gets: the body the cache read, then the server's."""
        return self.receive if self.body is None else self._replay

    async def _replay(self) -> Message:
        body = self.body
        if body is None:
            return await self.receive()
        self.body = None  # given once, as it came
        return {"type": "http.request", "body": body, "more_body": False}


@mypyc_attr(allow_interpreted_subclasses=True)
class CacheMiddleware(GeminiMiddleware):
    """Answer repeated requests from cache, per caller, with one upstream call per key.

    Routes are cached when marked with ``@cache(...)``, named in ``rules``, or covered by
    ``default``. Keys are built after authentication from the verified principal (or its
    tenant, or nobody for shared entries), the method, path, relevant query, canonical
    JSON body and allow-listed ``Vary`` headers (see :mod:`gemini_scale.caching.keys`).
    Answers carry RFC 9211 ``Cache-Status``, ``Age`` on hits, a strong ``ETag``
    (``If-None-Match`` gets 304), and ``Cache-Control: private`` when they belong to a
    caller. A hit sets ``RequestContext.extras["cache_hit"]``: the rate limiter in front
    charges its request but no tokens. A failing store makes the cache step aside.

    Options:
        store: where entries live (default: a new ``MemoryStore``); or ``engine``.
        engine: a configured :class:`CacheEngine` (then no ``store``; its own
            ``lock_ttl``, ``wait_timeout`` and clock apply).
        default: the policy for routes without a mark or rule (``None``: no caching).
        rules: central rules, path template -> :class:`CachePolicy`.
        generation: which ``generateContent`` answers are cached: ``off``,
            ``deterministic`` (temperature 0, one candidate) or ``all``; a policy's own
            ``generation`` wins.
        streams: record and replay streamed answers (off by default; a policy may say).
        max_entry_bytes: largest answer stored (a policy's ``max_bytes`` wins).
        max_body_bytes: largest request body keyed; bigger requests bypass the cache.
        query_params: query parameters that are part of the key; a request with another
            one is not cached (``None``: key every parameter). ``key`` is never keyed.
        vary: request headers keyed on every route (a policy's ``vary`` adds more); an
            answer whose ``Vary`` names another header is not stored.
        private: ``Cache-Control`` value set on answers owned by a caller (``None``:
            leave the app's).
        age: send ``Age`` on hits.
        expose_key: add the entry key to ``Cache-Status`` (an opaque digest; for debugging).
        lock_ttl, wait_timeout: single-flight lock lifetime and longest follower wait.
        clock: time source for freshness and ``Age``.
    """

    span_name = "gemini_scale.cache"

    enforces = frozenset({CachePolicy})

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        engine: CacheEngine | None = None,
        default: CachePolicy | None = None,
        rules: Mapping[str, Policy | Sequence[Policy]] | None = None,
        generation: GenerationMode = "deterministic",
        streams: bool = False,
        # ``| bool``: mypyc would turn a bool into 0 or 1 before the check below refuses it
        max_entry_bytes: int | bool = 1024 * 1024,
        max_body_bytes: int | bool = 1024 * 1024,
        query_params: Collection[str] | None = DEFAULT_QUERY_PARAMS,
        vary: Collection[str] = DEFAULT_VARY,
        private: str | None = "private",
        age: bool = True,
        expose_key: bool = False,
        lock_ttl: float | int = 30.0,
        wait_timeout: float | int = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(app)
        if engine is None:
            if store is None:
                from gemini_scale.stores.memory import MemoryStore

                store = MemoryStore(clock=clock)
            engine = CacheEngine(store, clock=clock, lock_ttl=lock_ttl, wait_timeout=wait_timeout)
        elif store is not None:
            raise ConfigurationError("give CacheMiddleware a store or an engine, not both")
        if generation not in GENERATION_MODES:
            raise ConfigurationError(
                f"generation must be off, deterministic or all: {generation!r}"
            )
        for name, value in (("max_entry_bytes", max_entry_bytes),
                            ("max_body_bytes", max_body_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
        self.engine = engine
        self.clock = engine.clock
        self.default = default
        self._rules = Rules(rules)
        self.generation: GenerationMode = generation
        self.streams = streams
        self.max_entry_bytes: int = max_entry_bytes
        self.max_body_bytes: int = max_body_bytes
        self.query_params = (
            None if query_params is None else frozenset(q.encode("latin-1") for q in query_params)
        )
        self.vary = tuple(sorted({h.lower() for h in vary}))
        self.private = None if private is None else private.encode("latin-1")
        self.age = age
        self.expose_key = expose_key
        self._plans: dict[int, Plan] = {}
        self._signatures = Signatures(self.query_params, engine)
        self._digests = BodyDigests()

    def _plan(self, policy: CachePolicy) -> Plan:
        plan = Plan(
            policy,
            vary=self.vary,
            generation=self.generation,
            streams=self.streams,
            max_bytes=self.max_entry_bytes,
            private=self.private,
        )
        # The plan keeps the policy (and so its id) alive.
        remember(self._plans, id(policy), plan, _PLANS_SIZE)
        return plan

    # -- the request

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        policy = policy_for(context, self._rules, CachePolicy, scope) or self.default
        if policy is None:
            await self.app(scope, receive, send)
            return
        plan = self._plans.get(id(policy))
        if plan is None or plan.policy is not policy:
            plan = self._plan(policy)
        method = scope["method"]
        if method not in plan.methods:
            await self.app(scope, receive, send)  # PURGE, DELETE...: the app's business (C25)
            return
        x = _Exchange(scope, receive, send, context, plan, fields=header_fields(scope["headers"]))
        path: str = scope["path"]
        known: Known | None = None
        if plan.streams or not path.endswith(STREAM_METHOD):
            body: bytes | None = b""
            if method != "GET" and method != "HEAD":  # noqa: PLR1714 (two compares are cheapest)
                facts = await self._body(x, context.extras)
                body = (
                    facts[0] if facts is not None
                    and generation_permitted(path, plan.generation, facts[1]) else None
                )
            if body is not None:
                principal = context.principal
                if not isinstance(principal, Principal):
                    principal = principal_of(scope)
                signature: Signature = (
                    plan.serial, id(principal), b"GET" if method == "HEAD" else method.encode(),
                    path, scope["query_string"], _field_values(x.fields, plan.vary), body,
                )
                known = self._signatures.get(signature, principal, plan)
                if known is None:
                    known = await self._describe(signature, principal, plan, context)
        if known is None or known[1] is None:  # not cacheable, or the store failed
            await self._bypass(x)
            return
        x.key = known[1]
        context.extras[CACHE_KEY_KEY] = x.key
        control = x.fields.get(b"cache-control")
        # An in-process store answers without a coroutine (``False``: ask it with one).
        found = self.engine.held(known[2]) if control is None else False
        if found:
            self.engine.stats.hits += 1
            await self._serve(x, found, HIT)
            return
        if found is None:  # no directives, and the store holds nothing: a plain miss
            await self._miss(x, NO_DIRECTIVES)
            return
        await self._lookup(x, RequestDirectives.parse(control), found)

    async def _describe(
        self, signature: Signature, principal: Principal | None, plan: Plan,
        context: RequestContext,
    ) -> Known | None:
        """What a new request signature means (its entry key and name), or ``None`` when
        the store failed: then the request bypasses the cache."""
        route = context.route
        model = route.params.get("model") if route is not None else None
        try:
            return await self._signatures.describe(signature, principal, plan, model)
        except StoreError:
            return None

    async def _lookup(
        self, x: _Exchange, directives: RequestDirectives,
        found: StoredResponse | Literal[False] | None,
    ) -> None:
        """Answer from the store what ``directives`` allow, else forward (``found``: what
        the store holds, ``False`` when it is still to be asked)."""
        if not (directives.no_cache or directives.no_store):
            engine = self.engine
            if found is False:
                try:
                    found = await engine.get(x.key)
                except StoreError:
                    await self._bypass(x)
                    return
            if found is not None and self._fresh_enough(found, directives):
                engine.stats.hits += 1
                await self._serve(x, found, HIT)
                return
        if directives.only_if_cached:  # whatever else the request says: never upstream
            label = self._label(ONLY_IF_CACHED, x.key).decode()
            await send_error(x.send, 504, "The answer is not in the cache (only-if-cached).",
                             headers={"cache-status": label})
            return
        await self._miss(x, directives)

    def _fresh_enough(self, found: StoredResponse, directives: RequestDirectives) -> bool:
        """Whether ``found`` is young enough for the request's ``max-age``."""
        return directives.max_age is None or found.age(self.clock.time()) <= directives.max_age

    async def _miss(self, x: _Exchange, directives: RequestDirectives) -> None:
        """Not answered from the store: forward (a miss joins the key's single flight),
        recording the answer, and store it when cacheable (a leader's flight releases its
        lock with the write)."""
        started = self.clock.time()  # the entry's age counts from here (_store_ttl)
        stats = self.engine.stats
        stats.misses += 1
        extras = x.context.extras
        head = x.scope["method"] == "HEAD"
        flight: Flight | None = None
        if head or directives.no_cache or directives.no_store:
            extras[CACHE_OUTCOME_KEY] = "miss" if head else "request"
            label = MISS if head else REQUESTED
            keep = directives.no_cache and not (head or directives.no_store)
        else:
            flight = self.engine.lead(x.key)
            if flight is None:
                flight, found = await self.engine.join(x.key)
                # An entry the store held already may be older than the request allows
                # (its max-age): then the request goes upstream alone and stores the answer.
                if found is not None and self._fresh_enough(found, directives):
                    stats.coalesced += 1
                    await self._serve(x, found, COLLAPSED)
                    return
            extras[CACHE_OUTCOME_KEY] = "miss"
            label, keep = MISS, True
        stored = None
        # Not ``try``/``finally``: mypyc miscompiles an ``await`` in a ``finally`` clause (see
        # RateLimitMiddleware.handle).
        try:
            plan = x.plan
            scope = x.scope
            recorder = Recorder(
                x.send, plan, label, detail=self._detail(x.key) if self.expose_key else b"",
                store=keep, now=started, stream=scope["path"].endswith(STREAM_METHOD),
                if_none_match=x.fields.get(b"if-none-match"),
            )
            await self.app(scope, x.app_receive(), recorder)
            if recorder.holding:
                await recorder.returned()
            if recorder.withheld is not None:
                _report_withheld(extras, recorder.withheld)
            stored = recorder.response(created=started, ttl=plan.policy.ttl)
            if stored is not None:
                kept = self.engine.put_now(x.key, stored, flight)  # None: a round trip
                if kept if kept is not None else await self.engine.put(x.key, stored, flight):
                    extras[CACHE_OUTCOME_KEY] = "stored"
        except BaseException:
            await self._release(flight, stored)
            raise
        await self._release(flight, stored)

    async def _release(self, flight: Flight | None, stored: StoredResponse | None) -> None:
        """End a miss's single flight (if it led or joined one) with what it stored."""
        if flight is not None:
            if flight.token is None:  # no store lock to release: no round trip
                self.engine.settle(flight, stored)
            else:
                await self.engine.land(flight, stored)

    def _detail(self, key: str) -> bytes:
        """The debug ``key`` parameter of ``Cache-Status`` (when ``expose_key``)."""
        return b'; key="' + key.encode() + b'"' if self.expose_key else b""

    def _label(self, label: bytes, key: str) -> bytes:
        return label + self._detail(key)

    async def _serve(self, x: _Exchange, found: StoredResponse, label: bytes) -> None:
        """Replay a stored answer (or 304 when the client holds it already)."""
        extras = x.context.extras
        extras[CACHE_HIT_KEY] = True
        extras[CACHE_OUTCOME_KEY] = "hit" if label is HIT else "coalesced"
        if label is HIT and not self.expose_key:
            headers = list(found.hit_headers)
        else:
            headers = [*found.headers, (b"cache-status", self._label(label, x.key))]
        if self.age:
            age = int(found.age(self.clock.time()))
            headers.append((b"age", _AGES[age] if age < len(_AGES) else str(age).encode()))
        send = x.send
        match = x.fields.get(b"if-none-match")
        if match is not None and etag_matches(match, found.etag):
            headers = not_modified_headers(headers)
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        head = x.scope["method"] == "HEAD"
        await send({"type": "http.response.body", "body": b"" if head else found.body})

    async def _bypass(self, x: _Exchange) -> None:
        self.engine.stats.bypassed += 1
        x.context.extras[CACHE_OUTCOME_KEY] = "bypass"
        recorder = Recorder(x.send, x.plan, BYPASS, store=False, now=self.clock.time())
        await self.app(x.scope, x.app_receive(), recorder)

    async def _body(self, x: _Exchange, extras: dict[str, Any]) -> BodyFacts | None:
        """The canonical body digest and determinism (``None``: do not cache).

        An outer layer's reading (``extras["body"]``) is used as it is. Else the body is
        read here when it declares a JSON ``Content-Type`` and a length within
        ``max_body_bytes``, and is replayed to the app as it came (the parsed body is not
        published: a repeated body is not parsed at all, its digest is remembered).
        """
        raw: bytes | None = extras.get(BODY_KEY)
        if raw is not None:
            if len(raw) > self.max_body_bytes:
                return None
            return self._digests.facts(raw, extras.get(JSON_KEY, UNPARSED))
        length = content_length(x.fields)
        if (
            length is None
            or length > self.max_body_bytes
            or (length and not _is_json(x.fields.get(b"content-type")))
            # Content-Length: 0 beside Transfer-Encoding (a server may pass both on): the
            # app may read a body the key would not hold.
            or (not length and b"transfer-encoding" in x.fields)
        ):
            return None
        if not length:
            return self._digests.facts(b"")  # the app reads the (empty) body as it comes
        receive = x.receive
        message = await receive()
        messages = [message]
        size = len(message.get("body", b""))
        limit = self.max_body_bytes
        while message["type"] == "http.request" and message.get("more_body", False):
            if size > limit:
                break
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
        if message["type"] != "http.request" or size > limit:
            x.receive = replay_messages(messages, receive)  # the client left, or too long
            return None
        whole: bytes = (
            message.get("body", b"") if len(messages) == 1
            else b"".join(m.get("body", b"") for m in messages)
        )
        x.body = whole
        return self._digests.facts(whole)


def _field_values(fields: dict[bytes, bytes], names: tuple[bytes, ...]) -> tuple[bytes | None, ...]:
    """The values of the request fields ``names`` (``None`` when absent), in order."""
    if len(names) == 1:  # the usual plan: only the host
        return (fields.get(names[0]),)
    return tuple([fields.get(name) for name in names])


def _report_withheld(extras: dict[str, Any], body: bytes) -> None:
    """A forwarded answer went to the client as a 304: hand its body to the token
    limiter's reading, which saw no body (the upstream call still used its tokens)."""
    answer = extras.get(USAGE_KEY)
    if isinstance(answer, AnswerUsage):
        answer.feed(body, False)


__all__ = ["CACHE_HIT_KEY", "CACHE_KEY_KEY", "CACHE_OUTCOME_KEY", "CacheMiddleware"]
