"""Run any ASGI app under a real uvicorn server in a background thread, for tests.

``with serve(app) as server:`` binds 127.0.0.1 on a free port (the socket is bound before the
server starts, so there is no race for the port), waits a bounded time for start-up, yields
a :class:`LiveServer` and shuts the server down cleanly, joining its thread. The server runs
its own event loop in that thread: objects the app uses that are bound to an event loop must
be created inside the app (e.g. in its lifespan), not in the test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from gemini_scale.types import ASGIApp

__all__ = ["LiveServer", "serve"]


@dataclass(frozen=True, slots=True)
class LiveServer:
    """A running server: its base URL and the uvicorn objects behind it."""

    url: str
    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread


@contextlib.contextmanager
def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 10.0,
    **config: Any,
) -> Iterator[LiveServer]:
    """Serve ``app`` on ``host``:<free port> for the duration of the ``with`` block.

    ``config`` goes to ``uvicorn.Config`` (defaults: asyncio loop, h11, no access log, no
    logging configuration, lifespan ``auto``, 5 s graceful shutdown).
    """
    options: dict[str, Any] = {
        "loop": "asyncio",
        "http": "h11",
        "ws": "none",
        "lifespan": "auto",
        "access_log": False,
        "log_config": None,
        "log_level": "warning",
        "timeout_graceful_shutdown": 5,
    }
    options.update(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the uvicorn server stopped during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the uvicorn server did not start in {startup_timeout}s")
            time.sleep(0.01)
        yield LiveServer(url=f"http://{host}:{port}", host=host, port=port, server=server,
                         thread=thread)
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(shutdown_timeout)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the uvicorn server did not shut down")


def free_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening on it (for "upstream unreachable" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port
