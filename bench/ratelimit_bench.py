#!/usr/bin/env python3
"""The rate limiter against bare Starlette and slowapi, in one run: in-process and over HTTP.

    .venv/bin/python bench/ratelimit_bench.py                 # about 15 minutes
    .venv/bin/python bench/ratelimit_bench.py --quick         # smoke run
    .venv/bin/python bench/ratelimit_bench.py --json bench/results/ratelimit.json

This is ``bench/bench.py`` with the rate-limit variants selected (any of its options can be
given and win over these defaults):

* ``stack`` / ``stack-redis``: ``build_stack()`` (JSON body, OAuth2 with a cached token,
  ``RateLimitMiddleware`` keyed by principal and ``IPRateLimitMiddleware``, as
  ``example_app/app.py`` wires them) on a ``MemoryStore`` / on a ``RedisStore``;
* ``stack-nolimit``: the same stack without its two limiters, so their share is visible;
* ``limiter`` / ``limiter-redis``: ``RateLimitMiddleware`` alone on the bare app, with an
  already verified principal in each request's state;
* ``redis-floor``: a bare pure-ASGI layer sending the same scripts through a raw
  ``redis.asyncio`` client (the client's own cost inside a request, which the Redis
  limiter is held against);
* ``slowapi`` / ``slowapi-redis``: slowapi's documented pattern (``@limiter.limit`` on each
  route plus ``SlowAPIMiddleware``) on the same routes, with ``memory://`` / ``redis://``.

Limits are far above what a run sends, so every request is allowed and charged. The Redis
variants use ``GEMINI_SCALE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) under a
key prefix unique to the run, and remove their keys at the end. The in-process section also
counts each Redis variant's commands per request at the client and times the Redis client's
own ``EVALSHA``, which the summary holds the limiter against (issue 4, "Performance").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench import main_with_defaults

VARIANTS = ("stack-nolimit,stack,stack-redis,limiter,limiter-redis,redis-floor,slowapi,"
            "slowapi-redis")
DEFAULTS = {"--variants": VARIANTS, "--sections": "inprocess,http", "--rounds": "3"}


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_defaults(DEFAULTS, argv, not_quick=("--rounds",))


if __name__ == "__main__":
    sys.exit(main())
