#!/usr/bin/env python3
"""The response cache against bare Starlette, bare FastAPI and fastapi-cache2, in one run.

    .venv/bin/python bench/cache_bench.py                 # about 5 minutes
    .venv/bin/python bench/cache_bench.py --quick         # smoke run

This is ``bench/bench.py`` with the cache variants selected (any of its options can be given
and win over these defaults): ``cache`` / ``cache-redis`` (every call after the first a hit),
``cache-miss`` / ``cache-miss-redis`` (every call a miss), ``cache-miss-floor`` (the layer
that makes every call a miss, without the cache: the miss target is judged on
``cache-miss`` minus it), ``fastapi-bare`` and
``cache-fastapi`` (hits on FastAPI, against FastAPI's own endpoint), and
``fastapi-cache2-redis`` (fastapi-cache2's Redis backend on the model list). The summary
holds them against issue 5's targets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench import main_with_defaults

VARIANTS = ("cache,cache-asgi,cache-redis,cache-miss,cache-miss-redis,cache-miss-floor,"
            "fastapi-bare,cache-fastapi,fastapi-cache2-redis")
DEFAULTS = {"--variants": VARIANTS, "--sections": "inprocess"}


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_defaults(DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
