#!/usr/bin/env python3
"""``VersionMiddleware`` against a bare Starlette app, in one run.

    .venv/bin/python bench/version_bench.py               # about a minute
    .venv/bin/python bench/version_bench.py --quick       # smoke run

This is ``bench/bench.py`` with the version variants selected (any of its options can be
given and win over these defaults): ``version`` (Gemini's versions, head-version requests:
nothing to migrate), ``raw-asgi`` and ``version-asgi`` (a hand-written ASGI app alone and
behind the middleware: the middleware's own cost with less noise than Starlette's) and
``version-2hop`` (dated versions; every request migrated two hops up and every answer two
hops down). The summary holds them against issue 6's targets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench import main_with_defaults

DEFAULTS = {"--variants": "version,raw-asgi,version-asgi,version-2hop", "--sections": "inprocess"}


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_defaults(DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(main())
