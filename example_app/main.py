"""``uvicorn example_app.main:app``: the gateway configured from the environment."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from example_app.app import create_app
from gemini_scale import ConfigurationError, configure_logging, load_settings


class DropAccessRecords(logging.Filter):
    """Drops every record of the logger it is on (installed on ``uvicorn.access``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def silence_uvicorn_access_log() -> None:
    """Drop uvicorn's access records: the gateway writes its own (``gemini_scale.access``),
    while uvicorn's hold the raw query string, where a client's ``?key=`` would be logged.

    A filter, not ``disabled``: uvicorn's ``dictConfig`` (run when ``uvicorn.run(app)`` is
    called after this import) re-enables the loggers it configures and replaces their
    handlers, but keeps their filters.
    """
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, DropAccessRecords) for f in access.filters):
        access.addFilter(DropAccessRecords())


def route_uvicorn_logs() -> None:
    """Send uvicorn's own records (start-up, errors) through the handler ``configure_logging``
    installed, so the output is one format (under ``uvicorn example_app.main:app``; a
    ``uvicorn.run(app)`` after this import configures its loggers again)."""
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _from_environment() -> FastAPI:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        silence_uvicorn_access_log()
        route_uvicorn_logs()
        return create_app(settings)
    except ConfigurationError as exc:
        # A clear one-line reason instead of an import traceback.
        sys.stderr.write(f"gemini-scale example gateway cannot start: {exc}\n")
        raise SystemExit(2) from None


app = _from_environment()
