"""No log record ever holds a bearer token, an API key or prompt text; records render as
JSON or key=value lines."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from example_app.standin import create_standin
from gemini_scale import APIKeys, MetricsMiddleware
from gemini_scale.observability import (
    JSONFormatter,
    KeyValueFormatter,
    RequestIdFilter,
    configure_logging,
)
from tests.cache.support import call
from tests.gateway import build, running

PROMPT = "the secret recipe for zebra-striped pancakes 4417"
API_KEY = "client-api-key-7d1e9b3c5a2f4068"


async def test_no_record_holds_a_token_a_key_or_the_prompt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {
        "GEMINI_SCALE_CLIENT_API_KEYS":
            f"{APIKeys.hash_key(API_KEY)}=batch:gemini.generate gemini.read",
        "GEMINI_SCALE_RATE_LIMIT": "3/minute",
    }
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    app = build(env, standin=create_standin(), registry=CollectorRegistry())
    async with running(app) as client:
        token = client.headers["authorization"].removeprefix("Bearer ")
        for path in ("generateContent", "countTokens", "streamGenerateContent", "generateContent",
                     "generateContent"):  # success, count, stream, then 429s
            await client.post(f"/v1/models/gemini-2.5-flash:{path}", json=body,
                              params={"key": "query-key-should-not-log"})
        await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body,
                          headers={"authorization": "", "x-goog-api-key": API_KEY})
        await client.post("/v1beta/models/gemini-2.5-flash:generateContent", json=body,
                          headers={"authorization": "Bearer not.a.valid-token-xyz"})
        await client.post("/v1beta/models/no-such:generateContent", json=body)
    assert any(r.name == "gemini_scale.access" for r in caplog.records)
    secrets = (token, API_KEY, PROMPT, "zebra-striped", "not.a.valid-token-xyz",
               "query-key-should-not-log")
    json_formatter, text_formatter = JSONFormatter(), KeyValueFormatter()
    # The test's own HTTP client logs the URLs it calls (query key included): not ours.
    ours = [r for r in caplog.records if "http://gateway" not in r.getMessage()]
    assert len(ours) > 10
    for record in ours:
        for rendered in (json_formatter.format(record), text_formatter.format(record),
                         repr(record.__dict__)):
            for secret in secrets:
                assert secret not in rendered, (record.name, secret)


def test_json_and_text_formats() -> None:
    record = logging.LogRecord("gemini_scale.access", logging.INFO, __file__, 1,
                               "%s %s", ("GET", "/x"), None)
    record.access = {"request_id": "abc", "status": 200}
    line = json.loads(JSONFormatter().format(record))
    assert line["message"] == "GET /x"
    assert line["request_id"] == "abc"
    assert line["status"] == 200
    assert line["level"] == "INFO"
    text = KeyValueFormatter().format(record)
    assert 'request_id="abc"' in text
    assert "status=200" in text


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        first = configure_logging("debug", "text")
        second = configure_logging("WARNING", "json")
        assert first not in root.handlers
        assert second in root.handlers
        assert root.level == logging.WARNING
        assert isinstance(second.formatter, JSONFormatter)
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)


async def test_every_record_of_a_request_carries_its_id() -> None:
    """Records logged inside the request, and the error record an outer layer writes for an
    exception that escaped from it, carry the request's id; records outside carry none."""
    app_logger = logging.getLogger("tests.observability.app")

    async def logs(request: Request) -> Response:
        app_logger.warning("inside the request")
        return JSONResponse({})

    async def boom(request: Request) -> Response:
        raise RuntimeError("the app failed")

    async def outer_handler(request: Request, exc: Exception) -> Response:
        app_logger.error("unhandled error", exc_info=exc)  # outside MetricsMiddleware
        return JSONResponse({}, status_code=500)

    app = Starlette(
        routes=[Route("/logs", logs), Route("/boom", boom)],
        middleware=[Middleware(MetricsMiddleware, registry=CollectorRegistry())],
        exception_handlers={Exception: outer_handler},
    )
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    handler = configure_logging("INFO", "json")
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        ids = [(await call(app, "GET", "/logs")).headers["x-request-id"]]
        with pytest.raises(RuntimeError):  # answered, then re-raised for the server
            await call(app, "GET", "/boom")
        app_logger.warning("outside any request")
    finally:
        for added in [h for h in root.handlers if h not in before]:
            root.removeHandler(added)
        root.setLevel(level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    ids.append(next(line["request_id"] for line in lines if line["message"] == "GET /boom 500"))
    seen = [(line["message"], line.get("request_id")) for line in lines
            if line["logger"] in ("tests.observability.app", "gemini_scale.access")]
    assert seen == [
        ("inside the request", ids[0]), ("GET /logs 200", ids[0]),
        ("GET /boom 500", ids[1]), ("unhandled error", ids[1]),
        ("outside any request", None),
    ]


def test_the_filter_for_your_own_logging_configuration() -> None:
    from gemini_scale.observability.logs import REQUEST_ID

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    RequestIdFilter(default="-").filter(record)
    assert record.__dict__["request_id"] == "-"
    token = REQUEST_ID.set(b"abc123")
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        assert RequestIdFilter().filter(record)
        assert logging.Formatter("%(request_id)s %(message)s").format(record) == "abc123 m"
    finally:
        REQUEST_ID.reset(token)
