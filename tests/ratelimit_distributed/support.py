"""Pieces for the multi-process and fault tests of the rate limiter.

- :func:`replicas`: N ``uvicorn`` processes of one gateway app on free loopback ports, each
  waited for (``/healthz``) and stopped by pid (SIGTERM, then SIGKILL) when the block ends.
- :func:`fire`: a bounded burst of HTTP requests from this process, with per-request timings.
- :class:`ApiKey` / :func:`client_api_keys`: service-account keys every replica accepts (each
  replica's dev issuer has its own signing key, so dev tokens do not cross replicas).
- :func:`bucket_key`: the Redis key of a principal's limit, built with the public
  :class:`~gemini_scale.keys.Identity` so tests read the exact counters.
- :func:`restart_redis`: a killed ``redis-server`` back on the same port (no persistence:
  it comes back empty).
- :class:`Monitor`: ``MONITOR`` on a private server, closed off by a marker command.
- :func:`ensure_window_room`: wait (bounded) so a burst does not straddle a window boundary
  of Redis' clock, where the sliding window lets the previous window's count decay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from gemini_scale import APIKeys, IPRateLimitMiddleware, RateLimitMiddleware
from gemini_scale.keys import Identity, TrustedProxies, identity
from gemini_scale.stores.base import DEFAULT_PREFIX
from tests.redis_harness import HOST, REDIS_SERVER, RedisProcess, RedisProcesses, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemini-2.5-flash"
GATEWAY_APP = "example_app.main:app"
#: The gateway with a stand-in upstream whose latency comes from ``GS_TEST_STANDIN_LATENCY``.
SLOW_UPSTREAM_APP = "tests.ratelimit_distributed.replica_app:app"


# -- principals ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """A service account with a fresh random key (the subject is unique per test run)."""

    name: str
    subject: str = ""
    key: str = field(default_factory=lambda: "gs-" + secrets.token_urlsafe(24))
    scopes: str = "gemini.generate gemini.read"

    def __post_init__(self) -> None:
        if not self.subject:
            object.__setattr__(self, "subject", f"{self.name}-{uuid.uuid4().hex[:10]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.key}

    @property
    def entry(self) -> str:
        return f"{APIKeys.hash_key(self.key)}={self.subject}:{self.scopes}"

    def principal_value(self) -> str:
        """The canonical ``principal`` dimension value the limiter keys on (public API)."""
        found = APIKeys.from_env(self.entry).lookup(self.key)
        assert found is not None
        bucket = identity({"state": {"principal": found}}, "principal", trusted=TrustedProxies())
        assert bucket is not None
        return bucket.parts[0][1]


def client_api_keys(*keys: ApiKey) -> str:
    """``GEMINI_SCALE_CLIENT_API_KEYS`` for ``keys`` (digests only)."""
    return ";".join(key.entry for key in keys)


def bucket_key(
    parts: Sequence[tuple[str, str]],
    limit_name: str,
    *,
    namespace: str = RateLimitMiddleware.namespace,
    prefix: str = DEFAULT_PREFIX,
) -> str:
    """The full Redis key of one limit (``requests-60s``) of one bucket of the default
    policy (a route's own policy adds a budget scope, not used here)."""
    return f"{prefix}:{namespace}:{{{Identity(tuple(parts)).tag}}}:{limit_name}"


def principal_key(key: ApiKey, limit_name: str) -> str:
    """The gateway's per-principal key on routes without a model (``GET models``)."""
    return bucket_key([("principal", key.principal_value())], limit_name)


def principal_model_key(key: ApiKey, limit_name: str, model: str = MODEL) -> str:
    """The gateway's per-principal-and-model key (``key=("principal", "model")``)."""
    return bucket_key([("principal", key.principal_value()), ("model", model)], limit_name)


def client_ip_key(limit_name: str, address: str = HOST) -> str:
    """The gateway's per-address key (``IPRateLimitMiddleware``)."""
    return bucket_key(
        [("client_ip", address)], limit_name, namespace=IPRateLimitMiddleware.namespace
    )


def count_now(client: Any, key: str, window: float) -> int:
    """A limit's count in the current window of Redis' clock (0 when it is from another)."""
    stored = read_window(client, key)
    index = redis_now_ms(client) // int(window * 1000)
    return stored.get("c", 0) if stored.get("w") == index else 0


def read_window(client: Any, key: str) -> dict[str, int]:
    """A limit's hash as ints (``w``: window index, ``c``: count, ``p``: previous count)."""
    raw = client.hgetall(key)
    return {k.decode(): int(v) for k, v in raw.items()}


# -- gateway replicas ---------------------------------------------------------------------


def gateway_env(**settings: str) -> dict[str, str]:
    """This process' environment without any ``GEMINI_*`` setting, plus ``settings``
    (``redis_url="..."`` becomes ``GEMINI_SCALE_REDIS_URL``; other keys are used as given
    when they are upper case)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMINI_SCALE_", "GEMINI_API_KEY", "GOOGLE_"))
    }
    env["GEMINI_SCALE_DEV_ISSUER"] = "1"  # start-up needs an issuer; keys do the work here
    for name, value in settings.items():
        env[name if name.isupper() else f"GEMINI_SCALE_{name.upper()}"] = value
    return env


@dataclass
class Replica:
    """One gateway process."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _spawn(app: str, env: Mapping[str, str], workdir: Path, index: int) -> Replica:
    port = free_port()
    log_path = workdir / f"replica-{index}-{port}.log"
    command = [
        sys.executable, "-m", "uvicorn", app,
        "--host", HOST, "--port", str(port),
        "--no-access-log", "--log-level", "warning",
        "--timeout-graceful-shutdown", "2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT
        )
    return Replica(port, process, log_path)


def _ready(replica: Replica) -> bool:
    try:
        with socket.create_connection((HOST, replica.port), timeout=0.2):
            pass
        response = httpx.get(f"{replica.url}/healthz", timeout=1.0)
    except (OSError, httpx.HTTPError):
        return False
    return response.status_code == 200


@contextlib.contextmanager
def replicas(
    count: int,
    env: Mapping[str, str],
    workdir: Path,
    *,
    app: str = GATEWAY_APP,
    startup_timeout: float = 30.0,
) -> Iterator[list[Replica]]:
    """``count`` uvicorn processes of ``app`` with ``env``; all stopped when the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[Replica] = []
    try:
        for index in range(count):
            started.append(_spawn(app, env, workdir, index))
        deadline = time.monotonic() + startup_timeout
        pending = list(range(count))
        respawns = 0
        while pending:
            for index in list(pending):
                replica = started[index]
                if replica.process.poll() is not None:
                    log = replica.log
                    if "address already in use" in log.lower() and respawns < 3:
                        respawns += 1  # someone took the free port first: another one
                        started[index] = _spawn(app, env, workdir, index)
                        continue
                    raise RuntimeError(f"replica on port {replica.port} exited:\n{log[-2000:]}")
                if _ready(replica):
                    pending.remove(index)
            if pending and time.monotonic() > deadline:
                logs = "\n---\n".join(started[i].log[-1000:] for i in pending)
                raise TimeoutError(f"replicas not ready in {startup_timeout} s:\n{logs}")
            if pending:
                time.sleep(0.05)
        yield started
    finally:
        for replica in started:
            replica.stop()


# -- load ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One answer (or transport failure) of :func:`fire`."""

    tag: str
    status: int
    headers: httpx.Headers
    body: bytes
    started: float
    ended: float

    @property
    def latency(self) -> float:
        return self.ended - self.started

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass(frozen=True)
class Call:
    """A request to send: ``tag`` groups results (e.g. the principal's name)."""

    tag: str
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    json: Any = None


async def fire(calls: Sequence[Call], *, deadline: float = 30.0) -> list[Result]:
    """Send every call at once (one connection each) and wait for all, within ``deadline`` s."""
    limits = httpx.Limits(max_connections=len(calls) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(deadline)) as client:

        async def one(call: Call) -> Result:
            started = time.monotonic()
            response = await client.request(
                call.method, call.url, headers=dict(call.headers), json=call.json
            )
            return Result(
                call.tag,
                response.status_code,
                response.headers,
                response.content,
                started,
                time.monotonic(),
            )

        async with asyncio.timeout(deadline):
            return list(await asyncio.gather(*(one(call) for call in calls)))


def generate_body(text: str = "hi", max_output_tokens: int = 64) -> dict[str, Any]:
    return {
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": {"maxOutputTokens": max_output_tokens},
    }


def statuses(results: Sequence[Result], tag: str | None = None) -> dict[int, int]:
    counts: dict[int, int] = {}
    for result in results:
        if tag is None or result.tag == tag:
            counts[result.status] = counts.get(result.status, 0) + 1
    return counts


# -- Redis --------------------------------------------------------------------------------


def redis_now_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def ensure_window_room(client: Any, window: float, need: float) -> None:
    """Sleep past the next boundary of ``window``-second windows (Redis' clock) when fewer
    than ``need`` seconds of the current one remain. Bounded by ``need``."""
    window_ms = int(window * 1000)
    left_ms = window_ms - redis_now_ms(client) % window_ms
    if left_ms < need * 1000:
        time.sleep(left_ms / 1000 + 0.05)


def restart_redis(
    servers: RedisProcesses, old: RedisProcess, *args: str, timeout: float = 5.0
) -> RedisProcess:
    """Start ``redis-server`` again on ``old``'s port (after ``old`` was killed), tracked by
    ``servers`` so the fixture stops it. Comes back empty (no persistence)."""
    assert not old.alive()
    assert REDIS_SERVER is not None
    base = ["--port", str(old.port), "--bind", HOST, "--dir", str(old.workdir)]
    base += ["--logfile", str(old.workdir / "redis.log"), "--daemonize", "no"]
    command = [REDIS_SERVER, *base, "--save", "", "--appendonly", "no", *args]
    deadline = time.monotonic() + timeout
    while True:  # the port may linger for a moment after the kill
        process = subprocess.Popen(
            command, cwd=old.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        proc = RedisProcess(old.port, process, old.workdir)
        servers.started.append(proc)
        while time.monotonic() < deadline and proc.alive():
            try:
                with proc.client(timeout=0.2) as client:
                    if client.ping():
                        return proc
            except redis.RedisError:
                time.sleep(0.02)
        proc.kill()
        if time.monotonic() >= deadline:
            raise RuntimeError(f"redis-server did not come back on port {old.port}:\n{proc.log}")


def commandstats(client: Any) -> dict[str, int]:
    """``INFO commandstats`` as ``{command: calls}``."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_SOURCE = re.compile(rb"^\+?[0-9.]+ \[(\d+) ([^\]]+)\] ")


class Monitor:
    """The commands a private server executes while the ``with`` block runs (``MONITOR``).

    :attr:`commands` are the commands clients sent, as lists of strings; :attr:`in_scripts`
    the ones Lua scripts ran (``MONITOR`` shows those as coming from ``lua``). Leaving the
    block sends a marker command from another connection and reads until the marker shows
    up, so every command executed before it is recorded.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.commands: list[list[str]] = []
        self.in_scripts: list[list[str]] = []
        self._marker = f"gs-monitor-end-{uuid.uuid4().hex}"
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._buffer = b""

    def __enter__(self) -> Monitor:
        sock = socket.create_connection((HOST, self.port), timeout=30.0)
        sock.sendall(b"MONITOR\r\n")
        while b"\r\n" not in self._buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("MONITOR connection closed")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        assert line == b"+OK", line
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def wait_for(self, count: int, within: float = 5.0) -> None:
        """Wait until at least ``count`` client commands were seen (bounded)."""
        deadline = time.monotonic() + within
        while len(self.commands) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def _line(self, line: bytes) -> None:
        source = _SOURCE.match(line)
        args = [bytes(m.group(1)).decode("unicode_escape") for m in _ARG.finditer(line)]
        if source is None or not args:
            return
        args[0] = args[0].lower()
        if args[0] == "echo" and args[1:] == [self._marker]:
            self._done.set()
        elif source.group(2) == b"lua":
            self.in_scripts.append(args)
        else:
            self.commands.append(args)

    def _read(self) -> None:
        assert self._sock is not None
        try:
            while not self._done.is_set():
                while b"\r\n" in self._buffer and not self._done.is_set():
                    line, _, self._buffer = self._buffer.partition(b"\r\n")
                    self._line(line)
                if self._done.is_set():
                    return
                chunk = self._sock.recv(65536)
                if not chunk:
                    return
                self._buffer += chunk
        except OSError:
            return

    def __exit__(self, *exc: object) -> None:
        try:
            # A bare connection (no client handshake) so only the marker shows up.
            with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
                sock.sendall(f"ECHO {self._marker}\r\n".encode())
                sock.recv(1024)
            finished = self._done.wait(5.0)
        finally:
            if self._sock is not None:
                self._sock.close()
            if self._thread is not None:
                self._thread.join(5.0)
        assert finished, "MONITOR did not see the end marker"
