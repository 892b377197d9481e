"""The upstream Gemini client: one pooled ``httpx.AsyncClient``, server keys, unbuffered relay.

:class:`GeminiUpstream` sends the service's own calls (:meth:`GeminiUpstream.request`) and
relays incoming requests (:meth:`GeminiUpstream.forward`) to the Gemini API with the
*server's* key. Nothing that identifies the caller upstream ever leaves: the caller's
``Authorization``, ``x-goog-api-key``, cookies and ``?key=`` are dropped (DESIGN.md §3.7).

Answers come back as a Starlette response that relays the upstream body chunk by chunk
(:class:`UpstreamResponse`): no layer buffers ``text/event-stream`` (DESIGN.md §3), and a
client that goes away, before or after the upstream starts answering, cancels the upstream
request. A path that cannot reach the routed resource upstream (control characters, ``.``
or ``..`` segments) is refused with 400 ``INVALID_ARGUMENT`` without calling upstream.

Failure mapping (always Google's envelope, never a 500 traceback):

* no connection (refused, DNS, TLS, connect or pool timeout, client closed), or the
  upstream broke the protocol before answering: 503 ``UNAVAILABLE`` with ``Retry-After``;
* the upstream accepted the request but did not answer in time (read or write timeout):
  504 ``DEADLINE_EXCEEDED``;
* an upstream error status passes through with its Google envelope (re-serialized only when
  Google wrapped it in a one-element array), plus ``Retry-After`` taken from its
  ``RetryInfo.retryDelay`` when the upstream sent none; any other error body is wrapped
  into an envelope with the same status;
* a read failure *after* the response started ends the stream: an SSE stream that stopped
  on an event boundary gets one last Gemini-framed ``data: {"error": {...}}`` event (the
  official SDK raises it as ``APIError``) and ends cleanly; any other body is left
  incomplete, so the server aborts the connection and the client sees a truncated body
  rather than a short one that looks whole.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final

import anyio
import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gemini_scale.errors import (
    ERROR_CONTENT_TYPE,
    ConfigurationError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    canonical_status,
    error_body,
    error_response,
    reason_phrase,
)
from gemini_scale.gemini_json import AmbiguousSpellingError, respelled
from gemini_scale.header_values import http_date
from gemini_scale.observability import tracing
from gemini_scale.observability.metrics import BoundedLabel, families
from gemini_scale.routing import (
    CLIENT_GONE_KEY,
    CONTEXT_KEY,
    UPSTREAM_BROKEN_KEY,
    RequestContext,
    route_path,
)
from gemini_scale.types import Message, Receive, Scope, Send
from gemini_scale.urls import http_url_problem

__all__ = ["DEFAULT_BASE_URL", "FORWARDED_QUERY_PARAMS", "GeminiUpstream", "UpstreamResponse"]

logger = logging.getLogger("gemini_scale.upstream")

#: Google's Gemini Developer API.
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"

#: Query parameters :meth:`GeminiUpstream.forward` passes on; everything else (``key``,
#: ``$alt``, tracking junk) stays here.
FORWARDED_QUERY_PARAMS = frozenset({"alt", "pageSize", "pageToken"})

#: Query parameters :meth:`GeminiUpstream.request` never sends: a key in a URL ends up in
#: logs, and ``$alt=json;enum-encoding=int`` would turn enums into numbers.
_BLOCKED_QUERY_PARAMS = frozenset({"key", "$alt"})

#: Request headers the client sets itself; a caller's value for them is dropped.
_MANAGED_REQUEST_HEADERS = frozenset({
    "accept-encoding", "authorization", "connection", "content-length", "content-type",
    "cookie", "host", "keep-alive", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "x-goog-api-key",
})

#: Methods whose request body goes nowhere (drained, not buffered).
_BODILESS_METHODS = frozenset({"GET", "DELETE"})
#: Upstream response headers relayed to the client (no hop-by-hop, no cookies), the caching
#: ones included: a cache in front must see what the upstream allows (``no-store``,
#: ``private``, a lifetime or an age).
_RELAYED_RESPONSE_HEADERS = (
    b"content-type", b"content-disposition", b"vary", b"retry-after",
    b"cache-control", b"expires", b"age",
)

#: Upstream error bodies are read whole to check their envelope; larger ones are wrapped.
_MAX_ERROR_BODY = 1 << 20

#: A ``RetryInfo.retryDelay`` longer than this (Gemini's longest quota window) is unusable.
_MAX_RETRY_DELAY = 86_400

_USER_AGENT = "gemini-scale"
_REQUEST_ID_MAX = 200

#: Characters httpx refuses in a URL (``httpx.InvalidURL``).
_CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x1f\x7f]")
#: A ``.`` or ``..`` segment, also percent-encoded: httpx (or the upstream) would resolve it
#: to another resource.
_DOT_SEGMENT: Final = re.compile(r"(?:\.|%2e){1,2}", re.IGNORECASE)


def _event_boundary(tail: bytes) -> bool:
    """Whether relayed SSE bytes ending in ``tail`` stopped between events."""
    return not tail or tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))


def _sse_error_event(code: int, message: str) -> bytes:
    """One Gemini-framed SSE event carrying Google's error envelope."""
    payload = {"error": {"code": code, "message": message, "status": canonical_status(code)}}
    return b"data: " + json.dumps(payload, separators=(",", ": ")).encode() + b"\r\n\r\n"


def _google_envelope(body: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """``body`` and its ``error`` if it is Google's error envelope (unwrapping a one-element
    array), else None."""
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    wrapped = isinstance(data, list) and len(data) == 1
    if wrapped:
        data = data[0]
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if not (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and isinstance(error.get("message"), str)
    ):
        return None
    if not wrapped:
        return body, error
    try:
        return json.dumps(data, indent=2, ensure_ascii=False).encode(), error
    except (ValueError, RecursionError):
        return None


def _retry_delay(error: Mapping[str, Any]) -> str | None:
    """``Retry-After`` seconds from a ``google.rpc.RetryInfo`` detail (``"27s"`` -> ``"27"``);
    None when there is none or it is unusable (not a number, infinite, over a day)."""
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if (
            isinstance(delay, str)
            and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo")
            and delay.endswith("s")
        ):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                return None
            if not (math.isfinite(seconds) and seconds <= _MAX_RETRY_DELAY):
                return None
            return str(max(1, math.ceil(seconds)))
    return None


def _path_problem(path: str) -> str | None:
    """Why ``path`` cannot go upstream as it is (None: it can)."""
    if _CONTROL_CHARACTER.search(path):
        return "control characters"
    resource = path.split("?", 1)[0].split("#", 1)[0]
    if any(_DOT_SEGMENT.fullmatch(segment) for segment in resource.split("/")):
        return "a '.' or '..' segment"
    return None


def _routed_path(scope: Scope) -> str:
    """The path the app routed on (no ``root_path``), with the characters httpx would read
    as an escape, a query, a fragment or a separator escaped again: the upstream decodes
    exactly the path that was routed (``%2F`` sent by a client as ``%252F`` stays text)."""
    path = route_path(scope)
    return (
        path.replace("%", "%25").replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    )


class _ClientClosedResponse(Response):
    """499 ``CANCELLED`` for a client that left before the upstream answered.

    It reaches no one: servers drop it, and a ``send`` that fails (ASGI spec 2.4) is ignored.
    """

    def __init__(self) -> None:
        body = error_body(499, "The client closed the request.")
        super().__init__(body, status_code=499, media_type=ERROR_CONTENT_TYPE)
        self.headers["cache-control"] = "no-store"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope.get(CONTEXT_KEY)
        if isinstance(context, RequestContext):  # the metrics layer: a client that left
            context.extras[CLIENT_GONE_KEY] = True
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            logger.debug("client gone; its 499 was not sent")


async def _client_left(receive: Receive) -> bool:
    """Wait for ``http.disconnect`` on a request whose body was read.

    False when ``receive`` answers anything else, or fails: it does not behave like a
    server's, so there is nothing to watch (and nothing else is taken from it).
    """
    try:
        message = await receive()
    except Exception:  # watching is best effort: it must never fail the call itself
        logger.debug("cannot watch the client for a disconnect", exc_info=True)
        return False
    return bool(message.get("type") == "http.disconnect")


def _invalid_path_response(problem: str) -> Response:
    """400 ``INVALID_ARGUMENT`` for a path that cannot go upstream as it is."""
    return error_response(400, f"The request path is not valid: it has {problem}.")


def _failure_response(exc: Exception) -> Response:
    """Map a failed upstream exchange to Google's envelope (503 or 504)."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(
        exc, httpx.ConnectTimeout | httpx.PoolTimeout
    ):
        return UpstreamTimeoutError().response()
    return UpstreamUnavailableError().response()


class UpstreamResponse(Response):
    """A Starlette response relaying an open upstream response, chunk by chunk.

    Status and the safe headers are known when it is built; the body is read from the
    upstream only while the response is sent, so nothing is buffered. A client disconnect
    (``http.disconnect``, or a failing ``send`` on ASGI spec 2.4 servers) stops the relay and
    closes the upstream response, which cancels the upstream request. Middlewares may edit
    :attr:`headers` before it is sent. Code that decides not to send it must call
    :meth:`aclose`.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        *,
        headers: Sequence[tuple[bytes, bytes]],
        event_stream: bool,
    ) -> None:
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = list(headers)
        self._upstream = upstream
        self._event_stream = event_stream
        self.model = "(unknown)"
        """The model label of the call, for the broken-stream metric."""

    @property
    def event_stream(self) -> bool:
        """Whether the body is ``text/event-stream``."""
        return self._event_stream

    async def aclose(self) -> None:
        """Close the upstream response without sending it."""
        await self._upstream.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        logger.debug("client disconnected; cancelling the upstream stream")
                    cancel.cancel()
                    return

        try:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )
            async with anyio.create_task_group() as group:
                group.start_soon(watch_disconnect, group.cancel_scope)
                await self._relay(scope, send)
                finished = True
                group.cancel_scope.cancel()
        except OSError:
            # ASGI spec 2.4 servers report a gone client by failing send().
            logger.debug("client went away before the upstream response started")
        finally:
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()

    async def _relay(self, scope: Scope, send: Send) -> None:
        tail = b""
        try:
            async for chunk in self._upstream.aiter_bytes():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = (tail + chunk)[-4:]
        except (httpx.TransportError, httpx.DecodingError) as exc:
            context = scope.get(CONTEXT_KEY)
            if isinstance(context, RequestContext):  # the metrics layer: not the client
                context.extras[UPSTREAM_BROKEN_KEY] = True
            await self._end_broken_stream(send, exc, tail)
            return
        except OSError:
            logger.debug("client went away while the upstream stream was relayed")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end_broken_stream(self, send: Send, exc: Exception, tail: bytes) -> None:
        timed_out = isinstance(exc, httpx.TimeoutException)
        families().upstream_errors.labels(self.model, "broken_stream").inc()
        logger.warning(
            "upstream stream broke after the response started: %s", type(exc).__name__
        )
        if not (self._event_stream and _event_boundary(tail)):
            return  # leave the response incomplete: the server aborts the connection
        if timed_out:
            event = _sse_error_event(504, UpstreamTimeoutError().message)
        else:
            event = _sse_error_event(503, UpstreamUnavailableError().message)
        message: Message = {"type": "http.response.body", "body": event, "more_body": False}
        try:
            await send(message)
        except OSError:
            logger.debug("client went away before the stream error event was sent")


class GeminiUpstream:
    """The Gemini API as seen from the service: a key pool over one pooled HTTP client.

    ``base_url`` may carry a path prefix. ``api_keys`` are the *server's* keys, used
    round-robin as ``x-goog-api-key`` (none configured: no key is sent, as for the offline
    stand-in). ``timeout`` bounds every wait for upstream bytes (not the whole stream);
    ``connect_timeout`` bounds connecting and waiting for a free pooled connection.
    ``transport`` replaces the network (``StreamingASGITransport`` for an in-process
    upstream, ``httpx.MockTransport`` in tests). Building one opens no connection; use it as
    an async context manager or call :meth:`aclose` on shutdown.

    The client ignores proxy and ``.netrc`` settings from the environment (``.netrc`` could
    add an ``Authorization`` header) and keeps no cookies, so nothing leaks between callers.
    """

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_keys: Sequence[str] = (),
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if isinstance(api_keys, str):
            raise ConfigurationError("api_keys must be a sequence of keys, not one string")
        problem = http_url_problem(base_url, base=True)
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            problem = problem or "must be a valid URL"
        if problem is not None:
            raise ConfigurationError(f"base_url {problem}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("timeout and connect_timeout must be positive")
        if max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1")
        self._base_url = str(url).rstrip("/")
        self._keys = tuple(key.strip() for key in api_keys if key.strip())
        self._next_key = 0
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"accept-encoding": "identity", "user-agent": _USER_AGENT},
            cookies=no_cookies,
            transport=transport,
            trust_env=False,
            follow_redirects=False,
        )

    @property
    def base_url(self) -> str:
        """The upstream base URL, without a trailing slash."""
        return self._base_url

    @property
    def key_count(self) -> int:
        """How many server keys are in the pool."""
        return len(self._keys)

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`aclose` has run."""
        return self._client.is_closed

    async def __aenter__(self) -> GeminiUpstream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (and the transport)."""
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        json_body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Call the upstream with the server key; the answer streams back as a response.

        ``path`` starts with ``/`` (``/v1beta/models/gemini-2.5-flash:generateContent``).
        ``key`` and ``$alt`` are removed from ``query``; credentials, cookies and hop-by-hop
        names are removed from ``headers``.
        """
        safe_query = [(name, value) for name, value in query if name not in _BLOCKED_QUERY_PARAMS]
        extra = {
            name.lower(): value
            for name, value in (headers or {}).items()
            if name.lower() not in _MANAGED_REQUEST_HEADERS
        }
        return await self._exchange(method, path, safe_query, json_body, extra)

    async def forward(
        self, request: Request, *, path: str | None = None, body: bytes | None = None
    ) -> Response:
        """Relay an incoming request upstream with the server key.

        Goes to the path the app routed on (without ``root_path``), or ``path``, with only
        ``alt``, ``pageSize`` and ``pageToken`` from its query, ``body`` (or the request's
        own body; snake_case member names spelled camelCase: one that spells a member both
        ways is answered 400 ``INVALID_ARGUMENT`` without a call) and no caller header except
        ``x-request-id``. The request's own body is read even when ``body`` is given, so
        that a client that leaves before the upstream answers cancels the upstream call. A
        ``HEAD`` goes upstream as a ``GET`` (the server sends the headers only); the body of a
        ``GET``, ``HEAD`` or ``DELETE`` is drained, never kept nor sent upstream.
        """
        target = path if path is not None else _routed_path(request.scope)
        query = [
            (name, value)
            for name, value in request.query_params.multi_items()
            if name in FORWARDED_QUERY_PARAMS
        ]
        method = request.method
        if method == "HEAD":  # the server sends no body; the upstream need not know HEAD
            method = "GET"
        bodiless = method in _BODILESS_METHODS
        try:
            if bodiless:  # drained, never kept (no size cap applies) nor sent upstream
                async for _ in request.stream():
                    pass
                own_body = b""
            else:
                own_body = await request.body()
        except ClientDisconnect:
            logger.debug("client disconnected before its request body was read")
            return _ClientClosedResponse()
        except RuntimeError:  # the endpoint streamed the body itself: it was read
            if body is None and not bodiless:
                raise
            own_body = b""
        try:
            body = respelled(own_body if body is None else body)  # camelCase goes out (DESIGN §4)
        except AmbiguousSpellingError as exc:  # as the version layer refuses it on /v1
            return error_response(400, exc.message)
        extra: dict[str, str] = {}
        request_id = request.headers.get("x-request-id")
        if request_id and len(request_id) <= _REQUEST_ID_MAX and request_id.isprintable():
            extra["x-request-id"] = request_id
        content = None if bodiless else body
        return await self._exchange(method, target, query, content, extra, receive=request.receive)

    def _pick_key(self) -> str | None:
        if not self._keys:
            return None
        key = self._keys[self._next_key % len(self._keys)]
        self._next_key = (self._next_key + 1) % len(self._keys)
        return key

    async def _exchange(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        body: bytes | None,
        extra_headers: Mapping[str, str],
        *,
        receive: Receive | None = None,
    ) -> Response:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        problem = _path_problem(path)
        if problem is not None:
            # The path is not logged: it is the client's, control characters included.
            logger.info("upstream %s: refused a path with %s", method, problem)
            return _invalid_path_response(problem)
        headers = dict(extra_headers)
        if body is not None:
            headers["content-type"] = "application/json"
        key = self._pick_key()
        if key is not None:
            headers["x-goog-api-key"] = key
        model = _model_id(path)
        with tracing.span("gemini_scale.upstream", kind="CLIENT", **{
            "http.request.method": method, "gen_ai.request.model": _model_label(model, False),
        }):
            tracing.inject(headers)  # W3C traceparent, when tracing is on
            return await self._send(
                method, path, query, body, headers=headers, model=model, receive=receive
            )

    async def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        body: bytes | None,
        *,
        headers: dict[str, str],
        model: str | None,
        receive: Receive | None,
    ) -> Response:
        started = time.monotonic()
        if self._client.is_closed:
            logger.warning("upstream %s %s: client closed", method, path)
            _record(_model_label(model, False), None, 0.0, "unavailable")
            return UpstreamUnavailableError().response()
        try:
            outgoing = self._client.build_request(
                method, self._base_url + path, params=list(query), content=body, headers=headers
            )
        except (httpx.InvalidURL, UnicodeError):  # too long, or not encodable
            logger.info("upstream %s: refused a path httpx cannot send", method)
            return _invalid_path_response("characters that cannot be sent")
        try:
            upstream = await self._send_unless_gone(outgoing, receive)
        except httpx.TransportError as exc:
            elapsed = time.monotonic() - started
            logger.warning(
                "upstream %s %s failed after %.3fs: %s",
                method, path, elapsed, type(exc).__name__,
            )
            response = _failure_response(exc)
            _record(_model_label(model, False), None, elapsed,
                    "timeout" if response.status_code == 504 else "unavailable")
            return response
        elapsed = time.monotonic() - started
        if upstream is None:
            logger.debug(
                "upstream %s %s cancelled after %.3fs: the client left", method, path, elapsed
            )
            return _ClientClosedResponse()
        status = upstream.status_code
        logger.debug("upstream %s %s -> %d in %.3fs", method, path, status, elapsed)
        if 200 <= status < 300:
            label = _model_label(model, True)
            _record(label, status, elapsed, None)
            try:
                return self._relay_response(upstream, label)
            except BaseException:  # the answer is not relayed: its connection goes back
                await upstream.aclose()
                raise
        error = "status_4xx" if status < 500 else "status_5xx"
        _record(_model_label(model, False), status, elapsed, error)
        return await self._error_response(upstream, method, path)

    async def _send_unless_gone(
        self, outgoing: httpx.Request, receive: Receive | None
    ) -> httpx.Response | None:
        """The upstream's answer (still streaming), or None when the client left before it
        started: then the upstream call is cancelled (``receive`` None: nothing to watch)."""
        if receive is None:
            return await self._client.send(outgoing, stream=True)
        gone = False
        upstream: httpx.Response | None = None
        failure: Exception | None = None

        async def watch(cancel: anyio.CancelScope) -> None:
            nonlocal gone
            if await _client_left(receive):
                gone = True
                cancel.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            try:
                upstream = await self._client.send(outgoing, stream=True)
            except Exception as exc:  # raised below, not as an ExceptionGroup
                failure = exc
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if gone and upstream is not None:  # both at once: the client is gone all the same
            await upstream.aclose()
            return None
        return upstream

    @staticmethod
    def _relay_response(upstream: httpx.Response, model: str) -> UpstreamResponse:
        content_type = upstream.headers.get("content-type", "")
        event_stream = content_type.split(";")[0].strip().lower() == "text/event-stream"
        # The bytes as they came (httpx decodes values as UTF-8 when they are: not every
        # such value encodes back to Latin-1, which ASGI headers are).
        received = upstream.headers.raw
        raw = [
            (name, value)
            for name in _RELAYED_RESPONSE_HEADERS
            for found, value in received
            if found.lower() == name
        ]
        encoding = upstream.headers.get("content-encoding", "identity").strip().lower()
        length = upstream.headers.get("content-length")
        # aiter_bytes() undoes any content-encoding the upstream applied despite our
        # "identity", so a length is only still true for an unencoded body.
        if length is not None and not event_stream and encoding == "identity":
            raw.append((b"content-length", length.encode("latin-1")))
        response = UpstreamResponse(upstream, headers=raw, event_stream=event_stream)
        response.model = model
        return response

    @staticmethod
    async def _error_response(upstream: httpx.Response, method: str, path: str) -> Response:
        status = upstream.status_code
        try:
            body = await _read_limited(upstream, _MAX_ERROR_BODY)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            logger.warning(
                "upstream %s %s -> %d, then the body failed: %s",
                method, path, status, type(exc).__name__,
            )
            return _failure_response(exc)
        finally:
            await upstream.aclose()
        retry_after = _retry_after_value(upstream.headers.get("retry-after"))
        extra = {"retry-after": retry_after} if retry_after else {}
        if status < 400:
            logger.warning("upstream %s %s answered an unexpected %d", method, path, status)
            return UpstreamUnavailableError(
                f"The upstream Gemini API answered an unexpected {status} {reason_phrase(status)}."
            ).response()
        found = _google_envelope(body) if body is not None else None
        if found is None:
            logger.warning(
                "upstream %s %s -> %d without Google's error envelope", method, path, status
            )
            return error_response(
                status,
                f"The upstream Gemini API answered {status} {reason_phrase(status)}.",
                headers=extra,
            )
        envelope, error = found
        logger.info("upstream %s %s -> %d", method, path, status)
        if "retry-after" not in extra:
            delay = _retry_delay(error)
            if delay is not None:
                extra["retry-after"] = delay
        response = Response(envelope, status_code=status, media_type=ERROR_CONTENT_TYPE)
        response.headers["cache-control"] = "no-store"
        for name, value in extra.items():
            response.headers[name] = value
        return response


def _retry_after_value(value: str | None) -> str | None:
    """An upstream ``Retry-After`` worth relaying: delay-seconds or an HTTP-date (RFC 9110
    §10.2.3); anything else is dropped (then ``RetryInfo`` may say when)."""
    if value is None:
        return None
    value = value.strip()
    if 0 < len(value) <= 10 and value.isascii() and value.isdigit():
        return value
    if value.isprintable() and http_date(value) is not None:
        return value
    return None


_MODEL_IN_PATH: Final = re.compile(r"/models/([^/:]+)")
_MODELS: Final = BoundedLabel(100)


def _model_id(path: str) -> str | None:
    found = _MODEL_IN_PATH.search(path)
    return found.group(1) if found else None


def _model_label(model: str | None, answered: bool) -> str:
    """The label value of ``model``: only a call the upstream answered (2xx) admits a model
    id to the bound, so made-up ids (404s) cannot use it up."""
    if model is None:
        return "(none)"
    return _MODELS(model) if answered else _MODELS.known(model)


def _record(model: str, status: int | None, seconds: float, error: str | None) -> None:
    """The upstream metrics of one call (docs/operations/metrics.md)."""
    fams = families()
    if status is not None:
        fams.upstream_duration.labels(model, str(status)).observe(seconds)
    if error is not None:
        fams.upstream_errors.labels(model, error).inc()


async def _read_limited(response: httpx.Response, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
