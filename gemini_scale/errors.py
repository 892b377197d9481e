"""Google ``google.rpc.Status`` error responses and the library's exception tree.

Every refusal our middlewares produce goes through :func:`error_response` (or
:func:`send_error` from pure ASGI code), so the body shape, the status names and the
``Cache-Control: no-store`` header are decided in one place (DESIGN.md §4).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from starlette.responses import Response

from gemini_scale.types import Send

#: HTTP status -> canonical ``google.rpc.Code`` name, as Google's APIs use them.
CANONICAL_STATUS: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    411: "INVALID_ARGUMENT",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

ERROR_CONTENT_TYPE = "application/json; charset=UTF-8"


def canonical_status(code: int) -> str:
    """The ``google.rpc.Code`` name for an HTTP status (``UNKNOWN`` when Google has none)."""
    if code in CANONICAL_STATUS:
        return CANONICAL_STATUS[code]
    if 400 <= code < 500:
        return "FAILED_PRECONDITION"
    return "UNKNOWN"


def error_body(
    code: int,
    message: str,
    *,
    status: str | None = None,
    details: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """Serialize Google's envelope: ``{"error": {"code", "message", "status", "details"}}``."""
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "status": status or canonical_status(code),
    }
    if details:
        error["details"] = [dict(d) for d in details]
    return json.dumps({"error": error}, indent=2).encode()


def error_headers(
    body: bytes, headers: Mapping[str, str] | None = None
) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers for an error body: JSON, ``no-store``, exact length, plus ``headers``."""
    raw = [
        (b"content-type", ERROR_CONTENT_TYPE.encode()),
        (b"cache-control", b"no-store"),
        (b"content-length", str(len(body)).encode()),
    ]
    for name, value in (headers or {}).items():
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return raw


def error_response(
    code: int,
    message: str,
    *,
    status: str | None = None,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A Starlette :class:`~starlette.responses.Response` carrying Google's error envelope."""
    body = error_body(code, message, status=status, details=details)
    response = Response(body, status_code=code, media_type=ERROR_CONTENT_TYPE)
    response.headers["cache-control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


async def send_error(
    send: Send,
    code: int,
    message: str,
    *,
    status: str | None = None,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> None:
    """Send Google's error envelope from pure ASGI code (``http.response.start`` and body)."""
    body = error_body(code, message, status=status, details=details)
    await send(
        {"type": "http.response.start", "status": code, "headers": error_headers(body, headers)}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bad_request_detail(violations: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A ``google.rpc.BadRequest`` detail from ``(field, description)`` pairs."""
    return {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [
            {"field": field, "description": description} if field else {"description": description}
            for field, description in violations
        ],
    }


class GeminiScaleError(Exception):
    """Root of every exception this library raises."""


class ConfigurationError(GeminiScaleError, ValueError):
    """A component was built or configured wrongly; raised at construction or start-up."""


class PolicyNotEnforcedError(ConfigurationError):
    """A route declares a policy that no middleware in its stack enforces."""


class StoreError(GeminiScaleError):
    """A store operation failed; the outcome of a write is unknown (it may have applied)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (connection refused, timed out, circuit open)."""


class HTTPError(GeminiScaleError):
    """An error that has a place on the wire: HTTP status, Google status name and details.

    Raising one from an endpoint (with :func:`gemini_scale.install_error_handlers`) or from
    library code that a middleware catches yields Google's envelope with this status.
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: str | None = None,
        details: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or canonical_status(code)
        self.details = tuple(details)
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """This error as a Starlette response in Google's envelope."""
        return error_response(
            self.code, self.message, status=self.status, details=self.details, headers=self.headers
        )

    async def send(self, send: Send) -> None:
        """Send this error from pure ASGI code."""
        await send_error(
            send,
            self.code,
            self.message,
            status=self.status,
            details=self.details,
            headers=self.headers,
        )


class InvalidArgumentError(HTTPError):
    """400 ``INVALID_ARGUMENT``: the request is malformed."""

    def __init__(self, message: str, *, details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(400, message, details=details)


class PayloadTooLargeError(HTTPError):
    """413 ``INVALID_ARGUMENT``: the request body exceeds the configured cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request payload size exceeds the limit: {limit} bytes.")
        self.limit = limit


class UnsupportedMediaTypeError(HTTPError):
    """415 ``INVALID_ARGUMENT``: the body is not ``application/json``."""

    def __init__(self, content_type: str | None) -> None:
        shown = (content_type or "none")[:64]
        super().__init__(
            415, f"Unsupported Content-Type {shown!r}: the body must be application/json."
        )


class NotFoundError(HTTPError):
    """404 ``NOT_FOUND``."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)


class UpstreamError(HTTPError):
    """The upstream Gemini API failed or answered an error; carries what the client sees."""


class UpstreamUnavailableError(UpstreamError):
    """503 ``UNAVAILABLE``: the upstream could not be reached."""

    def __init__(self, message: str = "The upstream Gemini API is unavailable.") -> None:
        super().__init__(503, message, headers={"retry-after": "1"})


class UpstreamTimeoutError(UpstreamError):
    """504 ``DEADLINE_EXCEEDED``: the upstream did not answer in time."""

    def __init__(self, message: str = "The upstream Gemini API did not answer in time.") -> None:
        super().__init__(504, message)


def reason_phrase(code: int) -> str:
    """The standard reason phrase of an HTTP status, for messages."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"
