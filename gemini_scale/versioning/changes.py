"""Version changes: what differs between one API version and the next, as small objects.

A change describes one step from the version before it to the version it belongs to, in the
spirit of Stripe's and cadwyn's version changes. A client's request is migrated *up* the
chain of changes between its version and the head (oldest change first); the head's answer
is migrated back *down* the same chain (newest change first), JSON bodies whole and streams
event by event.

Declarative changes cover the common cases (:class:`FieldRenamed`, :class:`FieldAdded`,
:class:`FieldRemoved`, :class:`EndpointMoved`, :class:`ModelRenamed`); anything else is a
:class:`VersionChange` subclass that overrides the hooks it needs. Field paths are dotted
member names with ``*`` for every element of a list (``candidates.*.finishMessage``).
Route restrictions name the *head* version's routes, relative to the version prefix for
path-versioned APIs (``"POST /models/{model}:generateContent"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import compile_path

from gemini_scale.errors import ConfigurationError

__all__ = [
    "MISSING",
    "EndpointMoved",
    "FieldAdded",
    "FieldRemoved",
    "FieldRenamed",
    "ModelRenamed",
    "RequestInfo",
    "ResponseInfo",
    "VersionChange",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: "No default": a field added or removed without a value to fill in.
MISSING: Any = _Missing()


@dataclass(slots=True)
class RequestInfo:
    """What a request migration sees and may change (besides the JSON body)."""

    method: str
    path: str
    """The head path the request is served on (relative to a version prefix, if any)."""
    version: str
    """The client's version."""
    query: list[tuple[str, str]]
    """Decoded query parameters, in order; edit in place."""
    headers: MutableHeaders
    """The request headers; edit in place."""
    body_changed: bool = False
    """Set by body hooks that report their changes (``reports_changes``)."""


@dataclass(slots=True)
class ResponseInfo:
    """What a response migration sees and may change (besides the JSON body)."""

    status: int
    headers: MutableHeaders
    """The response headers; edit in place."""
    version: str
    """The client's version."""
    path: str
    """The head path the request was served on (relative to a version prefix, if any)."""


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _compile_routes(routes: Sequence[str] | None) -> tuple[tuple[frozenset[str] | None,
                                                                 re.Pattern[str]], ...] | None:
    if routes is None:
        return None
    if isinstance(routes, str):
        routes = (routes,)
    compiled = []
    for route in routes:
        method, _, path = route.partition(" ") if " " in route else ("", "", route)
        if not path.startswith("/") or (method and method.upper() not in _METHODS):
            raise ConfigurationError(f"route {route!r}: expected '/path' or 'METHOD /path'")
        methods = frozenset({method.upper()}) if method else None
        compiled.append((methods, compile_path(path)[0]))
    return tuple(compiled)


def _field_path(path: str) -> tuple[str, ...]:
    parts = tuple(path.split("."))
    if not path or any(not part for part in parts) or parts[-1] == "*":
        raise ConfigurationError(f"field path {path!r}: expected dotted names, e.g. 'a.*.b'")
    return parts


def _parents(body: Any, parts: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every object that ``parts`` (without the last name) leads to inside ``body``."""
    if not parts:
        if type(body) is dict:
            yield body
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if type(body) is list:
            for item in body:
                yield from _parents(item, rest)
    elif type(body) is dict and head in body:
        yield from _parents(body[head], rest)


class VersionChange:
    """One step between two versions. Override only the hooks the change needs; the
    middleware calls a hook only when a subclass defines it.

    Attributes:
        description: one line for the generated changelog (defaults to the docstring).
        routes: head routes the change applies to (``None``: all).
        versions: for a bundle's shims only: the client versions it applies to
            (``None``: all).
        query_names: when set, ``upgrade_request`` runs only for requests whose query
            has one of these parameters (it then costs nothing on other requests).
        reports_changes: ``upgrade_body`` sets ``request.body_changed`` when it changes
            the body; otherwise every body it sees is re-encoded.
        links_in_every_version: the ``Link`` targets of ``response_headers`` under the
            head's path prefix (``</v1beta/...>``) exist in every path-prefixed version: a
            client of another one gets them under its own prefix (``</v1/...>``).
    """

    description: str = ""
    routes: Sequence[str] | None = None
    versions: frozenset[str] | None = None
    query_names: frozenset[str] | None = None
    reports_changes: bool = False
    links_in_every_version: bool = False

    def __init__(self, *, description: str | None = None,
                 routes: Sequence[str] | None = None,
                 versions: Sequence[str] | None = None) -> None:
        if versions is not None:
            self.versions = frozenset(versions)
        if description is not None:
            self.description = description
        elif not self.description:
            self.description = " ".join((type(self).__doc__ or type(self).__name__).split())
        if routes is not None:
            self.routes = routes
        self._compiled = _compile_routes(self.routes)

    def applies(self, method: str, path: str) -> bool:
        """Whether the change concerns ``method path`` (a head path)."""
        try:
            compiled = self._compiled
        except AttributeError:  # a subclass that did not call VersionChange.__init__
            compiled = self._compiled = _compile_routes(self.routes)
        if compiled is None:
            return True
        return any(
            (methods is None or method in methods) and regex.match(path) is not None
            for methods, regex in compiled
        )

    def upgrade_path(self, method: str, path: str) -> str:
        """The request path in the next version (a pure function: results are memoized)."""
        return path

    def response_headers(self, method: str, path: str) -> Sequence[tuple[str, str]]:
        """Headers added to every answer to ``method path`` (the client's path at this
        step; a pure function: results are memoized)."""
        return ()

    def upgrade_request(self, request: RequestInfo) -> None:
        """Migrate the query and headers of a request to the next version."""

    def needs_body(self, raw: bytes) -> bool:
        """Whether ``upgrade_body`` may change this raw body; when no body hook of a request
        says so, the body is not even parsed. A cheap, conservative test on the bytes."""
        return True

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        """Migrate a JSON request body to the next version; return the new body."""
        return body

    def downgrade_response(self, response: ResponseInfo) -> None:
        """Migrate an answer's status and headers to the previous version."""

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        """Migrate a JSON answer (or one streamed event) to the previous version; return it."""
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def overrides(change: VersionChange, hook: str) -> bool:
    """Whether ``change`` defines its own ``hook`` (the middleware skips the others)."""
    return getattr(type(change), hook) is not getattr(VersionChange, hook)


@dataclass(frozen=True, slots=True)
class _Where:
    requests: bool = True
    responses: bool = True


class FieldRenamed(VersionChange):
    """``FieldRenamed("user.name", "fullName")``: the member ``name`` of ``user`` is called
    ``fullName`` from this version on (requests migrate up, answers down)."""

    def __init__(self, path: str, to: str, *, requests: bool = True, responses: bool = True,
                 routes: Sequence[str] | None = None, description: str | None = None) -> None:
        parts = _field_path(path)
        if not to or "." in to or to == "*":
            raise ConfigurationError(f"FieldRenamed: {to!r} must be a plain member name")
        self.parents, self.old, self.new = parts[:-1], parts[-1], to
        self.where = _Where(requests, responses)
        new_path = ".".join((*self.parents, to))
        super().__init__(
            description=description or f"`{path}` is renamed `{new_path}`.", routes=routes
        )

    reports_changes = True

    def _rename(self, body: Any, old: str, new: str) -> bool:
        changed = False
        for parent in _parents(body, self.parents):
            if old in parent and new not in parent:
                parent[new] = parent.pop(old)
                changed = True
        return changed

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        if self.where.requests and self._rename(body, self.old, self.new):
            request.body_changed = True
        return body

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        if self.where.responses:
            self._rename(body, self.new, self.old)
        return body


class _FieldPresence(VersionChange):
    """A member that exists on one side of the change only: filled in with ``default``
    (when given) for the side that has it, dropped for the side that does not."""

    reports_changes = True
    _verb = ""

    def __init__(self, path: str, *, default: Any = MISSING, requests: bool = True,
                 responses: bool = True, routes: Sequence[str] | None = None,
                 description: str | None = None) -> None:
        parts = _field_path(path)
        self.parents, self.name, self.default = parts[:-1], parts[-1], default
        self.where = _Where(requests, responses)
        super().__init__(description=description or f"`{path}` is {self._verb}.", routes=routes)

    def _fill(self, body: Any) -> bool:
        changed = False
        if self.default is not MISSING:
            for parent in _parents(body, self.parents):
                if self.name not in parent:
                    parent[self.name] = _copy(self.default)
                    changed = True
        return changed

    def _drop(self, body: Any) -> bool:
        changed = False
        for parent in _parents(body, self.parents):
            if self.name in parent:
                del parent[self.name]
                changed = True
        return changed


class FieldAdded(_FieldPresence):
    """``FieldAdded("user.email", default="")``: the member is new in this version. Older
    clients' requests get ``default`` (when given); it is removed from their answers."""

    _verb = "added"

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        if self.where.requests and self._fill(body):
            request.body_changed = True
        return body

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        if self.where.responses:
            self._drop(body)
        return body


class FieldRemoved(_FieldPresence):
    """``FieldRemoved("user.nickname", default=None)``: the member is gone from this
    version. Older clients may still send it (it is dropped) and get it back in answers
    with ``default`` (when given)."""

    _verb = "removed"

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        if self.where.requests and self._drop(body):
            request.body_changed = True
        return body

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        if self.where.responses:
            self._fill(body)
        return body


def _copy(value: Any) -> Any:
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


class EndpointMoved(VersionChange):
    """``EndpointMoved("/users/{id}/mail", "/users/{id}/email")``: the endpoint's path
    changed in this version; older clients keep calling the old one."""

    def __init__(self, old: str, new: str, *, methods: Sequence[str] | None = None,
                 description: str | None = None) -> None:
        if not old.startswith("/") or not new.startswith("/"):
            raise ConfigurationError("EndpointMoved paths must start with '/'")
        self.old_regex, _, old_params = compile_path(old)
        _, self.new_format, new_params = compile_path(new)
        if set(old_params) != set(new_params):
            raise ConfigurationError(
                f"EndpointMoved {old!r} -> {new!r}: both paths need the same parameters"
            )
        self.methods = frozenset(m.upper() for m in methods) if methods else None
        verbs = f"{', '.join(sorted(self.methods))} " if self.methods else ""
        super().__init__(description=description or f"`{verbs}{old}` moves to `{new}`.")

    def upgrade_path(self, method: str, path: str) -> str:
        if self.methods is not None and method not in self.methods:
            return path
        found = self.old_regex.match(path)
        if found is None:
            return path
        return self.new_format.format(**found.groupdict())


_MODEL_PATH = re.compile(r"^/models/(?P<model>[^/:]+)(?P<rest>(?::[^/]*)?)$")


def model_in_path(path: str) -> tuple[str, str] | None:
    """``("gemini-pro", ":generateContent")`` for ``/models/gemini-pro:generateContent``."""
    found = _MODEL_PATH.match(path)
    return None if found is None else (found["model"], found["rest"])


class ModelRenamed(VersionChange):
    """``ModelRenamed("gemini-pro", "gemini-2.5-pro")``: a model's id changed in this
    version. Older clients' paths and ``model`` members are migrated up, and the ids in
    answers (``name``, ``modelVersion``, model lists) back down."""

    def __init__(self, old: str, new: str, *, description: str | None = None) -> None:
        if not old or not new or "/" in old or "/" in new:
            raise ConfigurationError("ModelRenamed takes bare model ids ('gemini-pro')")
        self.old, self.new = old, new
        super().__init__(description=description or f"Model `{old}` is renamed `{new}`.")

    def upgrade_path(self, method: str, path: str) -> str:
        found = model_in_path(path)
        if found is None or found[0] != self.old:
            return path
        return f"/models/{self.new}{found[1]}"

    reports_changes = True

    def upgrade_body(self, body: dict[str, Any], request: RequestInfo) -> Any:
        if rename_model_members(body, {self.old: self.new}):
            request.body_changed = True
        return body

    def downgrade_body(self, body: Any, response: ResponseInfo) -> Any:
        # A streamed array with a Content-Length (a cached replay) comes whole, as a list.
        for answer in body if type(body) is list else (body,):
            if type(answer) is dict:
                self._downgrade(answer)
        return body

    def _downgrade(self, body: dict[str, Any]) -> None:
        old, new = self.old, self.new
        for item in (body, *(m for m in body.get("models", ()) if type(m) is dict)):
            if item.get("name") == f"models/{new}":
                item["name"] = f"models/{old}"
            if item.get("baseModelId") == new:
                item["baseModelId"] = old
        if body.get("modelVersion") == new:
            body["modelVersion"] = old


def rename_model_members(body: Any, names: dict[str, str]) -> bool:
    """Rename models in a request body's ``model`` members (countTokens'
    ``generateContentRequest``, ``batchEmbedContents``' requests); whether any changed."""
    changed = False
    targets = [body]
    if type(body) is dict:  # either spelling: the head takes both (DESIGN.md §4)
        for name in ("generateContentRequest", "generate_content_request"):
            inner = body.get(name)
            if type(inner) is dict:
                targets.append(inner)
    requests = body.get("requests") if type(body) is dict else None
    if type(requests) is list:
        targets.extend(r for r in requests if type(r) is dict)
    for target in targets:
        model = target.get("model")
        if type(model) is str:
            bare = model.removeprefix("models/")
            if bare in names:
                target["model"] = f"models/{names[bare]}"
                changed = True
    return changed

