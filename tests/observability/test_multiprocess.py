"""``/metrics`` of a gateway with several uvicorn workers (prometheus-client's multiprocess
mode): every scrape, whichever worker answers it, holds every worker's counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]


def _count(text: str, route: str, status: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "http_server_request_duration_seconds":
            continue
        for sample in family.samples:
            if (sample.name.endswith("_count") and sample.labels.get("http_route") == route
                    and sample.labels.get("http_response_status_code") == status):
                total += sample.value
    return total


def _pids(directory: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[-1] for p in directory.glob("*.db")}


def test_every_scrape_sums_every_worker(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMINI_SCALE_")}
    env.update({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GEMINI_SCALE_DEV_ISSUER": "1",
                "GEMINI_SCALE_ACCESS_LOG": "0"})
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example_app.main:app", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2", "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        # Requests on new connections until both workers have answered some (each worker
        # writes its values to files named after its pid).
        sent = 0
        with httpx.Client(base_url=base, timeout=5) as client:
            while sent < 40 or (len(_pids(metrics_dir)) < 2 and sent < 400):
                with httpx.Client(base_url=base, timeout=5) as fresh:
                    response = fresh.post("/v1beta/models/m:generateContent", json={})
                assert response.status_code == 401
                sent += 1
            assert len(_pids(metrics_dir)) >= 2, sorted(p.name for p in metrics_dir.iterdir())
            scrapes = [client.get("/metrics").text for _ in range(6)]
        for text in scrapes:  # whichever worker answered, it counted every worker's requests
            assert _count(text, "/v1beta/models/{model}:generateContent", "401") == sent
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()
