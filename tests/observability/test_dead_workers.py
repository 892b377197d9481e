"""Multiprocess mode: a worker that died without anyone telling prometheus-client (uvicorn's
``--workers`` supervisor replaces it silently) no longer holds the ``live*`` gauges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: A worker: marks the store degraded (a livemax gauge), says so, then waits or exits.
WORKER = """
import sys
from prometheus_client import Gauge
Gauge("gemini_scale_ratelimit_store_degraded", "doc", multiprocess_mode="livemax").set(1)
print("set", flush=True)
if sys.argv[1] == "stay":
    sys.stdin.read()
"""

SCRAPE = """
from gemini_scale.observability.metrics import metrics_body
body, _ = metrics_body()
print([line for line in body.decode().splitlines()
       if line.startswith("gemini_scale_ratelimit_store_degraded ")])
"""


def _run(code: str, directory: Path, *args: str) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


@pytest.mark.timeout(120)
def test_a_dead_workers_live_gauge_is_forgotten_and_a_living_ones_kept(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    assert _run(WORKER, directory, "exit").strip() == "set"  # degraded, then killed
    assert _run(SCRAPE, directory).strip() == "[]"  # nobody living is degraded
    assert not list(directory.glob("gauge_livemax_*.db"))

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    living = subprocess.Popen([sys.executable, "-c", WORKER, "stay"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert living.stdout is not None
        assert living.stdout.readline().strip() == "set"
        assert _run(SCRAPE, directory).strip() == (
            "['gemini_scale_ratelimit_store_degraded 1.0']"
        )
    finally:
        living.communicate("", timeout=30)
