"""Structured logs: one access record per request, JSON or ``key=value`` lines.

The access record holds what an operator needs to follow one request (its id, who made it,
which route and model, what the layers decided, tokens, timing) and nothing that must never
reach a log: no bearer token, API key, query string or prompt text. Fields are attached to
the record as ``record.access``; :class:`JSONFormatter` renders them (and any other
``extra`` fields) as one JSON object per line.

Every other record emitted while ``MetricsMiddleware`` handles a request (and the record of
an exception that escaped from one) can carry the request's id too: :class:`RequestIdFilter`
adds it as ``record.request_id`` (``configure_logging`` installs it on its handler).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Final, Literal

__all__ = [
    "ACCESS_LOGGER",
    "JSONFormatter",
    "KeyValueFormatter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
]

#: The logger access records go to (INFO).
ACCESS_LOGGER: Final = "gemini_scale.access"

#: ``LogRecord`` attributes that are not ``extra`` fields.
_STANDARD: Final = frozenset(
    {*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime", "taskName",
     "color_message"}  # uvicorn's copy of the message with terminal colours
)


#: The id of the request being handled (set by ``MetricsMiddleware``), as sent (bytes).
REQUEST_ID: Final[ContextVar[bytes | None]] = ContextVar("gemini_scale_request_id", default=None)


#: The attribute holding the id of the request an exception escaped from.
_EXC_REQUEST_ID: Final = "gemini_scale_request_id"


def tag_exception(exc: BaseException, request_id: bytes) -> None:
    """Note on ``exc`` the request it escaped from: the layer that logs it (the framework's
    error handler, the server) runs after the request's context is gone."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _EXC_REQUEST_ID, request_id)


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    found = REQUEST_ID.get()
    return found.decode("latin-1") if found is not None else None


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the id of the request being handled) to every record it sees;
    outside a request it sets ``default``, or nothing when that is ``None``. A record that
    already has a ``request_id`` keeps it. Install it on a handler, so records of every
    logger get it."""

    def __init__(self, default: str | None = None) -> None:
        super().__init__()
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            found = REQUEST_ID.get()
            if found is None and record.exc_info:
                found = getattr(record.exc_info[1], _EXC_REQUEST_ID, None)
            if found is not None:
                record.request_id = found.decode("latin-1")
            elif self.default is not None:
                record.request_id = self.default
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname,
        "logger": record.name,
        "message": record.getMessage(),
    }
    for name, value in vars(record).items():
        if name not in _STANDARD and not name.startswith("_"):
            if isinstance(value, Mapping) and name == "access":
                fields.update(value)
            else:
                fields[name] = value
    if record.exc_info:
        fields["exception"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the ``extra`` fields
    (an access record's fields at the top level)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, separators=(",", ":"))


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...`` lines, for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        head = " ".join(str(fields.pop(k)) for k in ("time", "level", "logger", "message"))
        rest = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return f"{head} {rest}" if rest else head


def configure_logging(
    level: str | int = "INFO", fmt: Literal["json", "text"] = "json"
) -> logging.Handler:
    """Send every log record (access records included) to stderr at ``level``, as JSON or
    text, each with the ``request_id`` of the request it was emitted in (if any); returns the
    handler installed on the root logger (replacing one installed by an earlier call).

    httpx's own records are kept to warnings: it logs every request it sends, URL and query
    included, at INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(RequestIdFilter())
    handler.set_name("gemini_scale")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "gemini_scale"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return handler
