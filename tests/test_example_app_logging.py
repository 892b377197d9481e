"""The example gateway started the programmatic way (``import example_app.main`` and then
``uvicorn.run(app)``, whose logging set-up runs after the import) never logs a client's
``?key=``: uvicorn's access records, which hold the raw query string, stay dropped."""

from __future__ import annotations

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


def test_uvicorn_run_after_import_logs_no_query_string_key() -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "GEMINI_SCALE_DEV_ISSUER": "1",
        "GEMINI_SCALE_ACCESS_LOG": "1",
        "GEMINI_SCALE_LOG_LEVEL": "INFO",
    }
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
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
            assert client.get("/healthz", params={"key": SECRET}).status_code == 200
            assert client.get("/v1beta/models", params={"key": SECRET}).status_code == 401
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly, flushing its output
        try:
            output, _ = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    text = output.decode(errors="replace")
    assert "Application startup complete" in text  # uvicorn's own logging is on
    assert '"GET /healthz 200"' in text  # and so is the gateway's access record
    assert SECRET not in text
