"""The example gateway with a slow offline upstream, for replicas started by the tests.

``uvicorn tests.ratelimit_distributed.replica_app:app``: configured from the environment
exactly like ``example_app.main:app``, except that the stand-in upstream answers after
``GS_TEST_STANDIN_LATENCY`` seconds, so that every admission decision of a burst is taken
while the admitted requests still hold their token reservations.
"""

from __future__ import annotations

import os

from example_app.app import create_app
from example_app.standin import create_standin
from gemini_scale import load_settings

app = create_app(
    load_settings(),
    standin=create_standin(latency=float(os.environ.get("GS_TEST_STANDIN_LATENCY", "0"))),
)
