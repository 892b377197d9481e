"""The one place that knows how to find a request's route and its policies.

Middleware runs *before* the framework routes a request, and FastAPI >= 0.137 keeps included
routers as a tree whose matching is private (research/python-libs.md §5.3). So instead of
asking the router, we flatten the app's route tree once, through public API only (Starlette's
``Route``/``Mount``/``Host`` attributes and FastAPI's public ``iter_route_contexts`` where it
exists), compile each full path template with Starlette's ``compile_path``, and match requests
ourselves. Central rules (path template -> policies) are matched the same way and work for any
ASGI app.

Fail safe: the first request through a stack audits the app. Any route marked with a policy
kind that no middleware in its stack enforces raises :class:`PolicyNotEnforcedError`, and the
stack then answers 500 instead of serving the route unprotected.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType, WrapperDescriptorType
from typing import Any, ClassVar, TypeVar

from mypy_extensions import mypyc_attr
from starlette.routing import Host, Mount, Route, compile_path

from gemini_scale.errors import ConfigurationError, PolicyNotEnforcedError, send_error
from gemini_scale.memo import remember
from gemini_scale.observability.tracing import _state as _tracing
from gemini_scale.policies import Policy, policies_of
from gemini_scale.types import ASGIApp, Message, Scope

P = TypeVar("P", bound=Policy)

#: Scope key of the per-request :class:`RequestContext`.
CONTEXT_KEY = "gemini_scale"
#: ``RequestContext.extras`` key a cache sets on a hit: the rate limiter then charges the
#: request but no tokens.
CACHE_HIT_KEY = "cache_hit"
# What the layers decided, left in ``RequestContext.extras`` for the metrics layer and the
# access log (DESIGN.md §3: it observes what the other middlewares decide).
#: The cache's outcome: ``hit``, ``coalesced``, ``miss``, ``stored``, ``bypass``, ``request``.
CACHE_OUTCOME_KEY = "cache"
#: ``(name prefix, limits, Decision)`` of every rate limiter the request met.
DECISIONS_KEY = "rate_limits"
#: Why authentication refused the request (``AuthError.reason``).
AUTH_REFUSAL_KEY = "auth_refusal"
#: The ``AnswerUsage`` that read the answer's ``usageMetadata`` (set by the token limiter):
#: its ``usage`` and ``tokens`` so far.
USAGE_KEY = "usage"
#: ``(model, status, seconds, error)`` of the upstream call (set by ``GeminiUpstream``).
UPSTREAM_KEY = "upstream"
#: Set (``True``) by ``GeminiUpstream`` when the upstream broke off an answer it had begun:
#: the answer ends unfinished, and not because the client left.
UPSTREAM_BROKEN_KEY = "upstream_broken"
#: Set (``True``) by a layer that found the client gone before the answer started (the
#: upstream call it cancelled): what is sent afterwards reaches no one.
CLIENT_GONE_KEY = "client_gone"
#: The client's API version (set by ``VersionMiddleware``).
API_VERSION_EXTRA = "api_version"
_LIFESPAN_KEY = "gemini_scale.lifespan"

_EMPTY: Mapping[type[Policy], Policy] = {}
_MEMO_SIZE = 4096
_MEMO_PATH_MAX = 512


class RouteMatch:
    """The route a request resolved to, before the framework routes it (immutable).

    A plain class with read-only properties, not a frozen dataclass: compiled with mypyc,
    its fields are then read directly (every layer reads them on every request)."""

    __slots__ = ("_params", "_policies", "_template")
    __match_args__ = ("template", "params", "policies")

    def __init__(
        self, template: str, params: Mapping[str, str], policies: Mapping[type[Policy], Policy]
    ) -> None:
        self._template = template
        self._params = params
        self._policies = policies

    @property
    def template(self) -> str:
        """The full path template (``/v1beta/models/{model}:generateContent``): a safe label."""
        return self._template

    @property
    def params(self) -> Mapping[str, str]:
        """Raw path parameters."""
        return self._params

    @property
    def policies(self) -> Mapping[type[Policy], Policy]:
        """Policies marked on the endpoint."""
        return self._policies

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteMatch):
            return NotImplemented
        return (
            self._template == other._template
            and self._params == other._params
            and self._policies == other._policies
        )

    def __hash__(self) -> int:
        return hash((self._template, frozenset(self._params.items())))

    def __repr__(self) -> str:
        return (
            f"RouteMatch(template={self._template!r}, params={self._params!r}, "
            f"policies={self._policies!r})"
        )


@dataclass(slots=True)
class _Entry:
    regex: re.Pattern[str]
    template: str
    methods: frozenset[str] | None
    policies: Mapping[type[Policy], Policy]
    enforced_by_mount: frozenset[type[Policy]]
    endpoint_name: str
    under_host: bool = False

    def match(self, method: str, path: str) -> RouteMatch | None:
        if self.methods is not None and method not in self.methods:
            return None
        found = self.regex.match(path)
        if found is None:
            return None
        return RouteMatch(self.template, MappingProxyType(found.groupdict()), self.policies)


def _first_match(entries: Sequence[_Entry], method: str, path: str) -> RouteMatch | None:
    for entry in entries:
        found = entry.match(method, path)
        if found is not None:
            return found
    return None


def _marked(entries: Sequence[_Entry], kind: type[P]) -> Iterator[tuple[str, P]]:
    for entry in entries:
        found = entry.policies.get(kind)
        if found is not None:
            yield entry.template, found  # type: ignore[misc]


_NEVER = re.compile(r"(?!)")  # matches nothing


def _compile(template: str) -> re.Pattern[str]:
    regex, _, _ = compile_path(template)
    return regex


def _methods(route: Any) -> frozenset[str] | None:
    methods = getattr(route, "methods", None)
    if not methods:
        return None
    upper = {m.upper() for m in methods}
    if "GET" in upper:
        upper.add("HEAD")
    return frozenset(upper)


def _enforcers_of_app(app: Any) -> frozenset[type[Policy]]:
    """Policy kinds enforced by middlewares added with ``add_middleware`` (public attribute)."""
    kinds: set[type[Policy]] = set()
    for item in getattr(app, "user_middleware", ()) or ():
        cls = getattr(item, "cls", None)
        kinds.update(getattr(cls, "enforces", ()))
    return frozenset(kinds)


def _iter_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Routes in matching order, with FastAPI's included-router tree expanded (public API)."""
    routes = list(routes)
    if "fastapi" not in sys.modules:  # a FastAPI app has imported it; don't pay for it otherwise
        yield from routes
        return
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.137
    except ImportError:  # an older FastAPI, whose routes are flat
        yield from routes
        return
    yield from iter_route_contexts(routes)


def _flatten(
    routes: Iterable[Any], prefix: str, enforced: frozenset[type[Policy]], out: list[_Entry]
) -> None:
    for route in _iter_routes(routes):
        inner = getattr(route, "route", route)  # FastAPI RouteContext -> the route it describes
        if isinstance(inner, Mount) or (
            not isinstance(inner, Route)
            and getattr(route, "routes", None) is not None
            and not isinstance(inner, Host)
        ):
            mount_path = getattr(route, "path", "") or ""
            sub_enforced = enforced | _enforcers_of_app(getattr(route, "app", None))
            _flatten(getattr(route, "routes", ()) or (), prefix + mount_path, sub_enforced, out)
            continue
        if isinstance(inner, Host):
            # Host routes are matched by the framework only, so their marks could never be
            # found before routing: record them as unreachable, and the audit refuses them.
            hosted: list[_Entry] = []
            _flatten(getattr(inner, "routes", ()) or (), prefix, enforced, hosted)
            out.extend(
                _Entry(
                    _NEVER,
                    f"{inner.host}{e.template}",
                    e.methods,
                    e.policies,
                    frozenset(),
                    e.endpoint_name,
                    under_host=True,
                )
                for e in hosted
                if e.policies
            )
            continue
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        endpoint = getattr(route, "endpoint", None)
        template = prefix + path
        out.append(
            _Entry(
                regex=_compile(template),
                template=template,
                methods=_methods(route),
                policies=policies_of(endpoint),
                enforced_by_mount=enforced,
                endpoint_name=getattr(endpoint, "__qualname__", repr(endpoint)),
            )
        )


class RouteTable:
    """The flattened, compiled routes of one app, built once per app."""

    __slots__ = ("__weakref__", "_entries", "_memo")

    def __init__(self, entries: Sequence[_Entry]) -> None:
        self._entries = tuple(entries)
        # (method, path) -> match: requests repeat a few paths, and a regex scan of every
        # route costs more than the rest of a limiter. Bounded; long paths are not kept.
        self._memo: dict[tuple[str, str], RouteMatch | None] = {}

    @classmethod
    def of(cls, app: Any) -> RouteTable:
        """Flatten ``app``'s routes (a Starlette/FastAPI app or router; others give no routes)."""
        entries: list[_Entry] = []
        routes = getattr(app, "routes", None)
        if routes is not None:
            _flatten(routes, "", frozenset(), entries)
        return cls(entries)

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The first route that matches both ``method`` and ``path``."""
        memo = self._memo
        key = (method, path)
        try:
            return memo[key]
        except KeyError:
            pass
        found = _first_match(self._entries, method, path)
        if len(path) <= _MEMO_PATH_MAX:
            remember(memo, key, found, _MEMO_SIZE)
        return found

    def marked(self, kind: type[P]) -> Iterator[tuple[str, P]]:
        """``(template, policy)`` of every route marked with a ``kind`` policy."""
        return _marked(self._entries, kind)

    def audit(self, enforced: frozenset[type[Policy]]) -> None:
        """Raise :class:`PolicyNotEnforcedError` if a marked route has an unenforced policy."""
        problems = []
        for entry in self._entries:
            if entry.under_host:
                problems.append(
                    f"{entry.template} ({entry.endpoint_name}): marks under Host(...) cannot "
                    "be found before routing; use central rules"
                )
                continue
            missing = set(entry.policies) - enforced - entry.enforced_by_mount
            if missing:
                kinds = ", ".join(sorted(k.kind for k in missing))
                problems.append(f"{entry.template} ({entry.endpoint_name}): {kinds}")
        if problems:
            raise PolicyNotEnforcedError(
                "routes declare policies that no middleware in their stack enforces "
                "(add the middleware with app.add_middleware, or remove the decorator): "
                + "; ".join(problems)
            )


class Rules:
    """Central rules: path templates (optionally ``"METHOD /path"``) mapped to policies.

    ``Rules({"POST /v1beta/models/{model}:generateContent": CachePolicy(ttl=60)})``
    """

    __slots__ = ("_entries", "_memo", "_routes")

    def __init__(self, rules: Mapping[str, Policy | Sequence[Policy]] | None = None) -> None:
        entries: list[_Entry] = []
        for key, value in (rules or {}).items():
            method, _, path = key.partition(" ") if " " in key else ("", "", key)
            if not path.startswith("/"):
                raise ConfigurationError(f"rule {key!r}: the path template must start with '/'")
            policies = [value] if isinstance(value, Policy) else list(value)
            marks: dict[type[Policy], Policy] = {}
            for policy in policies:
                if not isinstance(policy, Policy):
                    raise ConfigurationError(f"rule {key!r}: {policy!r} is not a policy")
                marks[type(policy)] = policy
            methods = _methods(type("M", (), {"methods": {method}})) if method else None
            entries.append(_Entry(_compile(path), path, methods, marks, frozenset(), key))
        self._entries = tuple(entries)
        # (method, path, kind) -> policy: the regex scan once per distinct request line.
        self._memo: dict[tuple[str, str, type[Policy]], Policy | None] = {}
        # The rules as routes without their policies (for requests the app cannot route).
        self._routes = RouteTable([replace(entry, policies={}) for entry in entries])

    def __bool__(self) -> bool:
        return bool(self._entries)

    def marked(self, kind: type[P]) -> Iterator[tuple[str, P]]:
        """``(rule, policy)`` of every rule with a ``kind`` policy."""
        return _marked(self._entries, kind)

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The first rule that matches."""
        return _first_match(self._entries, method, path)

    def policy(self, method: str, path: str, kind: type[P]) -> P | None:
        """The ``kind`` policy of the first matching rule that has one."""
        memo = self._memo
        key: tuple[str, str, type[Policy]] = (method, path, kind)
        try:
            return memo[key]  # type: ignore[return-value]
        except KeyError:
            pass
        found: Policy | None = None
        for entry in self._entries:
            if kind in entry.policies and entry.match(method, path) is not None:
                found = entry.policies[kind]
                break
        if len(path) <= _MEMO_PATH_MAX:
            remember(memo, key, found, _MEMO_SIZE)
        return found  # type: ignore[return-value]

    def route(self, method: str, path: str) -> RouteMatch | None:
        """The route the first matching rule names: its template and path parameters, and
        no policies (each middleware reads its own rules for those)."""
        return self._routes.match(method, path)


logger = logging.getLogger("gemini_scale.routing")

_tables: weakref.WeakKeyDictionary[Any, RouteTable] = weakref.WeakKeyDictionary()


def route_table(app: Any) -> RouteTable:
    """The (cached) :class:`RouteTable` of ``app``."""
    try:
        table = _tables.get(app)
    except TypeError:  # not weak-referenceable: build each time (rare: custom ASGI callables)
        return RouteTable.of(app)
    if table is None:
        table = RouteTable.of(app)
        _tables[app] = table
    return table


_NO_ROUTES = RouteTable(())
_UNKNOWN: Any = object()


class PathSet:
    """Request paths given exactly, and every path under an entry that ends in ``/``."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        self.exact = frozenset(p for p in paths if not p.endswith("/"))
        self.prefixes = tuple(p for p in paths if p.endswith("/"))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def __contains__(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)


def scope_get(scope: Scope, key: str) -> Any:
    """``scope.get(key)``. Compiled, a dict's (every server's scope is one) is read
    directly, not through a method call: a third of a microsecond saved per read."""
    if isinstance(scope, dict):
        return scope.get(key)
    return scope.get(key)


def message_dict(message: Message) -> dict[str, Any]:
    """An ASGI message as a dict, as servers send them (another mapping is copied into
    one, and the copy is what a layer sends on): compiled, a dict's reads are direct."""
    return message if type(message) is dict else dict(message)


#: ``scope`` key of the path as the client sent it, when a layer rewrote ``scope["path"]``
#: (the version layer serving ``/v1`` from the ``/v1beta`` head).
CLIENT_PATH_KEY = "gemini_scale.client_path"


def client_path(scope: Scope) -> str:
    """The request path as the client sent it (``root_path`` included, as ``path``): what
    an error message should quote, not the head path a version layer routed it to."""
    found = scope.get(CLIENT_PATH_KEY)
    return found if isinstance(found, str) else scope["path"]


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``path`` without the server's ``root_path``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


class RequestContext:
    """State our middlewares share about one request, kept in ``scope["gemini_scale"]``.

    A plain class, not a dataclass: compiled with mypyc, a dataclass keeps an interpreted
    ``__init__`` and generic attribute reads, and every layer reads this on every request.
    """

    __slots__ = ("extras", "principal", "route")

    route: RouteMatch | None
    """The route resolved from the app's route table (``None``: no route matched)."""
    principal: Any
    """The verified :class:`~gemini_scale.principal.Principal`, once authentication ran."""
    extras: dict[str, Any]
    """Other per-request facts middlewares pass to each other."""

    def __init__(
        self,
        route: RouteMatch | None = None,
        principal: Any = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.route = route
        self.principal = principal
        self.extras = {} if extras is None else extras

    def __repr__(self) -> str:
        return (
            f"RequestContext(route={self.route!r}, principal={self.principal!r}, "
            f"extras={self.extras!r})"
        )


async def misconfigured_app(scope: Scope, receive: Any, send: Any) -> None:
    """The answer to every request while the app fails its audit: a 500 (the audit's error
    is in the logs)."""
    await send_error(send, 500, "The service is misconfigured; see its logs.")


@mypyc_attr(allow_interpreted_subclasses=True)
class GeminiMiddleware:
    """Base of every gemini-scale middleware: pass-through of non-HTTP scopes, the shared
    per-request context, route resolution and the enforcement audit.

    Subclasses set ``enforces`` to the policy kinds they act on and implement
    :meth:`handle` for HTTP requests.
    """

    enforces: ClassVar[frozenset[type[Policy]]] = frozenset()
    span_name: ClassVar[str | None] = "gemini_scale.middleware"
    """The name of the OpenTelemetry span around :meth:`handle` when tracing is on."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _inherit_coroutine_call(cls)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # app -> None (audit passed) or the error it raised; audited once per app.
        self._audits: weakref.WeakKeyDictionary[Any, ConfigurationError | None] = (
            weakref.WeakKeyDictionary()
        )
        # The last app served and its (table, audit outcome): nearly always the same app, and
        # two weak-dictionary lookups per request would cost more than the route match.
        self._last_app: Any = None
        self._wrapped: Any = _UNKNOWN
        self._last_resolution: tuple[RouteTable, ConfigurationError | None] | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                outermost = _LIFESPAN_KEY not in scope  # the outermost of ours audits
                scope[_LIFESPAN_KEY] = True
                await self.app(
                    scope,
                    self._lifespan_receive(receive),
                    self._lifespan_send(scope, send, outermost),
                )
                return
            await self.app(scope, receive, send)
            return
        context = scope_get(scope, CONTEXT_KEY)
        if context is None:
            # Outermost gemini-scale middleware: resolve the route once for all layers.
            resolution = self._last_resolution
            if resolution is not None and (
                scope_get(scope, "app") or self._wrapped
            ) is self._last_app:
                table = resolution[0] if resolution[1] is None else None  # the usual app
            else:
                table = self._route_table(scope)
            if table is None:
                await self.serve_misconfigured(scope, receive, send)
                return
            path = scope["path"] if not scope_get(scope, "root_path") else route_path(scope)
            context = RequestContext(table.match(scope["method"], path))
            scope[CONTEXT_KEY] = context
        tracer = _tracing.tracer
        if tracer is None or self.span_name is None:
            await self.handle(scope, receive, send, context)
            return
        with tracer.start_as_current_span(self.span_name):
            await self.handle(scope, receive, send, context)

    async def serve_misconfigured(self, scope: Scope, receive: Any, send: Any) -> None:
        """Answer a request while the app fails its audit: the outermost layer calls this
        (a layer that observes every request overrides it to observe these too)."""
        await misconfigured_app(scope, receive, send)

    def _route_table(self, scope: Scope) -> RouteTable | None:
        """The route table of the app serving ``scope``; ``None`` when its audit failed."""
        app = scope.get("app")
        if app is None:
            app = self._wrapped
            if app is _UNKNOWN:  # the .app chain is fixed once built: walk it once
                app = self._wrapped = self._wrapped_router()
        resolution = self._last_resolution
        if app is not self._last_app or resolution is None:
            table = route_table(app) if app is not None else _NO_ROUTES
            problem = self._audit(app, table) if app is not None else None
            resolution = (table, problem)
            self._last_app, self._last_resolution = app, resolution
        table, problem = resolution
        return table if problem is None else None

    def _lifespan_send(self, scope: Scope, send: Any, audit: bool) -> Any:
        """Wrap the lifespan ``send``: a misconfigured app fails start-up (not requests), and
        :meth:`aclose` runs when the app has shut down."""

        async def observed(message: Any) -> None:
            kind = message["type"]
            if audit and kind == "lifespan.startup.complete":
                app = scope.get("app") or self._wrapped_router()
                if app is not None and (problem := self._audit(app, route_table(app))):
                    message = {"type": "lifespan.startup.failed", "message": str(problem)}
            elif kind == "lifespan.shutdown.complete":
                try:
                    await self.aclose()
                except Exception:  # shutdown goes on; the failure is reported, not hidden
                    logger.warning("%s failed to close", type(self).__name__, exc_info=True)
            await send(message)

        return observed

    def _lifespan_receive(self, receive: Any) -> Any:
        """Wrap the lifespan ``receive``: :meth:`before_shutdown` runs when shutdown is asked
        for, before the app's own shutdown (which may close the stores it handed us)."""

        async def observed() -> Any:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                try:
                    await self.before_shutdown()
                except Exception:  # shutdown goes on; the failure is reported, not hidden
                    logger.warning("%s failed before shutdown", type(self).__name__, exc_info=True)
            return message

        return observed

    async def before_shutdown(self) -> None:
        """Finish work that needs the app's resources (e.g. send what is owed to a store);
        called when the server asks for shutdown, before the app shuts down."""

    async def aclose(self) -> None:
        """Release what this middleware opened itself (called at lifespan shutdown)."""

    def _audit(self, app: Any, table: RouteTable) -> ConfigurationError | None:
        try:
            if app in self._audits:
                return self._audits[app]
        except TypeError:  # not weak-referenceable: audit every time
            pass
        problem: ConfigurationError | None = None
        try:
            table.audit(_enforcers_of_app(app) | self.chain_enforcers())
            self.check_routes(table)
        except ConfigurationError as exc:
            logger.error("gemini-scale refuses to serve: %s", exc)
            problem = exc
        with contextlib.suppress(TypeError):
            self._audits[app] = problem
        return problem

    def check_routes(self, table: RouteTable) -> None:
        """Raise :class:`ConfigurationError` if the app's routes are unusable by this
        middleware (checked once per app, with the enforcement audit)."""

    def _wrapped_router(self) -> Any:
        """When we wrap an app from outside (no ``scope["app"]`` yet), the first object down
        the ``.app`` chain that has routes."""
        node: Any = self.app
        for _ in range(64):
            if node is None or getattr(node, "routes", None) is not None:
                return node
            node = getattr(node, "app", None)
        return None

    def chain_enforcers(self) -> frozenset[type[Policy]]:
        """Kinds enforced by this middleware and the gemini-scale middlewares inside it."""
        kinds: set[type[Policy]] = set()
        node: Any = self
        seen = 0
        while node is not None and seen < 64:
            if isinstance(node, GeminiMiddleware):
                kinds.update(node.enforces)
            node = getattr(node, "app", None)
            seen += 1
        return frozenset(kinds)

    async def handle(self, scope: Scope, receive: Any, send: Any, context: RequestContext) -> None:
        """Handle one HTTP request; the default passes it through."""
        await self.app(scope, receive, send)


def policy_for(context: RequestContext, rules: Rules, kind: type[P], scope: Scope) -> P | None:
    """The ``kind`` policy of a request: the route's mark first, then the first matching rule.

    A request the app's route table does not resolve (an app without one, a ``Host`` or
    mounted route) takes its route from the first matching rule: its template and
    ``{model}`` then key, budget and tag the request as a resolved route's would."""
    route = context.route
    if route is not None:
        found = route.policies.get(kind)
        if found is not None:
            return found  # type: ignore[return-value]
    if rules:
        method, path = scope["method"], route_path(scope)
        if route is None:
            context.route = rules.route(method, path)
        return rules.policy(method, path, kind)
    return None


def _inherit_coroutine_call(cls: type) -> None:
    """Let ``cls`` show the coroutine function it inherits as its ``__call__``.

    ASGI servers tell ASGI 3 from ASGI 2 by ``iscoroutinefunction(app.__call__)`` (uvicorn's
    default ``interface="auto"``, hypercorn). Compiled with mypyc, a subclass that inherits
    ``__call__`` holds a slot wrapper there instead, which answers no: handed to the server
    directly, the middleware would fail every request. Set on the class, the inherited
    function is found first; each call then goes through the type's generic call slot (about
    250-600 instructions more per layer, measured). A ``__call__`` of the class's own, or a
    plain one it inherits first (a mixin's), is left as it is. Nothing changes when not
    compiled."""
    if inspect.iscoroutinefunction(cls.__call__):
        return
    for klass in cls.__mro__:
        found = vars(klass).get("__call__")
        if found is None or isinstance(found, WrapperDescriptorType):
            continue  # a slot wrapper: what the class would run is further up
        if klass is not cls and inspect.iscoroutinefunction(found):
            setattr(cls, "__call__", found)  # noqa: B010 (mypy: a method)
        return


__all__ = [
    "API_VERSION_EXTRA",
    "AUTH_REFUSAL_KEY",
    "CACHE_HIT_KEY",
    "CACHE_OUTCOME_KEY",
    "CLIENT_GONE_KEY",
    "CLIENT_PATH_KEY",
    "CONTEXT_KEY",
    "DECISIONS_KEY",
    "UPSTREAM_BROKEN_KEY",
    "UPSTREAM_KEY",
    "USAGE_KEY",
    "GeminiMiddleware",
    "PathSet",
    "RequestContext",
    "RouteMatch",
    "RouteTable",
    "Rules",
    "client_path",
    "message_dict",
    "misconfigured_app",
    "policy_for",
    "route_path",
    "route_table",
    "scope_get",
]
