"""Exception handlers that render every app-level error in Google's envelope."""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gemini_scale.errors import HTTPError, error_response, reason_phrase
from gemini_scale.routing import client_path

logger = logging.getLogger("gemini_scale.errors")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return exc.response()


async def _starlette_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code < 400:  # only errors reach here in practice; keep redirects intact
        return Response(status_code=exc.status_code, headers=exc.headers)
    message = exc.detail if isinstance(exc.detail, str) else reason_phrase(exc.status_code)
    if exc.status_code == 404:
        message = f"Method not found: {request.method} {client_path(request.scope)[:200]}."
    return error_response(exc.status_code, message, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors: list[Any] = getattr(exc, "errors", list)()
    violations = [
        {
            "field": ".".join(str(p) for p in error.get("loc", ()) if p != "body"),
            "description": str(error.get("msg", "invalid")),
        }
        for error in errors[:20]
    ]
    in_body = not errors or any(tuple(error.get("loc", ()))[:1] == ("body",) for error in errors)
    return error_response(
        400,
        # A query or path parameter is not the payload: Google names the value instead.
        "Invalid JSON payload received." if in_body
        else f"Invalid value at '{violations[0]['field'][:100]}'.",
        details=[
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
        ],
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "An internal error has occurred.")


def install_error_handlers(app: Starlette) -> None:
    """Make ``app`` answer every error (404s, validation, ``HTTPError``, crashes) in
    Google's envelope with ``Cache-Control: no-store``, never with a traceback."""
    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(HTTPException, _starlette_http_exception)
    app.add_exception_handler(Exception, _unexpected)
    try:
        from fastapi.exceptions import RequestValidationError
    except ImportError:
        return
    app.add_exception_handler(RequestValidationError, _validation_error)
