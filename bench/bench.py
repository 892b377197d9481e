#!/usr/bin/env python3
"""gemini-scale against a bare Starlette app, in one run: in-process, over HTTP, at start-up.

    .venv/bin/python bench/bench.py                  # everything (about 2 minutes)
    .venv/bin/python bench/bench.py --quick          # smoke run
    .venv/bin/python bench/bench.py --json bench/results/run.json

Variants: ``bare`` (a plain Starlette app with ``GET /v1beta/models`` and
``POST /v1beta/models/{model}:countTokens``), ``stack`` (the same app through
:func:`build_stack`, the library's middlewares as the example gateway wires them) and
``gateway`` (the example gateway with its in-process Gemini stand-in). Every number that
matters is relative to ``bare`` measured in the same run; absolute figures are this
machine's only. See ``bench/README.md`` and ``/work/shared/research/performance-baselines.md``
for the method.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    import argparse

    from gemini_scale.types import ASGIApp

# Top-level imports stay within what Starlette imports anyway: the start-up children import
# this module for the baseline too, and must not pre-pay for gemini_scale's imports.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# The stack under test. Later issues extend this one function (OAuth2, rate limits with memory
# stores, cache, versions, metrics), in the order example_app/app.py adds them.
# --------------------------------------------------------------------------------------------

API_PREFIXES = ("/v1", "/v1beta")


def build_stack(app: Starlette) -> ASGIApp:
    """Wrap ``app`` in gemini-scale's middlewares the way ``example_app.app.create_app`` does
    (``add_middleware``, innermost first), with in-memory stores only."""
    # Imported here: the bare baseline must not pay for them.
    from gemini_scale import Issuer, JSONBodyMiddleware, OAuth2Middleware, ScopePolicy

    issuer = bench_issuer()
    app.add_middleware(
        JSONBodyMiddleware,
        max_body_bytes=20 * 1024 * 1024,
        path_prefixes=tuple(f"{p}/" for p in API_PREFIXES),
    )
    app.add_middleware(
        OAuth2Middleware,
        issuers=[Issuer(issuer=issuer.issuer, audience=issuer.audience, jwks=issuer.jwks())],
        public_paths=("/dev/",),
        rules={
            "GET /v1beta/models": ScopePolicy(scopes=frozenset({"gemini.read"})),
            "POST /v1beta/models/{model}:countTokens": ScopePolicy(
                scopes=frozenset({"gemini.generate"})
            ),
        },
    )
    if isinstance(app, Starlette):
        app.state.dev_issuer = issuer  # how the benchmark gets a valid token
        issuer.install(app)  # POST /dev/token, for the HTTP runs
    return app


_ISSUER: Any = None


def bench_issuer() -> Any:
    """One demo issuer per process, trusted by the stack (the gateway has its own)."""
    global _ISSUER  # noqa: PLW0603
    if _ISSUER is None:
        from example_app.dev_issuer import DevIssuer

        _ISSUER = DevIssuer(audience="gemini-scale")
    return _ISSUER


# --------------------------------------------------------------------------------------------
# The apps (also the factories uvicorn serves: ``bench.bench:bare_app`` and so on).
# --------------------------------------------------------------------------------------------

MODEL = "gemini-2.5-flash"
#: About 200 bytes serialized, like a one-model page of ``models.list``.
MODEL_LIST: dict[str, Any] = {
    "models": [
        {
            "name": f"models/{MODEL}",
            "version": "001",
            "displayName": "Gemini 2.5 Flash",
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }
    ]
}
COUNT_BODY = b'{"contents":[{"role":"user","parts":[{"text":"Hello, Gemini!"}]}]}'


async def _list_models(request: Request) -> Response:
    return JSONResponse(MODEL_LIST)


async def _count_tokens(request: Request) -> Response:
    await request.body()  # a forwarding endpoint reads the body it forwards
    return JSONResponse({"totalTokens": 3})


def bare_app() -> Starlette:
    """The baseline: plain Starlette, no middleware."""
    return Starlette(
        routes=[
            Route("/v1beta/models", _list_models, methods=["GET"]),
            Route("/v1beta/models/{model}:countTokens", _count_tokens, methods=["POST"]),
        ]
    )


def stack_app() -> ASGIApp:
    """The baseline app inside the library's stack."""
    return build_stack(bare_app())


def gateway_app() -> ASGIApp:
    """The example gateway (FastAPI, dev issuer, offline stand-in upstream)."""
    from example_app.app import create_app
    from gemini_scale import load_settings

    app: ASGIApp = create_app(load_settings({"GEMINI_SCALE_DEV_ISSUER": "1"}))
    return app


FACTORIES: dict[str, Callable[[], ASGIApp]] = {
    "bare": bare_app,
    "stack": stack_app,
    "gateway": gateway_app,
}


@dataclass(frozen=True)
class Call:
    """One request shape under test."""

    name: str
    method: str
    path: str
    body: bytes = b""


CALLS = (
    Call("GET models", "GET", "/v1beta/models"),
    Call("POST countTokens", "POST", f"/v1beta/models/{MODEL}:countTokens", COUNT_BODY),
)
#: Every request carries a bearer token of a realistic size, so only the app changes.
FALLBACK_TOKEN = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9." + "x" * 300 + "." + "y" * 86


def header_pairs(call: Call, token: str, port: int = 8000) -> list[tuple[str, str]]:
    headers = [
        ("host", f"127.0.0.1:{port}"),
        ("user-agent", "gemini-scale-bench"),
        ("accept", "*/*"),
        ("authorization", f"Bearer {token}"),
    ]
    if call.method == "POST":
        headers += [("content-type", "application/json"), ("content-length", str(len(call.body)))]
    return headers


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        try:
            return " ".join(f"{x:.2f}" for x in os.getloadavg())
        except OSError:
            return "n/a"


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan
    clean.sort()
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def fmt(value: float | int | str | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def signed(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:+,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def section(title: str) -> None:
    print(f"\n== {title}  (load average {load_average()}) ==", flush=True)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


# --------------------------------------------------------------------------------------------
# In-process ASGI driver
# --------------------------------------------------------------------------------------------


class Exchange:
    """One request/response over direct ASGI calls, like a server's: ``receive`` returns the
    request, then blocks until the response is complete, then says the client disconnected."""

    __slots__ = ("body", "chunks", "event", "finished", "keep", "requested", "status")

    def __init__(self, body: bytes, keep: bool = False) -> None:
        self.body = body
        self.requested = False
        self.finished = False
        self.event: asyncio.Event | None = None
        self.status = 0
        self.keep = keep
        self.chunks: list[bytes] = []

    async def receive(self) -> dict[str, Any]:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not self.finished:
            self.event = asyncio.Event()
            await self.event.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            if self.keep:
                self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.finished = True
                if self.event is not None:
                    self.event.set()


def make_scope(call: Call, token: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in header_pairs(call, token)],
        "client": ("127.0.0.1", 54321),
        "server": ("127.0.0.1", 8000),
        "state": state,
    }


async def one_call(
    app: ASGIApp, call: Call, token: str, state: dict[str, Any] | None = None
) -> tuple[int, bytes, dict[str, Any]]:
    scope = make_scope(call, token, dict(state or {}))
    exchange = Exchange(call.body, keep=True)
    await app(scope, exchange.receive, exchange.send)
    return exchange.status, b"".join(exchange.chunks), scope


async def run_block(
    app: ASGIApp, template: dict[str, Any], body: bytes, state: dict[str, Any], n: int
) -> int:
    """``n`` sequential requests; returns how many were not 2xx."""
    bad = 0
    headers = template["headers"]
    for _ in range(n):
        scope = template.copy()
        scope["headers"] = list(headers)
        scope["state"] = state.copy()
        exchange = Exchange(body)
        await app(scope, exchange.receive, exchange.send)
        if not 200 <= exchange.status < 300:
            bad += 1
    return bad


async def timed_block(
    app: ASGIApp, template: dict[str, Any], body: bytes, state: dict[str, Any], n: int
) -> tuple[float, float, int]:
    """(wall µs/request, CPU µs/request, non-2xx count)."""
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    bad = await asyncio.wait_for(run_block(app, template, body, state, n), timeout=120)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / n * 1e6, cpu / n * 1e6, bad


class Lifespan:
    """Drive an app's ASGI lifespan explicitly (the gateway opens its upstream client there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        return await self._inbox.get()

    async def _send(self, message: Any) -> None:
        await self._outbox.put(dict(message))

    async def _exchange(self, message: dict[str, Any], expected: str) -> None:
        assert self._task is not None
        await self._inbox.put(message)
        reply = asyncio.ensure_future(self._outbox.get())
        done, _ = await asyncio.wait({reply, self._task}, timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        if reply not in done:
            reply.cancel()
            if self._task in done and self._task.exception() is not None:
                raise RuntimeError(f"lifespan failed: {self._task.exception()!r}")
            raise RuntimeError(f"lifespan: no {expected} within 30 s")
        answer = reply.result()
        if answer["type"] != expected:
            raise RuntimeError(f"lifespan: {answer['type']}: {answer.get('message', '')}")

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        self._task = asyncio.ensure_future(self.app(scope, self._receive, self._send))
        await self._exchange({"type": "lifespan.startup"}, "lifespan.startup.complete")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None or self._task.done():
            return
        try:
            await self._exchange({"type": "lifespan.shutdown"}, "lifespan.shutdown.complete")
            await asyncio.wait_for(self._task, timeout=10)
        finally:
            if not self._task.done():
                self._task.cancel()


@dataclass
class Paired:
    variant: str
    call: str
    pairs: int
    requests_per_block: tuple[int, int]
    bare_us: float
    variant_us: float
    added_us: float
    bare_cpu_us: float
    variant_cpu_us: float
    added_cpu_us: float
    ratio: float
    added_min_us: float
    added_max_us: float
    non_2xx: int


async def calibrate(app: ASGIApp, template: dict[str, Any], body: bytes,
                    state: dict[str, Any], seconds: float) -> float:
    """Warm ``app`` up for about ``seconds``; returns its µs/request."""
    n = 20
    while True:
        started = time.perf_counter()
        await asyncio.wait_for(run_block(app, template, body, state, n), timeout=120)
        spent = time.perf_counter() - started
        if spent >= seconds * 0.8 or n >= 1_000_000:
            return spent / n * 1e6
        n = min(1_000_000, max(n * 2, math.ceil(n * seconds / max(spent, 1e-6))))


async def paired(
    name: str, bare: ASGIApp, variant: ASGIApp, call: Call, token: str,
    bare_state: dict[str, Any], variant_state: dict[str, Any],
    pairs: int, block_seconds: float,
) -> Paired:
    bare_t = make_scope(call, token, {})
    var_t = make_scope(call, token, {})
    warm = max(0.05, block_seconds)
    bare_us = await calibrate(bare, bare_t, call.body, bare_state, warm)
    var_us = await calibrate(variant, var_t, call.body, variant_state, warm)
    n_bare = max(20, round(block_seconds * 1e6 / bare_us))
    n_var = max(20, round(block_seconds * 1e6 / var_us))
    rows: list[tuple[float, float, float, float]] = []
    bad = 0
    for _ in range(pairs):
        b_us, b_cpu, b_bad = await timed_block(bare, bare_t, call.body, bare_state, n_bare)
        v_us, v_cpu, v_bad = await timed_block(variant, var_t, call.body, variant_state, n_var)
        bad += b_bad + v_bad
        rows.append((b_us, v_us, b_cpu, v_cpu))
    added = [v - b for b, v, _, _ in rows]
    return Paired(
        variant=name,
        call=call.name,
        pairs=pairs,
        requests_per_block=(n_bare, n_var),
        bare_us=median([r[0] for r in rows]),
        variant_us=median([r[1] for r in rows]),
        added_us=median(added),
        bare_cpu_us=median([r[2] for r in rows]),
        variant_cpu_us=median([r[3] for r in rows]),
        added_cpu_us=median([v - b for _, _, b, v in rows]),
        ratio=median([v / b for b, v, _, _ in rows]),
        added_min_us=min(added),
        added_max_us=max(added),
        non_2xx=bad,
    )


def dev_token(app: Any) -> str | None:
    issuer = getattr(getattr(app, "state", None), "dev_issuer", None)
    if issuer is None:
        return None
    token: str = issuer.mint(lifetime=3600)
    return token


async def inprocess_main(
    variants: Sequence[str], pairs: int, block_seconds: float, notes: list[str]
) -> list[Paired]:
    bare = bare_app()
    apps: dict[str, ASGIApp] = {}
    for name in variants:
        try:
            apps[name] = FACTORIES[name]()
        except Exception as exc:
            notes.append(f"in-process: {name} not built: {short_error(exc)}")
            print(f"  ! {name}: could not build: {short_error(exc)}", flush=True)
    states: dict[str, dict[str, Any]] = {"bare": {}}
    lifespans: list[Lifespan] = []
    results: list[Paired] = []
    try:
        for name, app in list(apps.items()):
            if name == "gateway":
                try:
                    lifespan = Lifespan(app)
                    await lifespan.__aenter__()
                except Exception as exc:
                    notes.append(f"in-process: {name} lifespan failed: {short_error(exc)}")
                    print(f"  ! {name}: lifespan failed: {short_error(exc)}", flush=True)
                    del apps[name]
                    continue
                lifespans.append(lifespan)
                states[name] = lifespan.state
            else:
                states[name] = {}
        tokens = {name: dev_token(app) or FALLBACK_TOKEN for name, app in apps.items()}
        tokens["bare"] = FALLBACK_TOKEN
        # Check each app answers each call before timing anything.
        checks: list[tuple[str, ASGIApp]] = [("bare", bare), *apps.items()]
        for name, app in checks:
            for call in CALLS:
                status, body, scope = await asyncio.wait_for(
                    one_call(app, call, tokens[name], states[name]), timeout=30)
                ran = "gemini_scale" in scope
                print(f"  check {name:8} {call.name:17} -> {status}, {len(body)} bytes"
                      + ("" if name == "bare" else f", gemini-scale context: {ran}"), flush=True)
                if not 200 <= status < 300:
                    notes.append(f"in-process: {name} {call.name} answered {status}: "
                                 f"{body[:160]!r}")
                if name != "bare" and not ran:
                    notes.append(f"in-process: {name} {call.name}: no gemini-scale middleware ran")
        for name, app in apps.items():
            for call in CALLS:
                result = await paired(name, bare, app, call, tokens[name], states["bare"],
                                      states[name], pairs, block_seconds)
                results.append(result)
                print(f"  {name:8} {call.name:17} added {signed(result.added_us)} µs "
                      f"(CPU {signed(result.added_cpu_us)}), ratio {result.ratio:.2f}x",
                      flush=True)
    finally:
        for lifespan in reversed(lifespans):
            try:
                await lifespan.__aexit__(None, None, None)
            except Exception as exc:
                notes.append(f"in-process: lifespan shutdown: {short_error(exc)}")
    return results


def run_inprocess(
    variants: Sequence[str], pairs: int, block_seconds: float, notes: list[str]
) -> list[Paired]:
    section(f"In-process: direct ASGI calls, paired B/V blocks ({pairs} pairs, "
            f"~{block_seconds:g} s each, loop: {loop_factory().__module__.split('.')[0]})")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        results = runner.run(inprocess_main(variants, pairs, block_seconds, notes))
    rows = [
        [r.variant, r.call, fmt(r.bare_us), fmt(r.variant_us), signed(r.added_us),
         fmt(r.bare_cpu_us), fmt(r.variant_cpu_us), signed(r.added_cpu_us),
         f"{r.ratio:.2f}x", f"{r.added_min_us:+.1f}..{r.added_max_us:+.1f}", fmt(r.non_2xx)]
        for r in results
    ]
    print()
    print(table(["variant", "route", "bare µs", "variant µs", "added µs", "bare CPU µs",
                 "var CPU µs", "added CPU µs", "ratio", "added spread", "non-2xx"], rows))
    return results


# --------------------------------------------------------------------------------------------
# Over HTTP: uvicorn + wrk (or an asyncio load generator)
# --------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pin(cpu: int, enabled: bool) -> list[str]:
    taskset = shutil.which("taskset")
    if enabled and taskset and cpu_count() >= 2:
        return [taskset, "-c", str(cpu)]
    return []


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (NaN where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_call(port: int, call: Call, token: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(call.method, call.path, body=call.body or None,
                     headers=dict(header_pairs(call, token, port)))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_burst(port: int, call: Call, token: str, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = dict(header_pairs(call, token, port))
    try:
        for _ in range(n):
            conn.request(call.method, call.path, body=call.body or None, headers=headers)
            conn.getresponse().read()
    finally:
        conn.close()


def uvicorn_options() -> list[str]:
    options = ["--no-access-log", "--log-level", "warning"]
    if importlib.util.find_spec("uvloop") is not None:
        options += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools") is not None:
        options += ["--http", "httptools"]
    return options


@contextmanager
def uvicorn_server(variant: str, pinned: bool) -> Iterator[tuple[int, int]]:
    """Serve ``variant`` with one uvicorn process on 127.0.0.1; yields (port, pid)."""
    port = free_port()
    command = [
        *pin(0, pinned), sys.executable, "-m", "uvicorn", f"bench.bench:{variant}_app",
        "--factory", "--host", "127.0.0.1", "--port", str(port), "--app-dir", ROOT,
        *uvicorn_options(),
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-1500:]
                    raise RuntimeError(f"uvicorn ({variant}) exited {proc.returncode}:\n{tail}")
                try:
                    http_call(port, CALLS[0], FALLBACK_TOKEN, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"uvicorn ({variant}) not ready in 60 s") from None
                    time.sleep(0.1)
            yield port, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@dataclass
class Load:
    variant: str
    call: str
    round: int
    generator: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str
    server_cpu_us: float
    server_utilization: float


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(found.group(1)) * _UNITS[found.group(2)] if found else math.nan


def wrk_script(call: Call, token: str) -> str:
    lines = [f'wrk.method = "{call.method}"',
             f'wrk.headers["Authorization"] = "Bearer {token}"',
             'wrk.headers["User-Agent"] = "gemini-scale-bench"']
    if call.body:
        lines += [f"wrk.body = [==[{call.body.decode()}]==]",
                  'wrk.headers["Content-Type"] = "application/json"']
    return "\n".join(lines) + "\n"


def run_wrk(port: int, call: Call, token: str, seconds: int, connections: int,
            pinned: bool) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(call, token))
    try:
        command = [*pin(1, pinned), wrk, "-t1", f"-c{connections}", f"-d{seconds}s",
                   "--latency", "-s", script.name, f"http://127.0.0.1:{port}{call.path}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60,
                              check=False)
    finally:
        os.unlink(script.name)
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]}")

    def grab(pattern: str) -> str | None:
        found = re.search(pattern, out, re.MULTILINE)
        return found.group(1) if found else None

    requests = int(grab(r"^\s*(\d+) requests in") or 0)
    rps = float(grab(r"^Requests/sec:\s+([\d.]+)") or "nan")
    return {
        "requests": requests,
        "seconds": requests / rps if rps and not math.isnan(rps) else math.nan,
        "rps": rps,
        "p50_ms": _ms(grab(r"^\s+50%\s+(\S+)") or ""),
        "p99_ms": _ms(grab(r"^\s+99%\s+(\S+)") or ""),
        "non_2xx": int(grab(r"Non-2xx or 3xx responses:\s+(\d+)") or 0),
        "socket_errors": (grab(r"Socket errors:\s+(.*)$") or "").strip(),
    }


def raw_request(call: Call, token: str, port: int) -> bytes:
    head = [f"{call.method} {call.path} HTTP/1.1"]
    head += [f"{k.title()}: {v}" for k, v in header_pairs(call, token, port)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + call.body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def asyncio_load(port: int, call: Call, token: str, seconds: float,
                       connections: int) -> dict[str, Any]:
    """A closed-loop keep-alive load generator (the fallback when wrk is missing)."""
    raw = raw_request(call, token, port)
    latencies: list[float] = []
    counts = {"non_2xx": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["errors"] += 1
            return
        try:
            while (start := time.perf_counter()) < deadline:
                writer.write(raw)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - start)
                if not 200 <= status < 400:
                    counts["non_2xx"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["errors"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))),
                           timeout=seconds + 60)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "non_2xx": counts["non_2xx"],
        "socket_errors": f"errors {counts['errors']}" if counts["errors"] else "",
    }


def run_asyncio_load(port: int, call: Call, token: str, seconds: float, connections: int,
                     pinned: bool) -> dict[str, Any]:
    previous: set[int] | None = None
    if pinned and hasattr(os, "sched_setaffinity") and cpu_count() >= 2:
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {sorted(previous)[1]})
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(asyncio_load(port, call, token, seconds, connections))
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def server_token(port: int) -> str | None:
    """A token from the server's own dev issuer, when it has one."""
    try:
        status, body = http_call(port, Call("token", "POST", "/dev/token", b"{}"), FALLBACK_TOKEN)
    except OSError:
        return None
    if status != 200:
        return None
    token: str = json.loads(body)["access_token"]
    return token


def run_http(variants: Sequence[str], seconds: int, warmup: int, rounds: int, connections: int,
             generator: str, pinned: bool, notes: list[str]) -> list[Load]:
    everyone = ["bare", *variants]
    section(f"HTTP: uvicorn {' '.join(uvicorn_options())}, "
            f"{'wrk -t1' if generator == 'wrk' else 'asyncio load generator'} "
            f"-c{connections} -d{seconds}s x {rounds} round(s), warm-up "
            f"{f'{warmup} s' if warmup else '200 requests'}, "
            f"{'server CPU 0 / client CPU 1' if pin(0, pinned) else 'not pinned'}")
    if generator == "asyncio":
        print("  NOTE: wrk not used; the Python load generator is likely the bottleneck, so "
              "RPS and latency are lower bounds. Server CPU µs/request still holds.", flush=True)
    results: list[Load] = []
    for rnd in range(rounds):
        order = everyone if rnd % 2 == 0 else everyone[::-1]
        for variant in order:
            try:
                with uvicorn_server(variant, pinned) as (port, pid):
                    token = server_token(port) or FALLBACK_TOKEN
                    for call in CALLS:
                        status, body = http_call(port, call, token)
                        if not 200 <= status < 300:
                            notes.append(f"HTTP: {variant} {call.name} answered {status}: "
                                         f"{body[:160]!r}")
                        if warmup:
                            if generator == "wrk":
                                run_wrk(port, call, token, warmup, connections, pinned)
                            else:
                                run_asyncio_load(port, call, token, warmup, connections, pinned)
                        else:
                            http_burst(port, call, token, 200)
                        cpu0, wall0 = process_cpu_seconds(pid), time.perf_counter()
                        if generator == "wrk":
                            got = run_wrk(port, call, token, seconds, connections, pinned)
                        else:
                            got = run_asyncio_load(port, call, token, seconds, connections,
                                                   pinned)
                        cpu = process_cpu_seconds(pid) - cpu0
                        wall = time.perf_counter() - wall0
                        load = Load(variant=variant, call=call.name, round=rnd,
                                    generator=generator,
                                    server_cpu_us=cpu / got["requests"] * 1e6
                                    if got["requests"] else math.nan,
                                    server_utilization=cpu / wall, **got)
                        results.append(load)
                        print(f"  round {rnd + 1} {variant:8} {call.name:17} "
                              f"{fmt(load.rps, 0)} req/s, p50 {fmt(load.p50_ms, 2)} ms, "
                              f"p99 {fmt(load.p99_ms, 2)} ms, server CPU "
                              f"{fmt(load.server_cpu_us)} µs/req, util "
                              f"{fmt(load.server_utilization, 2)}, load avg {load_average()}",
                              flush=True)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                notes.append(f"HTTP: {variant} round {rnd + 1}: {short_error(exc)}")
                print(f"  ! {variant}: {exc}", flush=True)
    print()
    print(table(["variant", "route", "req/s", "p50 ms", "p99 ms", "p99/p50", "srv CPU µs/req",
                 "srv util", "req/s vs bare", "+CPU µs vs bare", "non-2xx"],
                [http_row(r) for r in summarize_http(results, everyone)]))
    if any(r.server_utilization < LOW_UTILIZATION for r in results):
        print(f"  ! server utilization below {LOW_UTILIZATION}: the server was starved (other "
              "processes, or the load generator); read CPU µs/request, not req/s, there")
    return results


@dataclass
class HTTPSummary:
    variant: str
    call: str
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float
    server_utilization: float
    rps_ratio: float
    added_cpu_us: float
    non_2xx: int
    rounds: int = 0
    notes: list[str] = field(default_factory=list)


def summarize_http(results: Sequence[Load], variants: Sequence[str]) -> list[HTTPSummary]:
    """Medians over rounds; ratios and deltas are taken within a round, then the median."""
    out: list[HTTPSummary] = []
    for variant in variants:
        for call in CALLS:
            mine = [r for r in results if r.variant == variant and r.call == call.name]
            if not mine:
                continue
            ratios, deltas = [], []
            for r in mine:
                base = next((b for b in results if b.variant == "bare" and b.call == call.name
                             and b.round == r.round), None)
                if base is not None:
                    ratios.append(r.rps / base.rps)
                    deltas.append(r.server_cpu_us - base.server_cpu_us)
            out.append(HTTPSummary(
                variant=variant, call=call.name, rps=median([r.rps for r in mine]),
                p50_ms=median([r.p50_ms for r in mine]), p99_ms=median([r.p99_ms for r in mine]),
                server_cpu_us=median([r.server_cpu_us for r in mine]),
                server_utilization=median([r.server_utilization for r in mine]),
                rps_ratio=median(ratios), added_cpu_us=median(deltas),
                non_2xx=sum(r.non_2xx for r in mine), rounds=len(mine),
            ))
    return out


#: Below this server CPU utilization the server was starved (other processes on its CPU, or a
#: client-bound generator): its req/s undercounts; its CPU µs/request still holds.
LOW_UTILIZATION = 0.9


def http_row(s: HTTPSummary) -> list[str]:
    return [s.variant, s.call, fmt(s.rps, 0), fmt(s.p50_ms, 2), fmt(s.p99_ms, 2),
            fmt(s.p99_ms / s.p50_ms, 2), fmt(s.server_cpu_us),
            fmt(s.server_utilization, 2) + ("!" if s.server_utilization < LOW_UTILIZATION else ""),
            "(baseline)" if s.variant == "bare" else f"{s.rps_ratio:.2f}x",
            "—" if s.variant == "bare" else signed(s.added_cpu_us), fmt(s.non_2xx)]


# --------------------------------------------------------------------------------------------
# Start-up cost: fresh interpreters
# --------------------------------------------------------------------------------------------

STARTUP_CODE = {
    "python (empty)": "pass",
    "bare: import + build": "import bench.bench as b; b.bare_app()",
    "stack: import + build": "import bench.bench as b; b.stack_app()",
    "bare: + first request": "import bench.bench as b; b.first_request(b.bare_app())",
    "stack: + first request": "import bench.bench as b; b.first_request(b.stack_app())",
    "gateway: import + build": "import bench.bench as b; b.gateway_app()",
}
STARTUP_PAIRS = {  # variant -> its baseline
    "stack: import + build": "bare: import + build",
    "stack: + first request": "bare: + first request",
    "gateway: import + build": "bare: import + build",
}


def first_request(app: ASGIApp) -> None:
    """One request through a freshly built app (route table, audit, lazy imports)."""
    status, _, _ = asyncio.run(one_call(app, CALLS[0], dev_token(app) or FALLBACK_TOKEN))
    if status != 200:
        raise SystemExit(f"first request answered {status}")


#: Appended to each start-up child: its own peak RSS. ``wait4``'s ``ru_maxrss`` also counts the
#: pages the child shared with this (large) process between fork and exec, so /proc's VmHWM,
#: which is per address space, is used where it exists.
_REPORT_PEAK = """
try:
    with open("/proc/self/status") as _f:
        print(next(_l for _l in _f if _l.startswith("VmHWM:")).split()[1])
except (OSError, StopIteration):
    pass
"""


def spawn(code: str, timeout: float = 60) -> tuple[float, float, float]:
    """Run ``python -c code``; (wall ms, CPU ms, peak RSS MiB), the times from ``wait4``."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code + "\n" + _REPORT_PEAK], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.read().decode(errors="replace").split()
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
    if out and out[-1].isdigit():
        rss_mib = int(out[-1]) / 1024  # VmHWM, KiB
    else:
        rss_mib = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3, rss_mib


@dataclass
class Startup:
    kind: str
    runs: int
    wall_ms: float
    cpu_ms: float
    rss_mib: float
    baseline: str | None = None
    added_ms: float = math.nan
    added_mib: float = math.nan
    error: str | None = None


def run_startup(runs: int, variants: Sequence[str], notes: list[str]) -> list[Startup]:
    kinds = [k for k in STARTUP_CODE if not k.startswith("gateway") or "gateway" in variants]
    section(f"Start-up: fresh interpreter, import + build, {runs} alternating runs each")
    samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    errors: dict[str, str] = {}
    for kind in kinds:  # once each, untimed: compile bytecode caches
        try:
            spawn(STARTUP_CODE[kind])
        except RuntimeError as exc:
            errors[kind] = short_error(exc)
            notes.append(f"start-up: {kind}: {short_error(exc)}")
    live = [k for k in kinds if k not in errors]
    for i in range(runs):
        for kind in live if i % 2 == 0 else live[::-1]:
            try:
                samples[kind].append(spawn(STARTUP_CODE[kind]))
            except RuntimeError as exc:
                notes.append(f"start-up: {kind} run {i + 1}: {short_error(exc)}")
    results: list[Startup] = []
    for kind in kinds:
        got = samples[kind]
        result = Startup(kind, len(got), median([s[0] for s in got]),
                         median([s[1] for s in got]), median([s[2] for s in got]),
                         error=errors.get(kind))
        base = STARTUP_PAIRS.get(kind)
        if base and got and samples.get(base):
            result.baseline = base
            result.added_ms = median([a[0] - b[0] for a, b in zip(got, samples[base],
                                                                   strict=False)])
            result.added_mib = median([a[2] - b[2] for a, b in zip(got, samples[base],
                                                                    strict=False)])
        results.append(result)
    print(table(
        ["run", "wall ms", "CPU ms", "peak RSS MiB", "+ms vs baseline", "+MiB vs baseline",
         "baseline"],
        [[r.kind, fmt(r.wall_ms), fmt(r.cpu_ms), fmt(r.rss_mib, 2),
          signed(r.added_ms) if r.baseline else "—",
          signed(r.added_mib, 2) if r.baseline else "—",
          r.baseline or (r.error or "—")] for r in results]))
    return results


# --------------------------------------------------------------------------------------------
# Summary, metadata, main
# --------------------------------------------------------------------------------------------

TARGET_ADDED_CPU_US = 100.0
TARGET_STARTUP_MS = 100.0
TARGET_STARTUP_MIB = 10.0


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def summary(inproc: Sequence[Paired], http: Sequence[Load], startup: Sequence[Startup],
            load_start: str, notes: Sequence[str]) -> list[str]:
    lines: list[str] = []
    stack = [p for p in inproc if p.variant == "stack"]
    worst = max((p.added_cpu_us for p in stack), default=math.nan)
    lines.append(
        f"[{verdict(None if math.isnan(worst) else worst <= TARGET_ADDED_CPU_US)}] "
        f"in-process added CPU, stack vs bare: "
        + (", ".join(f"{p.call} {signed(p.added_cpu_us)} µs" for p in stack) or "not measured")
        + f"  (target ≤ {TARGET_ADDED_CPU_US:.0f} µs/request for the finished stack with "
        "memory stores; the stack today is what build_stack() wires)")
    built = next((s for s in startup if s.kind == "stack: import + build"), None)
    if built is not None and built.baseline:
        ok = built.added_ms <= TARGET_STARTUP_MS and built.added_mib <= TARGET_STARTUP_MIB
        lines.append(
            f"[{verdict(ok)}] start-up, import gemini_scale + build the stack vs Starlette "
            f"alone: {signed(built.added_ms)} ms, {signed(built.added_mib, 2)} MiB  "
            f"(target ≤ +{TARGET_STARTUP_MS:.0f} ms and ≤ +{TARGET_STARTUP_MIB:.0f} MiB)")
    else:
        lines.append("[n/a ] start-up: not measured")
    first = next((s for s in startup if s.kind == "stack: + first request"), None)
    if first is not None and first.baseline:
        lines.append(f"       (with the first request, route table and audit included: "
                     f"{signed(first.added_ms)} ms, {signed(first.added_mib, 2)} MiB)")
    for s in summarize_http(http, ["stack", "gateway"]):
        lines.append(f"       HTTP {s.variant} {s.call}: {s.rps_ratio:.2f}x bare req/s, "
                     f"{signed(s.added_cpu_us)} server CPU µs/request, p99/p50 "
                     f"{s.p99_ms / s.p50_ms:.2f}, server utilization "
                     f"{s.server_utilization:.2f}")
    lines.append(f"       load average at start {load_start}, at end {load_average()} "
                 f"on {cpu_count()} CPUs (other work on the machine adds noise; trust the "
                 "paired deltas and ratios, not absolute figures)")
    lines += [f"  note: {n}" for n in notes]
    return lines


def versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in ("gemini-scale", "starlette", "fastapi", "uvicorn", "uvloop", "httptools",
                 "httpx", "anyio", "pydantic"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    wrk = shutil.which("wrk")
    if wrk:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10,
                              check=False)
        out["wrk"] = (done.stdout or done.stderr).split("[")[0].replace("wrk", "").strip()
    return out


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    start = time.perf_counter()
    for _ in range(2000):
        sum(range(1000))
    speed = (time.perf_counter() - start) / 2000 * 1e6
    return {"cpu": model, "cpus": cpu_count(), "platform": platform.platform(),
            "sum_range_1000_us": round(speed, 1)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--seconds", type=int, help="wrk duration per run (default 5)")
    parser.add_argument("--rounds", type=int, help="HTTP rounds, order alternating (default 1)")
    parser.add_argument("--warmup", type=int, help="wrk warm-up seconds (default 2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pairs", type=int, help="in-process B/V pairs (default 9)")
    parser.add_argument("--block-seconds", type=float, help="in-process block (default 0.3)")
    parser.add_argument("--startup-runs", type=int, help="fresh interpreters each (default 10)")
    parser.add_argument("--variants", default="stack,gateway",
                        help="compared with bare (default stack,gateway)")
    parser.add_argument("--sections", default="inprocess,http,startup")
    parser.add_argument("--load-generator", choices=["auto", "wrk", "asyncio"], default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--json", metavar="PATH", help="save every result as JSON")
    args = parser.parse_args(argv)
    defaults = ({"seconds": 1, "rounds": 1, "warmup": 0, "pairs": 3, "block_seconds": 0.05,
                 "startup_runs": 2} if args.quick else
                {"seconds": 5, "rounds": 1, "warmup": 2, "pairs": 9, "block_seconds": 0.3,
                 "startup_runs": 10})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in FACTORIES or v == "bare"]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from stack, gateway")
    sections = {s.strip() for s in args.sections.split(",")}
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "asyncio"
    elif generator == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed; use --load-generator asyncio")
    started = time.time()
    load_start = load_average()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "machine": machine(), "versions": versions(), "load_average_start": load_start,
            "args": vars(args), "load_generator": generator}
    print("gemini-scale benchmark:", meta["started"])
    print("  machine:", ", ".join(f"{k} {v}" for k, v in meta["machine"].items()))
    print("  versions:", ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    if generator == "asyncio":
        print("  load generator: wrk not found, falling back to an asyncio load generator")
    notes: list[str] = []
    inproc: list[Paired] = []
    loads: list[Load] = []
    startup: list[Startup] = []
    if "inprocess" in sections:
        inproc = run_inprocess(variants, args.pairs, args.block_seconds, notes)
    if "http" in sections:
        loads = run_http(variants, args.seconds, args.warmup, args.rounds, args.connections,
                         generator, not args.no_pin, notes)
    if "startup" in sections:
        startup = run_startup(args.startup_runs, variants, notes)
    section("Summary against the project's targets")
    lines = summary(inproc, loads, startup, load_start, notes)
    print("\n".join(lines))
    print(f"\n(total {time.time() - started:.0f} s)")
    if args.json:
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = {
            "meta": {**meta, "load_average_end": load_average(),
                     "seconds_total": round(time.time() - started, 1)},
            "inprocess": [asdict(p) for p in inproc],
            "http_runs": [asdict(r) for r in loads],
            "http": [asdict(s) for s in summarize_http(loads, ["bare", *variants])],
            "startup": [asdict(s) for s in startup],
            "summary": lines,
        }
        with open(path, "w") as f:
            f.write(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"results saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
