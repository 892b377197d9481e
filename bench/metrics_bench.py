#!/usr/bin/env python3
"""``MetricsMiddleware`` against a bare Starlette app, in one run.

    .venv/bin/python bench/metrics_bench.py               # about a minute
    .venv/bin/python bench/metrics_bench.py --quick       # smoke run

This is ``bench/bench.py`` with the metrics variants selected (any of its options can be
given and win over these defaults): ``metrics`` (the middleware alone on the bare app) and
``raw-asgi`` / ``metrics-asgi`` (a hand-written ASGI app alone and behind the middleware:
its own cost with less noise than Starlette's; the app declares its routes, so the layer
records a Gemini call's facts and reads its usage) and ``metrics-asgi-shared`` (the same
where a token limiter has read the usage, as in the gateway), and ``asgi-header``, the
targets' anchor (a pure-ASGI layer that wraps ``send`` and adds a header: +2.7 µs in the
baseline study, printed next to today's). The summary holds them against issue 7's target.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench import main_with_defaults

DEFAULTS = {
    "--variants": "metrics,raw-asgi,metrics-asgi,metrics-asgi-shared,asgi-header",
    "--sections": "inprocess",
}


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_defaults(DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
