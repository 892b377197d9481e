#!/usr/bin/env python3
"""Instructions per request, counted by valgrind: a deterministic view of a variant's cost.

    .venv/bin/python bench/instructions.py --variants limiter,cache-miss
    .venv/bin/python bench/instructions.py --variants limiter --calls 2 --requests 4000

Timing on this 2-vCPU machine moves by 2-5 µs between runs, more than most single steps of
a middleware cost; the number of instructions a request executes does not move (hash
randomisation is pinned). For each variant and call of ``bench/bench.py``, two fresh
interpreters run ``--requests`` sequential in-process requests (after 300 to warm up) and
none under ``valgrind --tool=callgrind``; the difference, per request, is printed next to the
bare Starlette app's. Instructions are a proxy, not a time: code inside a bigger app runs
slower per instruction (caches), so the benchmark's paired timings stay the figures to
report; this is for finding and confirming a step. Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")
_WARM_UP = 300


def run_requests(variant: str, call_index: int, requests: int) -> None:
    """In this process: build ``variant`` and send it ``_WARM_UP + requests`` requests."""
    from bench import bench

    app = bench.FACTORIES[variant]()
    call = bench.CALLS[call_index]
    state = getattr(bench.app_state(app), "request_state", None) or {}
    token = bench.dev_token(app) or bench.FALLBACK_TOKEN  # the stack verifies it
    template = bench.make_scope(call, token, {})

    async def main() -> None:
        for n in (_WARM_UP, requests):
            bad = await bench.run_block(app, template, call.body, state, n)
            if bad:
                raise SystemExit(f"{variant}: {bad} answers were not 2xx")

    asyncio.run(main())


def instructions(variant: str, call_index: int, requests: int) -> int:
    """Instructions a fresh interpreter executes to build ``variant`` and serve ``requests``."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, os.path.abspath(__file__), "--child",
        variant, str(call_index), str(requests),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, env=env, timeout=600, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace")[-600:]
        raise SystemExit(f"{variant}: valgrind failed ({done.returncode}): {tail}")
    return int(found.group(1))


def per_request(variant: str, call_index: int, requests: int) -> float:
    """Instructions per request of ``variant`` on call ``call_index`` (building it excluded)."""
    served = instructions(variant, call_index, requests)
    return (served - instructions(variant, call_index, 0)) / requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="limiter", help="comma-separated bench variants")
    parser.add_argument("--calls", default="0,1,2", help="indexes into bench.CALLS")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "CALL", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        variant, call, n = args.child
        run_requests(variant, int(call), int(n))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not on the PATH (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from bench import bench

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in bench.FACTORIES]
    if unknown:
        print(f"unknown variants: {', '.join(unknown)}", file=sys.stderr)
        return 2
    print(f"gemini-scale build: {bench.versions()['gemini-scale build']}")
    print(f"{'variant':24s} {'call':22s} {'instr/request':>14s} {'bare':>10s} {'added':>10s}")
    for index in (int(c) for c in args.calls.split(",")):
        bare = per_request("bare", index, args.requests)
        for variant in variants:
            mine = per_request(variant, index, args.requests)
            print(f"{variant:24s} {bench.CALLS[index].name:22s} {mine:14,.0f} {bare:10,.0f} "
                  f"{mine - bare:+10,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
