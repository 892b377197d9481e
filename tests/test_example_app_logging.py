"""The example gateway's logs under a real uvicorn. Started the programmatic way (``import
example_app.main`` and then ``uvicorn.run(app)``, whose logging set-up runs after the
import) it never logs a client's ``?key=``: uvicorn's access records, which hold the raw
query string, stay dropped. Started the documented way, every line is one JSON record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.gateway import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "AIzaSyNEVER-IN-THE-LOGS-4711"
#: What the repro does: the app imported first, uvicorn (and its dictConfig) afterwards.
SERVER = """
import sys
from example_app.main import app
import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="on")
"""


def _serve(command: list[str], paths: list[str], authorized: tuple[str, ...] = ()) -> str:
    """Start the gateway with ``command`` (a port is appended), request ``paths`` once it
    answers (and ``authorized`` with a dev token), stop it with SIGINT and return everything
    it printed."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "GEMINI_SCALE_DEV_ISSUER": "1",
        "GEMINI_SCALE_ACCESS_LOG": "1",
        "GEMINI_SCALE_LOG_LEVEL": "INFO",
        "GEMINI_SCALE_LOG_FORMAT": "json",
    }
    server = subprocess.Popen(
        [*command, str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, "the gateway exited during start-up"
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not start in 20 s"
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=5) as client:
            for path in paths:
                client.get(path)
            if authorized:
                token = client.post("/dev/token", json={"scope": "gemini.read"})
                bearer = {"authorization": f"Bearer {token.json()['access_token']}"}
                for path in authorized:
                    client.get(path, headers=bearer)
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly, flushing its output
        try:
            output, _ = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    return output.decode(errors="replace")


def test_uvicorn_run_after_import_logs_no_query_string_key() -> None:
    text = _serve([sys.executable, "-c", SERVER],
                  [f"/healthz?key={SECRET}", f"/v1beta/models?key={SECRET}"])
    assert "Application startup complete" in text  # uvicorn's own logging is on
    assert '"GET /healthz 200"' in text  # and so is the gateway's access record
    assert SECRET not in text


def test_the_upstream_call_is_not_logged_with_its_query() -> None:
    """httpx logs each request it sends, URL and query included, at INFO."""
    text = _serve([sys.executable, "-c", SERVER], [],
                  authorized=(f"/v1beta/models?pageToken={SECRET}",))
    assert '"GET /v1beta/models 400"' in text  # the stand-in refused the page token
    assert SECRET not in text


def test_under_the_uvicorn_command_every_line_is_one_json_record() -> None:
    command = [sys.executable, "-m", "uvicorn", "example_app.main:app", "--no-proxy-headers",
               "--port"]
    lines = _serve(command, ["/healthz", "/no-such-route"]).splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # raises on any other
    loggers = {record["logger"] for record in records}
    assert {"uvicorn.error", "gemini_scale.access"} <= loggers
    assert any(r["message"] == "Application startup complete." for r in records)
    assert all("color_message" not in r for r in records)
