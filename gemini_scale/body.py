"""Request-body hygiene: JSON only, size-capped, parsed once and shared with later layers."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from mypy_extensions import mypyc_attr

from gemini_scale import fastjson
from gemini_scale.errors import send_error
from gemini_scale.routing import (
    CONTEXT_KEY,
    GeminiMiddleware,
    RequestContext,
    message_dict,
    route_path,
)
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

#: ``RequestContext.extras`` key of the raw request body (bytes).
BODY_KEY = "body"
#: ``RequestContext.extras`` key of the parsed JSON body.
JSON_KEY = "json"
#: ``RequestContext.extras`` key of the size of the body as the client sent it, when an outer
#: layer replaced it (the version layer, migrating it up): the size cap applies to that.
CLIENT_BODY_BYTES_KEY = "client_body_bytes"

_DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyRefusedError(Exception):
    """The request body cannot be accepted (status ``code``, Google-style ``message``)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_json_content_type(content_type: bytes | None) -> bool:
    """Whether a ``Content-Type`` value names JSON (``application/json``, ``*/*+json``)."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


@mypyc_attr(allow_interpreted_subclasses=True)
class JSONBodyMiddleware(GeminiMiddleware):
    """Refuse bad request bodies before anything expensive runs, in Google's envelope.

    For the ``methods`` given, under the ``path_prefixes`` given: a body that is not
    ``application/json`` is 415, one over ``max_body_bytes`` is 413 (checked against
    ``Content-Length`` first, then while reading), one that is not a JSON object is 400.
    The parsed body is kept in the request context for later layers (cache keys, token
    estimates) and replayed to the app unchanged.

    Options:
        max_body_bytes: largest accepted body (default 20 MiB, Gemini's inline-data cap).
        methods: methods whose bodies are checked (default POST, PUT, PATCH).
        path_prefixes: only paths starting with one of these are checked (default: all).
    """

    span_name = "gemini_scale.body"

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = 20 * 1024 * 1024,
        methods: Collection[str] = _DEFAULT_METHODS,
        path_prefixes: Collection[str] = ("/",),
    ) -> None:
        super().__init__(app)
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.max_body_bytes = max_body_bytes
        self.methods = frozenset(m.upper() for m in methods)
        self.path_prefixes = tuple(path_prefixes)

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        path = route_path(scope)
        if scope["method"] not in self.methods or not path.startswith(self.path_prefixes):
            await self.app(scope, receive, send)
            return
        try:
            receive = await load_json_body(scope, receive, context, self.max_body_bytes)
        except BodyRefusedError as refused:
            await send_error(send, refused.code, refused.message)
            return
        await self.app(scope, receive, send)


async def load_json_body(
    scope: Scope, receive: Receive, context: RequestContext, max_body_bytes: int
) -> Receive:
    """Read, check and parse the body once per request: the raw bytes go to
    ``context.extras["body"]``, the parsed object to ``context.extras["json"]``, and the
    returned ``receive`` replays the body to the app. Later callers reuse the first result.

    Raises :class:`BodyRefusedError` (413, 415, 400) for a body that cannot be accepted.
    """
    if BODY_KEY in context.extras:
        return receive  # an outer layer read it and already replays it
    body = b""
    if not _declares_empty_json(scope, max_body_bytes):
        message = await receive()
        whole = _whole_body(scope, message, max_body_bytes)  # the usual case: no coroutine
        body = whole if whole is not None else await _rest_of_body(
            message, receive, max_body_bytes
        )
    if body and JSON_KEY in context.extras and context.extras.get(BODY_KEY) == body:
        # An outer layer (the version layer, migrating the body as it was read just now)
        # parsed these very bytes on their way here and left the result: no second parse.
        return replay_receive(body, receive)
    context.extras[BODY_KEY] = body
    if body:
        try:
            parsed: Any = fastjson.loads(body)
        except (ValueError, RecursionError):
            raise BodyRefusedError(
                400, "Invalid JSON payload received. Malformed JSON body."
            ) from None
        if not isinstance(parsed, dict):
            raise BodyRefusedError(
                400, "Invalid JSON payload received. The body must be a JSON object."
            )
        context.extras[JSON_KEY] = parsed
    return replay_receive(body, receive)


def _whole_body(scope: Scope, message: Message, max_body_bytes: int) -> bytes | None:
    """The body when ``message``, the first, holds all of it (the usual case), else ``None``."""
    got = message_dict(message)
    kind: str = got["type"]
    if kind != "http.request" or got.get("more_body", False):
        return None
    body = got.get("body", b"")
    if len(body) > max_body_bytes and not _migrated_within(scope, body, max_body_bytes):
        raise BodyRefusedError(
            413, f"Request payload size exceeds the limit: {max_body_bytes} bytes."
        )
    return body if type(body) is bytes else bytes(body)  # (calling bytes() costs more)


async def _rest_of_body(message: Message, receive: Receive, max_body_bytes: int) -> bytes:
    """A body that comes in several messages, ``message`` the first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise BodyRefusedError(400, "The client disconnected while sending the body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body_bytes:
            raise BodyRefusedError(
                413, f"Request payload size exceeds the limit: {max_body_bytes} bytes."
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _migrated_within(scope: Scope, body: bytes, max_body_bytes: int) -> bool:
    """Whether ``body`` is an outer layer's migration of a body the client sent within
    ``max_body_bytes``, lengthened by re-encoding (``1e15`` is written out in full) by at
    most an eighth of the cap (or 4 KiB): a body of nothing but such numbers would grow
    fourfold, and stays refused."""
    context = scope.get(CONTEXT_KEY)
    if not isinstance(context, RequestContext):
        return False
    extras = context.extras
    sent = extras.get(CLIENT_BODY_BYTES_KEY)
    return (
        extras.get(BODY_KEY) is body
        and type(sent) is int
        and sent <= max_body_bytes
        and len(body) <= max_body_bytes + max(max_body_bytes // 8, 4096)
    )


def _declares_empty_json(scope: Scope, max_body_bytes: int) -> bool:
    """Check the ``Content-Length`` and ``Content-Type`` headers (one pass over the headers):
    whether the body is declared empty; :class:`BodyRefusedError` when it cannot be accepted."""
    declared = content_type = None
    for pair in scope["headers"]:
        # Indexed, not unpacked: compiled, unpacking an untyped pair iterates over it.
        name: bytes = pair[0]  # (typed: compared directly)
        if name == b"content-length":
            if declared is None:
                declared = pair[1]
        elif name == b"content-type" and content_type is None:
            content_type = pair[1]
    if declared is not None:
        try:
            length = _content_length(declared)
        except ValueError:
            raise BodyRefusedError(400, "Invalid Content-Length header.") from None
        if length > max_body_bytes:
            raise BodyRefusedError(
                413, f"Request payload size exceeds the limit: {max_body_bytes} bytes."
            )
        if length == 0:
            return True
    if content_type != b"application/json" and not is_json_content_type(
        None if content_type is None else bytes(content_type)
    ):
        raise BodyRefusedError(
            415, "Unsupported Content-Type: the request body must be application/json."
        )
    return False


def _content_length(value: bytes) -> int:
    """``int(value)``: a short run of ASCII digits, the usual value, is read directly
    (compiled, a loop over a few bytes costs a tenth of calling ``int``)."""
    if 0 < len(value) <= 18:
        length = 0
        for byte in value:
            if byte < 0x30 or byte > 0x39:
                return int(value)
            length = length * 10 + (byte - 0x30)
        return length
    return int(value)


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
