"""``MetricsMiddleware``: the outermost layer. A request id, timing, and one record of what
every layer decided, as Prometheus metrics and one access-log record per request.

It is a pure-ASGI ``send`` wrapper: the answer streams through untouched (time to first
byte is when the first body chunk passes). What the other layers decided reaches it through
the request context (``RequestContext.extras``): the route template they matched, the
version, the principal, why authentication refused, each rate limiter's decision, the
cache's outcome, the answer's token usage. Nothing is read from raw paths, and no principal
or client-chosen value becomes a label without a bound.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import mypyc_attr

from gemini_scale.keys import TrustedProxies
from gemini_scale.memo import remember
from gemini_scale.observability import tracing
from gemini_scale.observability.logs import ACCESS_LOGGER, tag_exception
from gemini_scale.observability.logs import REQUEST_ID as _REQUEST_ID
from gemini_scale.observability.metrics import BoundedLabel, Families, TokenSink, families
from gemini_scale.observability.request_id import REQUEST_ID_HEADER, RequestIds
from gemini_scale.observability.tracing import _state as _tracing
from gemini_scale.ratelimit.usage import IN_PIECES, AnswerUsage, usage_split, whole_answer_usage
from gemini_scale.routing import (
    API_VERSION_EXTRA,
    AUTH_REFUSAL_KEY,
    CACHE_HIT_KEY,
    CACHE_OUTCOME_KEY,
    CLIENT_GONE_KEY,
    DECISIONS_KEY,
    UPSTREAM_BROKEN_KEY,
    USAGE_KEY,
    GeminiMiddleware,
    RequestContext,
    misconfigured_app,
)
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gemini_scale.observability.anomaly import UsageAnomalyDetector

__all__ = ["MetricsMiddleware"]

access_logger = logging.getLogger(ACCESS_LOGGER)
_now: Final = time.perf_counter
_INFO: Final = logging.INFO

UNMATCHED: Final = "(unmatched)"
_NONE: Final = "none"
_PROVIDER: Final = "gcp.gemini"
#: Gemini custom methods and their GenAI ``gen_ai.operation.name``.
_OPERATIONS: Final = {
    "generateContent": "generate_content",
    "streamGenerateContent": "stream_generate_content",
    "countTokens": "count_tokens",
    "embedContent": "embed_content",
    "batchEmbedContents": "batch_embed_contents",
}
_GENERATIONS: Final = frozenset({"generate_content", "stream_generate_content"})
_CACHE_RESULTS: Final = {
    "hit": "hit", "coalesced": "coalesced", "miss": "miss", "stored": "stored",
    "bypass": "bypass", "request": "bypass",
}
_STATUS: Final = {code: str(code) for code in range(100, 600)}
#: OpenTelemetry's rule for ``http.request.method``: the known methods, else ``_OTHER``.
_METHODS: Final = {m: m for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "QUERY",
)}
_OTHER_METHOD: Final = "_OTHER"
#: Distinct (method, route, status, version) kept with their children; more are labelled on
#: each request (label values are bounded anyway; this bounds the memo).
_MAX_CHILDREN: Final = 4096
#: A call's GenAI children (duration, first token, input and output tokens) and model label.
_GenAI = tuple[Any, Any, Any, Any, str]


def _status_label(x: _Exchange) -> str:
    """The status recorded: the one sent, 500 when the app failed, 499 when the client left
    before any answer."""
    if x.failed:
        return "500"
    if not x.status:
        return "499" if x.gone else "500"
    return _STATUS.get(x.status, "500")


def _note_client_left(x: _Exchange, exc: BaseException) -> None:
    """Mark ``x`` gone when ``exc`` says the client went away: the server cancelled the
    request's task (before the answer completed), or Starlette read an ``http.disconnect``
    (then no answer the app made reached anyone)."""
    if isinstance(exc, asyncio.CancelledError):
        if not x.complete:
            x.gone = True
            x.early = not x.status
        return
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):
        x.gone = x.early = True


async def _send_crash(x: _Exchange) -> None:
    from gemini_scale.errors import error_body, error_headers

    body = error_body(500, "An internal error has occurred.")
    try:
        await x({"type": "http.response.start", "status": 500, "headers": error_headers(body)})
        await x({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        x.gone = True


@mypyc_attr(allow_interpreted_subclasses=True)
class MetricsMiddleware(GeminiMiddleware):
    """Request ids, timing, Prometheus metrics and access logs for every HTTP request.

    Options:
        registry: the Prometheus registry (default: prometheus-client's global one).
        trusted_proxies: networks whose ``X-Request-ID`` is kept; any other client's is
            replaced by a generated id. Every answer carries exactly one ``X-Request-ID``.
        access_log: write one INFO record per request to ``gemini_scale.access``.
        anomalies: a :class:`~gemini_scale.observability.anomaly.UsageAnomalyDetector`
            told each principal's requests and tokens.
        tracing: turn OpenTelemetry tracing on (needs the ``otel`` extra).
        max_models, max_tenants: how many distinct model ids and tenants become label
            values; the rest are ``(other)``.
    """

    span_name = None  # it opens the server span itself

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
        access_log: bool = True,
        anomalies: UsageAnomalyDetector | None = None,
        tracing: bool = False,
        max_models: int = 100,
        max_tenants: int = 1000,
    ) -> None:
        super().__init__(app)
        self.families: Families = families(registry)
        self.request_ids = RequestIds(trusted_proxies)
        self.access_log = access_log
        self.anomalies = anomalies
        self._models = BoundedLabel(max_models)
        self._tenants = BoundedLabel(max_tenants)
        # (method, template, status, version) -> its duration and first-byte children:
        # .labels() costs more than the observation itself.
        self._children: dict[tuple[str, str, int, str | None, bool], tuple[Any, Any]] = {}
        # (operation, model) -> its GenAI children and model label.
        self._genai: dict[tuple[str, str], _GenAI] = {}
        # (operation, model, tenant) -> its token children.
        self._token_sinks: dict[tuple[str, str, str], TokenSink] = {}
        if tracing:
            from gemini_scale.observability.tracing import enable_tracing

            enable_tracing()

    async def before_shutdown(self) -> None:
        """Stop the anomaly detector and send its last counts while the app's store is
        still open (the app closes it in its own shutdown)."""
        if self.anomalies is not None:
            await self.anomalies.aclose()

    async def serve_misconfigured(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The 500 of an app that fails its audit, observed like any answer: a request id,
        metrics and an access record."""
        observer = copy.copy(self)  # the same families and memos, around the 500
        observer.app = misconfigured_app
        await observer.handle(scope, receive, send, RequestContext())

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        started = _now()
        ids = self.request_ids
        request_id = ids.from_proxy(scope) if ids.any_trusted else None
        if request_id is None:
            request_id = ids.new()
        # Inner layers, the app and the upstream call see this one id only.
        headers = scope["headers"]
        for name, _ in headers:
            if name == REQUEST_ID_HEADER:
                headers = [h for h in headers if h[0] != REQUEST_ID_HEADER]
                break
        scope["headers"] = [*headers, (REQUEST_ID_HEADER, request_id)]
        exchange = _Exchange(send, request_id, started, context)
        token = _REQUEST_ID.set(request_id)  # for every record logged meanwhile
        try:
            if _tracing.tracer is None:
                await self.app(scope, receive, exchange)
            else:
                await self._traced(scope, receive, exchange, context)
        except BaseException as exc:
            if not exchange.gone:
                _note_client_left(exchange, exc)
            if not exchange.gone:  # the app failed (not the client): the answer is a 500
                exchange.failed = True
                tag_exception(exc, request_id)  # for the error record an outer layer writes
                if not exchange.status and isinstance(exc, Exception):
                    # Answer it here, with the request id; the server's own 500 (or
                    # Starlette's error middleware) sees the answer started and stays quiet.
                    await _send_crash(exchange)
            raise
        finally:
            try:
                self._record(scope, context, exchange)
            finally:
                _REQUEST_ID.reset(token)

    async def _traced(
        self, scope: Scope, receive: Receive, exchange: _Exchange, context: RequestContext
    ) -> None:
        """The request inside a server span, continuing the W3C trace of a trusted proxy
        (any other client's ``traceparent`` would decide sampling and the trace id)."""
        method = scope["method"]
        trusted = self.request_ids.from_trusted_peer(scope)
        span = tracing.server_span(
            method, scope["headers"] if trusted else [], **{"http.request.method": method}
        )
        with span as opened:
            try:
                await self.app(scope, receive, exchange)
            finally:  # the route is known now (after the version layer's rewrite)
                route = context.route
                template = route.template if route is not None else UNMATCHED
                opened.update_name(f"{method} {template}")
                opened.set_attribute("http.route", template)
                status = exchange.status or 500
                if exchange.gone and (exchange.early or not exchange.status):
                    status = 0  # no answer reached the client
                if status:
                    opened.set_attribute("http.response.status_code", status)
                if status >= 500:  # OTel HTTP conventions: a server span's 5xx is an error
                    from opentelemetry.trace import StatusCode

                    opened.set_status(StatusCode.ERROR)

    def _record(self, scope: Scope, context: RequestContext, x: _Exchange) -> None:
        ended = _now()
        route = context.route
        template = route.template if route is not None else UNMATCHED
        extras = context.extras
        method = scope["method"]
        if method == "HEAD":  # the server sends no body
            x.sent, x.first_byte = 0, 0.0
        if extras.get(CLIENT_GONE_KEY):  # a layer inside saw the client leave first
            x.gone = x.early = True
        if x.gone or (
            not (x.complete or x.failed) and not extras.get(UPSTREAM_BROKEN_KEY)
        ):
            # The send failed, or the app stopped without (finishing) an answer: apps do
            # that only when they read that the client left (an upstream that broke off
            # the answer says so: the client is not gone then).
            x.gone = True
            if x.early:  # what the app answered then reached no one: a 499
                x.status, x.first_byte = 0, 0.0
            self.families.disconnects.labels(template).inc()
        key = (method, template, x.status, extras.get(API_VERSION_EXTRA), x.failed)
        children = self._children.get(key)
        if children is None:
            children = self._new_children(key, x)
        children[0].observe(ended - x.started)
        if x.first_byte:
            children[1].observe(x.first_byte - x.started)
        if extras:
            self._record_extras(extras, template)
        call = x.call
        if call is None and route is not None and route.params:
            call = _gemini_call(context)  # no answer started
        tokens_in = tokens_out = None
        if call is not None:
            model, operation = call
            if model is not None and operation is not None:
                tokens_in, tokens_out = self._record_call(context, x, model, operation, ended)
        principal = context.principal
        if self.anomalies is not None and principal is not None:
            self.anomalies.observe(
                f"{principal.issuer} {principal.subject}",
                tokens=(tokens_in or 0) + (tokens_out or 0),
            )
        if self.access_log and access_logger.isEnabledFor(_INFO):
            self._log(
                scope, context, x, template, ended, tokens_in=tokens_in, tokens_out=tokens_out
            )

    def _new_children(
        self, key: tuple[str, str, int, str | None, bool], x: _Exchange
    ) -> tuple[Any, Any]:
        """The request-duration and first-byte children of a (method, route, status,
        version) and remembers them (bounded)."""
        method, template, _, version, _ = key
        label = _METHODS.get(method, _OTHER_METHOD)  # methods are a client's choice
        fams = self.families
        children = (
            fams.requests.labels(label, template, _status_label(x), version or _NONE),
            fams.first_byte.labels(label, template),
        )
        if len(self._children) < _MAX_CHILDREN:
            self._children[key] = children
        return children

    def _record_extras(self, extras: dict[str, Any], template: str) -> None:
        """What authentication, the rate limiters and the cache decided."""
        fams = self.families
        refusal = extras.get(AUTH_REFUSAL_KEY)
        if refusal is not None:
            fams.auth_refusals.labels(refusal).inc()
        for prefix, _limits, decision in extras.get(DECISIONS_KEY, ()):
            fams.ratelimit_decisions.labels(*_decision_labels(prefix, decision)).inc()
        cache = extras.get(CACHE_OUTCOME_KEY)
        if cache is not None:
            fams.cache_results.labels(template, _CACHE_RESULTS.get(cache, "bypass")).inc()

    def _new_genai(self, operation: str, model: str, answered: bool) -> _GenAI:
        """The GenAI children of a call (remembered once its model id is a label value)."""
        # Only an answered call admits a model id to the label: refused requests (an
        # anonymous flood of made-up ids) must not use up the bound.
        label = self._models(model) if answered else self._models.known(model)
        labels = (operation, label, _PROVIDER)
        fams = self.families
        genai = (
            fams.genai_duration.labels(*labels),
            fams.genai_first_token.labels(*labels),
            fams.genai_tokens.labels(*labels, "input"),
            fams.genai_tokens.labels(*labels, "output"),
            label,
        )
        if label == model:
            self._genai[(operation, model)] = genai
        return genai

    def _record_call(
        self, context: RequestContext, x: _Exchange, model: str, operation: str, ended: float
    ) -> tuple[int | None, int | None]:
        """The GenAI metrics of a Gemini model call; its input and output tokens."""
        genai = self._genai.get((operation, model))  # only admitted model ids are keys
        if genai is None:
            genai = self._new_genai(operation, model, 200 <= x.status < 300)
        model = genai[4]
        genai[0].observe(ended - x.started)
        if operation == "stream_generate_content" and x.first_byte:
            genai[1].observe(x.first_byte - x.started)
        extras = context.extras
        if extras and extras.get(CACHE_HIT_KEY):
            return None, None  # a hit burnt no tokens (DESIGN.md §3)
        if x.headers is not None:  # what we read (so far, if the answer stopped early)
            usage = x.usage
        else:  # what the token limiter read
            usage = getattr(extras.get(USAGE_KEY), "usage", None) if extras else None
        if type(usage) is not dict:
            return None, None
        tokens_in, tokens_out = usage_split(usage)
        if tokens_in or tokens_out:
            principal = context.principal
            tenant = getattr(principal, "tenant", None) if principal is not None else None
            tenant = self._tenants(tenant) if tenant else "(none)"
            sink = self._token_sinks.get((operation, model, tenant))
            if sink is None:
                tokens = self.families.tokens
                sink = remember(
                    self._token_sinks,
                    (operation, model, tenant),
                    TokenSink.of(
                        genai[2],
                        genai[3],
                        tokens.labels(model, tenant, "input"),
                        tokens.labels(model, tenant, "output"),
                    ),
                    _MAX_CHILDREN,
                )
            sink.add(tokens_in or 0, tokens_out or 0)
        return tokens_in, tokens_out

    def _log(
        self,
        scope: Scope,
        context: RequestContext,
        x: _Exchange,
        template: str,
        ended: float,
        *,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
    ) -> None:
        extras = context.extras
        principal = context.principal
        route = context.route
        record: dict[str, Any] = {
            "request_id": x.request_id.decode("latin-1"),
            "method": scope["method"][:16],
            "route": template,
            "status": int(_status_label(x)),
            "api_version": extras.get(API_VERSION_EXTRA),
            "model": route.params.get("model") if route is not None else None,
            "principal": getattr(principal, "subject", None),
            "tenant": getattr(principal, "tenant", None),
            "auth_refusal": extras.get(AUTH_REFUSAL_KEY),
            "cache": extras.get(CACHE_OUTCOME_KEY),
            "rate_limit": _limit_state(extras.get(DECISIONS_KEY, ())),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "ttfb_ms": round((x.first_byte - x.started) * 1000, 3) if x.first_byte else None,
            "duration_ms": round((ended - x.started) * 1000, 3),
            "bytes": x.sent,
            "client_disconnected": x.gone,
            "upstream_broken": extras.get(UPSTREAM_BROKEN_KEY),
        }
        access_logger.info(
            "%s %s %s", scope["method"][:16], template, _status_label(x),
            extra={"access": {k: v for k, v in record.items() if v is not None}},
        )


class _Exchange:
    """The server-facing ``send``: adds the request id, notes the status, the first body
    byte, the bytes sent and whether the answer completed; reads a generation's usage when
    no token limiter does."""

    __slots__ = ("answer", "call", "complete", "context", "early", "failed", "first_byte",
                 "gone", "headers", "reading", "request_id", "send", "sent", "started",
                 "status", "usage")

    def __init__(
        self, send: Send, request_id: bytes, started: float, context: RequestContext
    ) -> None:
        self.send = send
        self.request_id = request_id
        self.started = started
        self.context = context
        self.status = 0
        self.first_byte = 0.0
        self.sent = 0
        self.complete = False
        self.gone = False  # the client went away (a send failed, or the app stopped early)
        self.early = False  # ... before the answer started (whatever the app sends then)
        self.failed = False  # the app raised
        self.call: tuple[str | None, str | None] | None = None  # (model, operation)
        self.reading = False  # we read the answer's usage ourselves
        self.usage: Any = None  # the usage we read, so far
        self.answer: AnswerUsage | None = None  # reads an answer that comes in pieces
        self.headers: Iterable[tuple[bytes, bytes]] | None = None  # the answer's, if we read

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                if not self.sent:
                    self.first_byte = _now()
                self.sent += len(body)
            more = message.get("more_body", False)
            if not more:
                self.complete = True
            if self.reading:
                self._read(body, more)
        elif kind == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers", ())
            if type(headers) is not list and not isinstance(headers, tuple):
                headers = list(headers)  # any iterable (a generator is read once)
            for name, _ in headers:
                if len(name) == 12 and name.lower() == REQUEST_ID_HEADER:  # exactly one id
                    headers = [h for h in headers if h[0].lower() != REQUEST_ID_HEADER]
                    break
            # A new list (the app may reuse its own, a cache does), in the message it sent.
            message["headers"] = [*headers, (REQUEST_ID_HEADER, self.request_id)]
            route = self.context.route
            if route is not None and route.params:  # a Gemini model route, perhaps
                self._want_usage(headers)
        elif kind == "http.response.pathsend":
            self.complete = True
        try:
            await self.send(message)
        except OSError:  # the server says the client is gone (ASGI 2.4)
            self.gone = True
            raise

    def _want_usage(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Read the usage of a generation's answer ourselves when no token limiter does
        (token counts and embeddings carry no ``usageMetadata``)."""
        context = self.context
        call = self.call = _gemini_call(context)  # the route is final once the answer starts
        if call[1] not in _GENERATIONS or USAGE_KEY in context.extras:
            return
        self.reading = True
        self.headers = headers

    def _read(self, body: bytes | bytearray | memoryview, more: bool) -> None:
        """Read the answer's usage from one body message: the usual answer, whole in one
        message, at once; anything else through an :class:`AnswerUsage`."""
        answer = self.answer
        if answer is None:
            if not more:
                usage = whole_answer_usage(body)
                if usage is not IN_PIECES:
                    self.usage = usage
                    self.reading = False
                    return
            answer = self.answer = AnswerUsage()
            answer.start(self.status, self.headers or ())
        answer.feed(body, more)
        self.usage = answer.usage


def _decision_labels(prefix: str, decision: Any) -> tuple[str, str]:
    """``(limit, outcome)`` of one rate limiter's decision."""
    if decision.degraded and decision.allowed:  # a refusal by the local limits is a refusal
        limit, outcome = None, "degraded"
    else:  # the tightest limit; for a refusal, the one that refused it (as RateLimit says)
        tightest = decision.tightest()
        limit = tightest[0] if tightest is not None else None
        outcome = "allowed" if decision.allowed else "refused"
    # Memoised by the limit's identity (a policy's limits live as long as the policy; the
    # entry holds the limit, so its id cannot be reused meanwhile).
    key = (prefix, id(limit))
    found = _limit_labels.get(key)
    if found is not None and found[0] is limit:
        return found[1], outcome
    who = "client_ip " if prefix else ""
    label = f"{who}{limit.kind} {limit.amount}/{limit.window}s" if limit else f"{who}any"
    remember(_limit_labels, key, (limit, label), _MAX_CHILDREN)
    return label, outcome


#: (limiter prefix, id(limit)) -> (the limit, its label value).
_limit_labels: dict[tuple[str, int], tuple[Any, str]] = {}


def _limit_state(decisions: Iterable[tuple[str, Any, Any]]) -> str | None:
    """The access log's view of the limits: the outcome of each limiter the request met."""
    states = [" ".join(_decision_labels(prefix, d)[::-1]) for prefix, _, d in decisions]
    return "; ".join(states) or None


def _gemini_call(context: RequestContext) -> tuple[str | None, str | None]:
    """``(model, operation)`` of a Gemini model route (``/models/{model}:method``)."""
    route = context.route
    if route is None:
        return None, None
    model = route.params.get("model")
    if model is None:
        return None, None
    template = route.template
    operation = _operation_of.get(template, _UNKNOWN)
    if operation is _UNKNOWN:
        operation = _OPERATIONS.get(template.rpartition(":")[2])
        if len(_operation_of) < 4096:
            _operation_of[template] = operation
    return model, operation


_UNKNOWN: Final = ""
#: route template -> its GenAI operation (``None``: not a Gemini model method).
_operation_of: dict[str, str | None] = {}


