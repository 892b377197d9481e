"""Request-body hygiene: JSON only, size-capped, parsed once and shared with later layers."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from gemini_scale.errors import send_error
from gemini_scale.routing import GeminiMiddleware, RequestContext
from gemini_scale.types import ASGIApp, Message, Receive, Scope, Send

#: ``RequestContext.extras`` key of the raw request body (bytes).
BODY_KEY = "body"
#: ``RequestContext.extras`` key of the parsed JSON body.
JSON_KEY = "json"

_DEFAULT_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _BodyRefusedError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


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
        if scope["method"] not in self.methods or not scope["path"].startswith(self.path_prefixes):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except _BodyRefusedError as refused:
            await send_error(send, refused.code, refused.message)
            return
        context.extras[BODY_KEY] = body
        if body:
            try:
                parsed: Any = json.loads(body)
            except (ValueError, RecursionError):
                await send_error(send, 400, "Invalid JSON payload received. Malformed JSON body.")
                return
            if not isinstance(parsed, dict):
                await send_error(
                    send, 400, "Invalid JSON payload received. The body must be a JSON object."
                )
                return
            context.extras[JSON_KEY] = parsed
        await self.app(scope, replay_receive(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise _BodyRefusedError(400, "Invalid Content-Length header.") from None
            if length > self.max_body_bytes:
                raise _BodyRefusedError(
                    413, f"Request payload size exceeds the limit: {self.max_body_bytes} bytes."
                )
            if length == 0:
                return b""
        if not _is_json(_header(scope, b"content-type")):
            raise _BodyRefusedError(
                415, "Unsupported Content-Type: the request body must be application/json."
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _BodyRefusedError(400, "The client disconnected while sending the body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyRefusedError(
                    413, f"Request payload size exceeds the limit: {self.max_body_bytes} bytes."
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


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
