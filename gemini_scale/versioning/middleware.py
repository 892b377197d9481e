"""``VersionMiddleware``: one head implementation serves every version of an API.

A request's version comes from its path prefix (``/v1``, ``/v1beta``: the ``versions``
bundle, Gemini's by default) or, on the service's own routes, from a dated header
(``X-API-Version: 2026-01-15``: the ``dated`` bundle). The request is rewritten to the head
version (path, query, headers; the JSON body when the app reads it) by the chain of changes
between the two, and the answer migrates back down the same chain: JSON documents whole,
SSE events and streamed JSON arrays one by one as they pass.

Everything that depends only on the request line (the version, the head path, which changes
apply, the static headers) is computed once per distinct request line and remembered, so a
head-version request costs a dictionary lookup and the route match.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote, unquote_plus, urlencode

from starlette.datastructures import MutableHeaders

from gemini_scale import fastjson
from gemini_scale.body import BODY_KEY, CLIENT_BODY_BYTES_KEY, JSON_KEY, is_json_content_type
from gemini_scale.errors import (
    ConfigurationError,
    HTTPError,
    InvalidArgumentError,
    send_error,
)
from gemini_scale.gemini_json import NonFiniteNumberError, dump_json
from gemini_scale.header_names import lowercased
from gemini_scale.header_values import bounded_decimal
from gemini_scale.memo import remember
from gemini_scale.policies import Policy, VersionPolicy
from gemini_scale.routing import (
    API_VERSION_EXTRA,
    CLIENT_PATH_KEY,
    CONTEXT_KEY,
    GeminiMiddleware,
    PathSet,
    RequestContext,
    RouteTable,
    Rules,
    client_path,
    policy_for,
    route_path,
)
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send
from gemini_scale.versioning.bundle import Version, VersionBundle
from gemini_scale.versioning.changes import RequestInfo, ResponseInfo, VersionChange, overrides
from gemini_scale.versioning.gemini import gemini_versions
from gemini_scale.versioning.lifecycle import (
    LABEL,
    Headers,
    Lifecycle,
    merge_deprecations,
    route_lifecycle,
    version_headers,
)
from gemini_scale.versioning.streams import (
    ArrayMigrator,
    DocumentMigrator,
    EventStreamMigrator,
)

__all__ = ["API_VERSION_KEY", "VersionMiddleware", "api_version"]

logger = logging.getLogger("gemini_scale.versioning")

#: Scope key of the client's version name (read it with :func:`api_version`).
API_VERSION_KEY: Final = "gemini_scale.api_version"

_MEMO_SIZE: Final = 4096
_MEMO_PATH_MAX: Final = 512
_HEADER_MAX: Final = 64
_VERSIONISH: Final = re.compile(r"v\d+[a-z0-9]*")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_RAW_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
_NO_LIFECYCLE: Final = Lifecycle(None, ())


def api_version(scope: Any) -> str | None:
    """The client's API version of a request (a Starlette ``Request`` or an ASGI scope), as
    resolved by :class:`VersionMiddleware`; ``None`` when it was not versioned."""
    scope = getattr(scope, "scope", scope)
    found = scope.get(API_VERSION_KEY)
    return found if isinstance(found, str) else None


@dataclass(frozen=True, slots=True)
class _Selection:
    """Everything about a request that follows from its version and request line."""

    version: Version
    bundle: VersionBundle
    prefix: str
    """The head's path prefix (``/v1beta``) or ``""`` for dated versions."""
    head_path: str | None
    """The path to serve (``None``: unchanged)."""
    head_relative: str
    """The head path without the prefix: what changes' ``routes`` are matched against."""
    request_hooks: tuple[VersionChange, ...]
    query_triggers: tuple[bytes, ...] | None
    """When every request hook names its ``query_names``: their spellings in a raw query
    string; the hooks run only when one occurs (``None``: they always run)."""
    body_hooks: tuple[VersionChange, ...]
    response_hooks: tuple[VersionChange, ...]
    """``downgrade_response`` hooks, newest change first."""
    body_down: tuple[VersionChange, ...]
    """``downgrade_body`` hooks, newest change first."""
    headers: Headers
    """Static headers for every answer (deprecation of the version or of a model, the
    resolved dated version)."""
    wraps_send: bool
    """Whether answers need the ``send`` wrapper (headers, response hooks)."""
    rewrites: bool
    """Whether every request is rewritten (a new path, or request hooks that always run)."""
    is_head: bool
    """A ``HEAD`` request: its answer has no body to migrate."""
    tag_suffix: bytes | None
    """How the entity tags of this version's answers end (``.v<version>"``), taken off the
    client's ``If-None-Match`` tags (``None``: its answers are the head's, tags and all)."""


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: int
    message: str
    quotes_path: bool = False
    """The message is "Method not found" for the path the client sent: written per request
    (a refusal is remembered by the path the app routes on, without ``root_path``)."""


_PLAIN: Final = "plain"  # not versioned: passes through (route deprecation headers only)
_EXEMPT: Final = "exempt"  # never versioned, never gated
_DATED: Final = "dated"  # the version comes from the header
_Resolved = _Selection | _Refusal | str


class VersionMiddleware(GeminiMiddleware):
    """Serve every version of an API from one head implementation (pure ASGI).

    ``app.add_middleware(VersionMiddleware)`` serves Gemini's ``/v1`` and ``/v1beta`` from
    a ``/v1beta`` head (:func:`~gemini_scale.versioning.gemini.gemini_versions`).

    Options:
        versions: the path-prefixed versions (default: Gemini's); ``None`` for none.
        dated: the dated versions of the service's own routes, picked by ``header``.
        header: the request header naming a dated version (default ``X-API-Version``).
        default: the dated version of a request without the header (default: the head);
            ``"required"`` refuses such requests with 400.
        unknown: an unknown dated version is refused with 400 listing the known ones
            (``"reject"``, the default) or served by the newest version not after it
            (``"closest"``, for ISO dates).
        dated_paths: path prefixes the dated versions apply to (default: all paths not
            under a version prefix).
        exempt: paths never versioned nor gated (health, readiness, metrics); an entry
            ending in ``/`` exempts everything under it.
        rules: central ``@version`` rules by path template (head paths).
        max_body_bytes: request bodies larger than this are not migrated (the layer that
            enforces the size limit refuses them).
    """

    enforces = frozenset({VersionPolicy})

    def __init__(
        self,
        app: ASGIApp,
        *,
        versions: VersionBundle | Literal["gemini"] | None = "gemini",
        dated: VersionBundle | None = None,
        header: str = "X-API-Version",
        default: str | None = None,
        unknown: Literal["reject", "closest"] = "reject",
        dated_paths: Collection[str] = ("/",),
        exempt: Collection[str] = ("/healthz", "/readyz", "/metrics"),
        rules: Mapping[str, Policy | Sequence[Policy]] | Rules | None = None,
        max_body_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        super().__init__(app)
        self.versions = gemini_versions() if versions == "gemini" else versions
        if self.versions is not None and not isinstance(self.versions, VersionBundle):
            raise ConfigurationError("versions must be a VersionBundle, 'gemini' or None")
        self.dated = dated
        if unknown not in ("reject", "closest"):
            raise ConfigurationError(f"unknown must be 'reject' or 'closest', not {unknown!r}")
        if unknown == "closest" and dated is not None and not dated.dated:
            raise ConfigurationError("unknown='closest' needs dated versions (YYYY-MM-DD)")
        if default is not None and default != "required" and (
            dated is None or dated.get(default) is None
        ):
            raise ConfigurationError(f"default {default!r} is not a dated version")
        self.header = header.lower().encode("latin-1")
        self.header_name = header
        self.default = default
        self.unknown = unknown
        self.dated_paths = tuple(dated_paths)
        self.exempt = PathSet(exempt)
        self.rules = rules if isinstance(rules, Rules) else Rules(rules)
        self.max_body_bytes = max_body_bytes
        self._by_path: dict[tuple[str, str], _Resolved] = {}
        self._by_header: dict[tuple[bytes | None, str, str], _Selection | _Refusal] = {}
        self._lifecycles: dict[tuple[int, str | None], Lifecycle] = {}
        self._policy_table: RouteTable | None = None
        self._policies = False

    # -- request line -> selection --------------------------------------------------------

    def _resolve_path(self, method: str, path: str, table: RouteTable | None) -> _Resolved:
        if path in self.exempt:
            return _EXEMPT
        bundle = self.versions
        if bundle is not None:
            segment, slash, rest = path[1:].partition("/")
            version = bundle.get(segment)
            if version is not None or _VERSIONISH.fullmatch(segment):
                if (
                    version is not bundle.head
                    and table is not None
                    and table.match(method, path) is not None
                ):
                    return _PLAIN  # the app serves this path itself (its own /v1/chat/...)
                if version is not None:
                    return self._select(bundle, version, method, "/" + rest if slash else "/")
                return _Refusal(
                    404,
                    f"API version {segment} is not served here; the versions are "
                    f"{', '.join(bundle.names)}.",
                )
        if self.dated is not None and path.startswith(self.dated_paths):
            return _DATED
        return _PLAIN

    def _resolve_header(self, value: bytes | None, method: str, path: str) -> _Selection | _Refusal:
        bundle = self.dated
        assert bundle is not None
        known = ", ".join(bundle.names)
        if value is not None and not value.strip():
            value = None  # an empty header says nothing: the default applies
        if value is None:
            if self.default == "required":
                return _Refusal(
                    400, f"The {self.header_name} header is required; the versions are {known}."
                )
            version = bundle.get(self.default) if self.default else bundle.head
        else:
            name = value.decode("latin-1").strip()
            version = bundle.get(name)
            if version is None and self.unknown == "closest":
                version = bundle.closest(name)
            if version is None:
                shown = name[:_HEADER_MAX] if name.isprintable() else "(unprintable)"
                return _Refusal(
                    400,
                    f"Unknown API version {shown!r} in {self.header_name}; the versions are "
                    f"{known}.",
                )
        assert version is not None
        return self._select(bundle, version, method, path, dated=True)

    def _select(
        self,
        bundle: VersionBundle,
        version: Version,
        method: str,
        relative: str,
        *,
        dated: bool = False,
    ) -> _Selection | _Refusal:
        if version.removed:
            instead = version.replacement or bundle.head.name
            return _Refusal(
                404, f"API version {version.name} has been removed; use {instead} instead."
            )
        if not dated and (
            "//" in relative or "/./" in relative or "/../" in relative
            or relative.endswith(("/.", "/.."))
        ):
            return _Refusal(404, "Method not found.", quotes_path=True)
        chain = bundle.chain(version.name)
        headers = list(version_headers(version, path_prefixed=not dated))
        head_relative = relative
        # A change's links name the head's URLs; where every version has them, a
        # path-prefixed client gets its own.
        relink = not dated and version is not bundle.head
        for change in chain:
            emitted = _encoded(change.response_headers(method, head_relative))
            if relink and change.links_in_every_version:
                emitted = _relinked(emitted, bundle.head.name, version.name)
            headers += emitted
            head_relative = change.upgrade_path(method, head_relative)
        if dated:
            prefix = ""
            head_path = head_relative if head_relative != relative else None
            # The answer depends on the header: shared caches must key on it.
            headers.append((self.header, version.name.encode("latin-1")))
            headers.append((b"vary", self.header_name.encode("latin-1")))
        else:
            prefix = f"/{bundle.head.name}"
            head_path = prefix + head_relative
            if version is bundle.head and head_relative == relative:
                head_path = None
        # A HEAD answer is its GET's without the body: the same changes make it (its tag).
        routed = "GET" if method == "HEAD" else method
        applying = tuple(c for c in chain if c.applies(routed, head_relative))
        backwards = tuple(reversed(applying))
        request_hooks = tuple(c for c in applying if overrides(c, "upgrade_request"))
        response_hooks = tuple(c for c in backwards if overrides(c, "downgrade_response"))
        body_down = tuple(c for c in backwards if overrides(c, "downgrade_body"))
        headers = list(merge_deprecations(headers))
        return _Selection(
            version=version,
            bundle=bundle,
            prefix=prefix,
            head_path=head_path,
            head_relative=head_relative,
            request_hooks=request_hooks,
            query_triggers=_query_triggers(request_hooks),
            body_hooks=tuple(c for c in applying if overrides(c, "upgrade_body"))
            if method in _BODY_METHODS else (),
            response_hooks=response_hooks,
            body_down=body_down,
            headers=tuple(headers),
            wraps_send=bool(headers or response_hooks or body_down),
            rewrites=head_path is not None or (
                bool(request_hooks) and _query_triggers(request_hooks) is None
            ),
            is_head=method == "HEAD",
            tag_suffix=b".v" + version.name.encode("latin-1") + b'"' if body_down else None,
        )

    def _selection(
        self, scope: Scope, method: str, path: str, found: _Resolved | None
    ) -> _Resolved:
        """The selection for a request line that is not a remembered path version."""
        if found is None:
            found = self._resolve_path(method, path, self._route_table(scope))
            if len(path) <= _MEMO_PATH_MAX:
                remember(self._by_path, (method, path), found, _MEMO_SIZE)
        if found is not _DATED:
            return found
        value = None
        for name, raw in scope["headers"]:
            if name == self.header:
                # Several lines are one comma-joined value (RFC 9110 §5.3), empty ones left
                # out (§5.6.1): two versions are not one.
                line = bytes(raw)
                if value is None or not value.strip():
                    value = line
                elif line.strip():
                    value += b", " + line
                if len(value) > _HEADER_MAX:
                    break
        if value is not None and len(value) > _HEADER_MAX:
            return _Refusal(400, f"The {self.header_name} header is too long.")
        header_key = (value, method, path)
        selected = self._by_header.get(header_key)
        if selected is None:
            selected = self._resolve_header(value, method, path)
            if len(path) <= _MEMO_PATH_MAX:
                remember(self._by_header, header_key, selected, _MEMO_SIZE)
        return selected

    # -- the request ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        method: str = scope["method"]
        path = route_path(scope)
        selected = self._by_path.get((method, path))
        if type(selected) is not _Selection:
            selected = self._selection(scope, method, path, selected)
            if not isinstance(selected, _Selection):
                await self._unversioned(scope, receive, send, selected)
                return
        if selected.rewrites or (
            selected.request_hooks
            and scope.get("query_string")
            and _triggered(selected.query_triggers, scope)
        ):
            scope = self._rewrite(scope, selected, path)
        _unversion_validators(scope, selected.tag_suffix)
        scope[API_VERSION_KEY] = selected.version.name
        context = scope.get(CONTEXT_KEY)
        if context is not None:  # an outer layer (the metrics layer) reads it there
            context.extras[API_VERSION_EXTRA] = selected.version.name
        app = scope.get("app")
        resolution = self._last_resolution
        if resolution is not None and app is self._last_app and resolution[1] is None:
            table = resolution[0]
        else:
            found = self._route_table(scope)
            if found is None:
                await self.serve_misconfigured(scope, receive, send)
                return
            table = found
        lifecycle = _NO_LIFECYCLE
        if self._policies if table is self._policy_table else self._has_policies(table):
            lifecycle = self._route_lifecycle(scope, table, selected)
            if lifecycle.refusal is not None:
                await send_error(send, 404, lifecycle.refusal)
                return
        if selected.wraps_send or lifecycle.headers:
            downgrade = _Downgrade(send, selected, lifecycle.headers)
            await self._call(scope, receive, downgrade, selected)
            await downgrade.flush()
        else:
            await self._call(scope, receive, send, selected)

    async def _call(self, scope: Scope, receive: Receive, send: Send, selected: _Selection) -> None:
        if selected.body_hooks and self._migratable(scope):
            await self._call_migrating(scope, receive, send, selected)
        else:
            await self.app(scope, receive, send)

    def _migratable(self, scope: Scope) -> bool:
        """Whether the body is read whole (when the app first reads) to migrate it: a JSON
        body (or one without a ``Content-Type``), the only kind the changes read, not
        declared longer than ``max_body_bytes``.
        Any other body passes as it comes: an inner layer may refuse the request after
        reading a little of it (authentication, a form body) and must not find it buffered."""
        json_body = True  # no Content-Type: JSON by Gemini's convention
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = bounded_decimal(value, self.max_body_bytes + 1)
                if declared is not None and declared > self.max_body_bytes:
                    return False
            elif name == b"content-type":
                json_body = is_json_content_type(value)
        return json_body

    async def _call_migrating(
        self, scope: Scope, receive: Receive, send: Send, selected: _Selection
    ) -> None:
        """Call the app with the body migrated up when it reads it. A migration that refuses
        the body (strict v1, say) answers in Google's envelope itself; the app then reads a
        disconnect, and whatever it sends or raises afterwards goes nowhere."""
        started = refused = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        async def refuse(error: HTTPError) -> Message:
            nonlocal refused
            if started:
                raise error
            refused = True
            await error.send(send)
            return {"type": "http.disconnect"}

        # The body hooks and the new Content-Length edit this request's own headers.
        scope = {**scope, "headers": list(scope["headers"])}
        try:
            await self.app(scope, self._migrating_receive(scope, receive, selected, refuse),
                           tracked)
        except Exception:
            if not refused:
                raise
            logger.debug("after a refused body the app raised", exc_info=True)

    async def _unversioned(
        self, scope: Scope, receive: Receive, send: Send, selected: _Refusal | str
    ) -> None:
        if type(selected) is _Refusal:
            message = (
                f"Method not found: {scope['method']} {client_path(scope)[:200]}."
                if selected.quotes_path
                else selected.message
            )
            await send_error(send, selected.code, message)
        elif selected is _EXEMPT:
            await self.app(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)  # -> handle(): route lifecycle

    def _route_lifecycle(
        self, scope: Scope, table: RouteTable, selected: _Selection
    ) -> Lifecycle:
        context = scope.get(CONTEXT_KEY)
        if context is None:
            context = scope[CONTEXT_KEY] = RequestContext(
                table.match(scope["method"], route_path(scope))
            )
        return self._lifecycle(context, scope, selected)

    def _has_policies(self, table: RouteTable) -> bool:
        """Whether any route of ``table`` or any rule carries a :class:`VersionPolicy`
        (without any, a request needs no route match here)."""
        if self._policy_table is not table:
            self._policy_table = table
            self._policies = bool(self.rules) or next(table.marked(VersionPolicy), None) is not None
        return self._policies

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """An unversioned request: only the route's own deprecation applies."""
        lifecycle = self._lifecycle(context, scope, None)
        if lifecycle.refusal is not None:
            await send_error(send, 404, lifecycle.refusal)
            return
        if lifecycle.headers:
            send = _add_headers(send, lifecycle.headers)
        await self.app(scope, receive, send)

    def _lifecycle(
        self, context: RequestContext, scope: Scope, selected: _Selection | None
    ) -> Lifecycle:
        policy = policy_for(context, self.rules, VersionPolicy, scope)
        if policy is None:
            return _NO_LIFECYCLE
        name = selected.version.name if selected is not None else None
        key = (id(policy), name)
        found = self._lifecycles.get(key)
        if found is None:
            bundle = selected.bundle if selected is not None else None
            known = (
                bundle is not None
                and all(n is None or bundle.get(n) is not None
                        for n in (policy.added, policy.removed))
            )
            found = route_lifecycle(policy, name if known else None, bundle)
            remember(self._lifecycles, key, found, _MEMO_SIZE)
        if found.refusal is not None:  # the request's own route goes into the message
            route = context.route
            label = f"{scope['method']} {route.template if route else route_path(scope)[:200]}"
            return Lifecycle(found.refusal.replace(LABEL, label), ())
        return found

    def _rewrite(self, scope: Scope, selected: _Selection, path: str) -> Scope:
        scope = dict(scope)
        if selected.head_path is not None:
            scope.setdefault(CLIENT_PATH_KEY, scope["path"])  # the first: the client's
            root: str = scope.get("root_path", "")
            full = root + selected.head_path if scope["path"] != path else selected.head_path
            scope["path"] = full
            scope["raw_path"] = quote(full, safe=_RAW_PATH_SAFE).encode("ascii")
        if selected.request_hooks and _triggered(selected.query_triggers, scope):
            query_string: bytes = scope.get("query_string", b"")
            parts = [p for p in query_string.split(b"&") if p]
            query = [_query_pair(part) for part in parts]
            original = list(query)
            scope["headers"] = list(scope["headers"])
            info = RequestInfo(
                method=scope["method"],
                path=selected.head_relative,
                version=selected.version.name,
                query=query,
                headers=MutableHeaders(scope=scope),
            )
            for change in selected.request_hooks:
                change.upgrade_request(info)
            if info.query != original:
                scope["query_string"] = _query_string(info.query, original, parts)
        context = scope.get(CONTEXT_KEY)
        if context is not None and selected.head_path is not None:
            # An outer layer matched the client's path: every layer now sees the head's.
            table = self._route_table(scope)
            context.route = table.match(scope["method"], route_path(scope)) if table else None
        return scope

    def _migrating_receive(
        self,
        scope: Scope,
        receive: Receive,
        selected: _Selection,
        refuse: Callable[[HTTPError], Awaitable[Message]],
    ) -> Receive:
        """A ``receive`` that, when the app first reads, reads the whole JSON body, migrates
        it up to the head and replays it (then defers to the server: disconnects)."""
        pending: list[Message] = []
        read = False
        limit = self.max_body_bytes

        async def migrated() -> Message:
            nonlocal read
            if read:
                return pending.pop(0) if pending else await receive()
            read = True
            message = await receive()
            try:
                return await _read_rest(
                    scope, selected, message, receive=receive, limit=limit, pending=pending
                )
            except HTTPError as error:
                return await refuse(error)

        return migrated

    def check_routes(self, table: RouteTable) -> None:
        """Every version named by an ``@version`` mark or rule must exist."""
        names = set(self.versions.names if self.versions else ())
        names |= set(self.dated.names if self.dated else ())
        problems = []
        for source in (table, self.rules):
            for template, policy in source.marked(VersionPolicy):
                for bound in (policy.added, policy.removed):
                    if bound is not None and bound not in names:
                        problems.append(f"{template}: unknown version {bound!r}")
        if problems:
            raise ConfigurationError(
                "@version names versions that no bundle has: " + "; ".join(problems)
            )


async def _read_rest(
    scope: Scope,
    selected: _Selection,
    message: Message,
    *,
    receive: Receive,
    limit: int,
    pending: list[Message],
) -> Message:
    """The request message the app reads first: the whole body migrated up, or (over
    ``limit``, or cut short by a disconnect) what came of it, unchanged."""
    if message["type"] == "http.request" and not message.get("more_body", False):
        body = message.get("body", b"")
        return _migrated_body(scope, selected, body) if len(body) <= limit else message
    chunks: list[bytes] = []
    size = 0
    while message["type"] == "http.request":
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            whole = b"".join(chunks)
            if size > limit:  # its last piece made it too large to migrate: as it came
                return {"type": "http.request", "body": whole, "more_body": False}
            return _migrated_body(scope, selected, whole)
        if size > limit:  # too large to migrate: relay it as it comes
            return {"type": "http.request", "body": b"".join(chunks), "more_body": True}
        message = await receive()
    if not chunks:
        return message  # a disconnect before any body
    pending.append(message)  # a disconnect mid-body: what came, then the disconnect
    return {"type": "http.request", "body": b"".join(chunks), "more_body": True}


def _migrated_body(scope: Scope, selected: _Selection, raw: bytes) -> Message:
    """The request message carrying ``raw`` migrated up to the head (or ``raw`` itself)."""
    message: Message = {"type": "http.request", "body": raw, "more_body": False}
    if not raw:
        return message
    for change in selected.body_hooks:
        if change.needs_body(raw):
            break
    else:
        return message
    try:
        body = fastjson.loads(raw)
    except (ValueError, RecursionError):
        return message  # the body check downstream refuses it
    if type(body) is not dict:
        return message
    info = RequestInfo(
        method=scope["method"],
        path=selected.head_relative,
        version=selected.version.name,
        query=[],
        headers=MutableHeaders(scope=scope),
    )
    dirty = False
    try:
        for change in selected.body_hooks:
            body = change.upgrade_body(body, info)
            dirty = dirty or not change.reports_changes
        if dirty or info.body_changed:
            raw = dump_json(body)
    except RecursionError:  # parsed, but too deep for the changes (or their encoding)
        raise InvalidArgumentError(
            "Invalid JSON payload received. The body is nested too deeply."
        ) from None
    except NonFiniteNumberError:  # re-encoded, 1e400 would be the non-JSON Infinity
        raise InvalidArgumentError(
            "Invalid JSON payload received. A number is out of range (NaN, Infinity or past "
            "a double's range, such as 1e400)."
        ) from None
    sent = len(message["body"])
    if dirty or info.body_changed:
        scope["headers"] = [
            (k, str(len(raw)).encode() if k == b"content-length" else v)
            for k, v in scope["headers"]
        ]
        message["body"] = raw
    context = scope.get(CONTEXT_KEY)
    if isinstance(context, RequestContext):  # later layers reuse the parsed body
        context.extras[BODY_KEY] = raw
        context.extras[JSON_KEY] = body
        context.extras[CLIENT_BODY_BYTES_KEY] = sent  # what a size cap applies to
    return message


def _query_pair(part: bytes) -> tuple[str, str]:
    name, _, value = part.decode("latin-1").partition("=")
    return unquote_plus(name), unquote_plus(value)


def _query_string(
    query: list[tuple[str, str]], original: list[tuple[str, str]], parts: list[bytes]
) -> bytes:
    """The query string for ``query``: when hooks only removed parameters, the remaining
    ones keep their bytes exactly; otherwise it is encoded anew."""
    kept: list[bytes] = []
    position = 0
    for pair in query:
        while position < len(original) and original[position] != pair:
            position += 1
        if position == len(original):
            return urlencode(query).encode("latin-1")
        kept.append(parts[position])
        position += 1
    return b"&".join(kept)


def _query_triggers(hooks: tuple[VersionChange, ...]) -> tuple[bytes, ...] | None:
    if any(hook.query_names is None for hook in hooks):
        return None
    names = {name for hook in hooks for name in hook.query_names or ()}
    forms = {form for name in names for form in (name, quote(name, safe=""))}
    return tuple(form.encode("latin-1") for form in sorted(forms))


def _triggered(triggers: tuple[bytes, ...] | None, scope: Scope) -> bool:
    """Whether request hooks with these query triggers run (``None``: always)."""
    if triggers is None:
        return True
    query: bytes = scope.get("query_string", b"")
    return bool(query) and any(form in query for form in triggers)


def _encoded(headers: Sequence[tuple[str, str]]) -> Headers:
    return tuple((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers)


def _relinked(headers: Headers, head: str, version: str) -> Headers:
    """``headers`` with ``Link`` targets under the head's prefix (``</v1beta/...>``) moved
    under ``version``'s (``</v1/...>``): what a client of that version would call."""
    under_head, under_version = f"</{head}/".encode(), f"</{version}/".encode()
    return tuple(
        (name, value.replace(under_head, under_version) if name == b"link" else value)
        for name, value in headers
    )


def _add_headers(send: Send, headers: Headers) -> Send:
    async def add(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return add


class _Downgrade:
    """The ``send`` of a versioned request: static headers, response hooks, and the body
    migrated back down (JSON whole, SSE events and streamed array elements as they pass)."""

    __slots__ = (
        "_decoder", "_held", "_length", "_migrator", "_original", "_prefix", "_response",
        "extra", "selected", "send", "started",
    )

    def __init__(self, send: Send, selected: _Selection, extra: Headers) -> None:
        self.send = send
        self.selected = selected
        self.extra = extra
        self.started = False
        self._held: Message | None = None  # the start, held until the body's length is known
        self._original: Message | None = None  # that start as it would go unmigrated
        self._length: list[tuple[bytes, bytes]] = []  # its Content-Length, if it had one
        self._prefix = b""
        self._response: ResponseInfo | None = None
        self._decoder: Any = None  # a zlib decompressor for a gzip or deflate answer
        self._migrator: DocumentMigrator | EventStreamMigrator | ArrayMigrator | None = None

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            await self._start(message)
            return
        if kind != "http.response.body":
            await self.flush()  # e.g. http.response.pathsend: the body is not ours to migrate
            await self.send(message)
            return
        if self._held is None and self._migrator is None:
            await self.send(message)
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body) + (b"" if more else self._decoder.flush())
            except zlib.error:  # not what it said it was: relay it untouched from here on
                await self._give_up(message)
                return
        if self._migrator is None:
            body, self._prefix = self._prefix + body, b""
            stripped = body.lstrip()
            if not stripped and more:
                self._prefix = body
                return
            streamed = not self._length  # a streamed array has no length; a document has
            self._migrator = (
                ArrayMigrator(self._migrate) if streamed and stripped[:1] == b"[" else
                DocumentMigrator(self._migrate)
            )
        migrator = self._migrator
        out = migrator.feed(body)
        if not more:
            out += migrator.finish()
        held = self._held
        if held is not None:
            if isinstance(migrator, DocumentMigrator) and migrator.holding:
                if more:
                    return
                held["headers"].append((b"content-length", str(len(out)).encode()))
            self._held = None
            await self.send(held)
        if out or not more:
            await self.send({"type": "http.response.body", "body": out, "more_body": more})

    async def _give_up(self, message: Message) -> None:
        self._decoder = self._migrator = None
        await self.flush()
        await self.send(message)

    async def flush(self) -> None:
        """Send a start still held (the app sent no body, or a body we do not migrate such
        as ``http.response.pathsend``) as it goes unmigrated."""
        held, self._held = self._held, None
        if held is None:
            return
        if not self._prefix:
            assert self._original is not None
            await self.send(self._original)
            return
        held["headers"] += self._length  # the whitespace read so far is all the body there is
        prefix, self._prefix = self._prefix, b""
        await self.send(held)
        await self.send({"type": "http.response.body", "body": prefix, "more_body": True})

    async def _start(self, message: Message) -> None:
        selected = self.selected
        headers = list(lowercased(message.get("headers", ())))  # a copy: hooks edit it
        status: int = message["status"]
        if selected.response_hooks or selected.body_down:
            info = self._response = ResponseInfo(
                status=status,
                headers=MutableHeaders(raw=headers),
                version=selected.version.name,
                path=selected.head_relative,
            )
            for change in selected.response_hooks:
                change.downgrade_response(info)
            status = info.status
        headers += selected.headers
        if self.extra:
            headers = list(merge_deprecations((*headers, *self.extra)))
        if selected.tag_suffix is not None:
            # Every answer's tag names the version, migrated or not (text, a 304, a HEAD):
            # untagged validators are dropped on the way in, so only such tags revalidate.
            version = selected.version.name.encode("latin-1")
            headers = [
                (name, _versioned_etag(value, version) if name == b"etag" else value)
                for name, value in headers
            ]
        message = {**message, "status": status, "headers": headers}
        if not self._migrates(status, headers):
            await self.send(message)
            return
        # The migrated body is another representation: uncompressed (when an inner layer
        # compressed it), its length known only once it is migrated (never, for a stream).
        kept = []
        for name, value in headers:
            if name == b"content-length":
                self._length.append((name, value))
            elif name != b"content-encoding":
                kept.append((name, value))
        self._original = message
        migrated = {**message, "headers": kept}
        if self._migrator is not None:
            await self.send(migrated)
        else:
            self._held = migrated

    def _migrates(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether this answer's body is migrated (and with what)."""
        if (
            not self.selected.body_down or self.selected.is_head
            or not 200 <= status < 300 or status == 204
        ):
            return False
        media = _media_type(headers)
        sse = media == b"text/event-stream"
        if not sse and media != b"application/json" and not media.endswith(b"+json"):
            return False
        encoding = _content_encoding(headers)
        if encoding in _DECODERS:
            self._decoder = zlib.decompressobj(_DECODERS[encoding])
        elif encoding != b"identity":
            _warn_encoded(encoding)
            return False
        if sse:
            self._migrator = EventStreamMigrator(self._migrate)
        return True

    def _migrate(self, value: Any) -> Any:
        info = self._response
        assert info is not None
        for change in self.selected.body_down:
            value = change.downgrade_body(value, info)
        return value


def _unversion_validators(scope: Scope, suffix: bytes | None) -> None:
    """``If-None-Match`` tags of a version's representations (``"abc.v<version>"``, ending
    in ``suffix``) back to the head's (``"abc"``), which the layers inside compare with: an
    older version's client gets its 304 too. Other tags name another representation (the
    head's) and are dropped, and a header left with none goes; ``*`` stays (``suffix``
    None: the version's answers are the head's, tags and all)."""
    if suffix is None:
        return
    headers = scope["headers"]
    if not any(name == b"if-none-match" for name, _ in headers):
        return
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name != b"if-none-match":
            kept.append((name, value))
        elif tags := _head_tags(value, suffix):
            kept.append((name, tags))
    scope["headers"] = kept


def _head_tags(value: bytes, suffix: bytes) -> bytes:
    """The members of an ``If-None-Match`` value that end in ``suffix``, as the head's
    tags, and ``*``; the others dropped."""
    members = (member.strip(b" \t") for member in value.split(b","))
    return b", ".join(
        member if member == b"*" else member[: -len(suffix)] + b'"'
        for member in members
        if member == b"*" or member.endswith(suffix)
    )


def _versioned_etag(value: bytes, version: bytes) -> bytes:
    """``"abc"`` -> ``"abc.v<version>"``: one entity tag per representation."""
    weak = value.startswith(b"W/")
    tag = value[2:] if weak else value
    if len(tag) < 2 or tag[:1] != b'"' or tag[-1:] != b'"':
        return value
    return (b"W/" if weak else b"") + tag[:-1] + b".v" + version + b'"'


def _media_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


#: zlib ``wbits`` per ``Content-Encoding`` that can be undone to migrate an answer.
_DECODERS: Final = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}
_warned: set[bytes] = set()


def _content_encoding(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"content-encoding":
            return value.strip().lower()
    return b"identity"


def _warn_encoded(encoding: bytes) -> None:
    if encoding not in _warned and len(_warned) < 16:
        _warned.add(encoding)
        logger.warning(
            "an answer in %r cannot be migrated to an older version: put the compressing "
            "middleware outside VersionMiddleware", encoding.decode("latin-1")
        )
