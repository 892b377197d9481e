"""``uvicorn example_app.main:app``: the gateway configured from the environment."""

from __future__ import annotations

import logging
import sys

from fastapi import FastAPI

from example_app.app import create_app
from gemini_scale import ConfigurationError, configure_logging, load_settings


def _from_environment() -> FastAPI:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        # The gateway writes its own access record (gemini_scale.access); uvicorn's would
        # repeat it with the raw query string, where a client's ?key= would be logged.
        logging.getLogger("uvicorn.access").disabled = True
        return create_app(settings)
    except ConfigurationError as exc:
        # A clear one-line reason instead of an import traceback.
        sys.stderr.write(f"gemini-scale example gateway cannot start: {exc}\n")
        raise SystemExit(2) from None


app = _from_environment()
