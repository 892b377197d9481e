"""Real Redis for tests: start and stop ``redis-server`` processes, and the skip policy.

Plain functions (:func:`start_redis`, :func:`start_cluster`, :func:`start_sentinel`) start
servers on free loopback ports in a directory the caller owns; every wait is bounded and every
process is stopped by pid. Loaded as a pytest plugin (``pytest_plugins = ["redis_harness"]``
in ``tests/conftest.py``), this module also provides the fixtures:

- ``machine_redis_url``: the machine's Redis (``GEMINI_SCALE_TEST_REDIS_URL``, default
  ``redis://127.0.0.1:6379/0``). Tests share it: use a unique key prefix, delete only your own
  keys, never ``FLUSHALL``/``FLUSHDB``.
- ``redis_servers``: a :class:`RedisProcesses` factory for private servers (and Sentinels)
  that the test may kill, pause or flush; all are stopped after the test.
- ``redis_cluster``: a 3-master Redis Cluster shared by the session.

When Redis (or the ``redis-server`` binary) is unavailable the tests that need it are skipped
and the run ends with one loud summary line; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

MACHINE_REDIS_URL = os.environ.get("GEMINI_SCALE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"


#: A cluster node also listens on its port + 10000, and redis-server refuses a port whose
#: bus port would pass 65535 ("Redis port number too high").
MAX_PORT = 65535 - 10000


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (at most :data:`MAX_PORT`)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port <= MAX_PORT:
            return port
    raise RuntimeError(f"no free loopback port at or below {MAX_PORT}")


def sync_client(port: int, *, timeout: float = 1.0) -> redis.Redis:
    """A blocking client to a local server, without retries; close it (``with``)."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@dataclass
class RedisProcess:
    """One ``redis-server`` (or Sentinel) process we started."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self, *, timeout: float = 1.0) -> redis.Redis:
        """A blocking client to this server; close it (``with``)."""
        return sync_client(self.port, timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap: the server vanishes without closing anything cleanly."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5.0)

    def restart(self, timeout: float = 5.0) -> None:
        """Kill the server and start it again, empty, on the same port."""
        self.kill()
        self.process = subprocess.Popen(
            self.command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not _wait_for_ping(self, time.monotonic() + timeout):
            raise RuntimeError("redis-server did not restart:\n" + self.log[-500:])


def _wait_for_ping(proc: RedisProcess, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        try:
            with proc.client(timeout=0.2) as client:
                if client.ping():
                    return True
        except redis.RedisError:
            pass
        time.sleep(0.02)
    return False


def start_redis(
    workdir: Path, *args: str, timeout: float = 5.0, sentinel_conf: str | None = None
) -> RedisProcess:
    """Start ``redis-server`` on a free port in ``workdir/<port>`` and wait for ``PING``.

    ``args`` are extra server options (``"--enable-debug-command", "local"``). With
    ``sentinel_conf`` (a config template with ``{port}``), start a Sentinel instead.
    A port grabbed by someone else between choosing and binding is retried with another.
    """
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server is not on PATH")
    failures: list[str] = []
    for _ in range(3):
        port = free_port()
        directory = workdir / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        base = ["--port", str(port), "--bind", HOST, "--dir", str(directory)]
        base += ["--logfile", str(directory / "redis.log"), "--daemonize", "no"]
        if sentinel_conf is None:
            command = [REDIS_SERVER, *base, "--save", "", "--appendonly", "no", *args]
        else:
            conf = directory / "sentinel.conf"
            conf.write_text(sentinel_conf.format(port=port))
            command = [REDIS_SERVER, str(conf), "--sentinel", *base, *args]
        process = subprocess.Popen(
            command, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        proc = RedisProcess(port, process, directory, command)
        if _wait_for_ping(proc, time.monotonic() + timeout):
            return proc
        failures.append(proc.log[-500:])
        proc.kill()
    raise RuntimeError("redis-server did not start:\n" + "\n---\n".join(failures))


def start_sentinel(
    workdir: Path, master: RedisProcess, *, service: str = "mymaster", timeout: float = 5.0
) -> RedisProcess:
    """Start a Sentinel monitoring ``master`` as ``service`` (quorum 1)."""
    conf = f"port {{port}}\nbind {HOST}\nsentinel monitor {service} {HOST} {master.port} 1\n"
    return start_redis(workdir, timeout=timeout, sentinel_conf=conf)


@dataclass
class RedisClusterProcesses:
    """The master processes of a Redis Cluster we started."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_ok(node: RedisProcess) -> bool:
    try:
        with node.client(timeout=0.5) as client:
            info = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def start_cluster(
    workdir: Path, *, masters: int = 3, timeout: float = 20.0
) -> RedisClusterProcesses:
    """Start ``masters`` cluster-enabled servers, join them (no replicas), wait for ``ok``."""
    if REDIS_CLI is None:
        raise RuntimeError("redis-cli is not on PATH")
    deadline = time.monotonic() + timeout
    nodes: list[RedisProcess] = []
    try:
        for _ in range(masters):
            nodes.append(
                start_redis(
                    workdir,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000",
                )
            )
        subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        while not all(_cluster_ok(node) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok within {timeout} s")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisClusterProcesses(nodes)


@dataclass
class RedisProcesses:
    """Private servers for one test, all stopped by :meth:`stop_all`."""

    workdir: Path
    started: list[RedisProcess] = field(default_factory=list)

    def server(self, *args: str) -> RedisProcess:
        """A standalone server with extra options ``args``."""
        proc = start_redis(self.workdir, *args)
        self.started.append(proc)
        return proc

    def sentinel(self, master: RedisProcess, *, service: str = "mymaster") -> RedisProcess:
        """A Sentinel monitoring ``master`` as ``service``."""
        proc = start_sentinel(self.workdir, master, service=service)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


def machine_redis_problem(url: str = MACHINE_REDIS_URL, timeout: float = 0.5) -> str | None:
    """Why the machine's Redis cannot be used, or ``None`` when it answers ``PING``."""
    try:
        with redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{url.rpartition('@')[2]} unreachable ({type(exc).__name__})"
    return None


def binaries_problem() -> str | None:
    """Why private servers cannot be started, or ``None``."""
    missing = [name for name, path in (("redis-server", REDIS_SERVER), ("redis-cli", REDIS_CLI))
               if path is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


# --- pytest plugin ---------------------------------------------------------------------------

_SKIPS = pytest.StashKey[dict[str, int]]()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(config: pytest.Config, problem: str) -> NoReturn:
    """Skip this test for ``problem`` (counted for the summary line), or fail when ``CI=true``."""
    if in_ci():
        pytest.fail(f"Redis is required when CI=true: {problem}", pytrace=False)
    skips = config.stash.setdefault(_SKIPS, {})
    skips[problem] = skips.get(problem, 0) + 1
    pytest.skip(f"Redis unavailable: {problem}")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    skips = config.stash.get(_SKIPS, {})
    if skips:
        total = sum(skips.values())
        reasons = "; ".join(f"{problem} ({count})" for problem, count in skips.items())
        terminalreporter.write_line(
            f"!!! {total} REDIS TEST(S) SKIPPED: {reasons}. Start Redis on 127.0.0.1:6379 "
            "and install redis-server; with CI=true these fail instead. !!!",
            red=True,
            bold=True,
        )


@pytest.fixture(scope="session")
def _machine_redis_problem() -> str | None:
    return machine_redis_problem()


@pytest.fixture
def machine_redis_url(request: pytest.FixtureRequest, _machine_redis_problem: str | None) -> str:
    """URL of the machine's shared Redis (skips, or fails with ``CI=true``, when down)."""
    if _machine_redis_problem is not None:
        unavailable(request.config, _machine_redis_problem)
    return MACHINE_REDIS_URL


@pytest.fixture
def redis_servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisProcesses]:
    """A factory of private ``redis-server`` processes, stopped after the test."""
    problem = binaries_problem()
    if problem is not None:
        unavailable(request.config, problem)
    processes = RedisProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="session")
def _redis_cluster_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterProcesses]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(request: pytest.FixtureRequest) -> RedisClusterProcesses:
    """A 3-master Redis Cluster shared by the session (started on first use)."""
    problem = binaries_problem()
    if problem is not None:
        unavailable(request.config, problem)
    cluster: RedisClusterProcesses = request.getfixturevalue("_redis_cluster_session")
    return cluster

