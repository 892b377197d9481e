"""Reuse of a few redis-py connections for the store's commands (scripts, ``GET``, ``SET``...).

Why not the pool alone: redis-py's asyncio pool takes a lock, records observability counters
and checks the socket for unread data on *every* checkout and release. Measured here, that is
about a fifth of the client CPU of one ``EVALSHA`` (bench/README.md, "redis-floor"), on the
path every rate-limited request and every cache hit takes. The connections are redis-py's
own, from the store's pool, and every command is packed and its reply read by redis-py
(``pack_command``, ``read_response``); only the per-use checkout is skipped, and it is safe to
skip because of three rules:

- a connection goes back to the idle list only after its reply was read in full;
- any failure (including cancellation, and ``READONLY`` from a demoted master, but not
  other error replies, which leave it sound) disconnects it and returns it to the pool, which
  reconnects it on its next checkout; a failure other than a cancellation drops every idle
  connection too (after a failover they all point at the old master, and the pool only
  re-points the connections it holds itself); whatever goes back to the pool goes back whole
  even when the caller is cancelled meanwhile;
- an idle connection whose peer has closed it (the event loop has already seen the end of
  its stream, which costs no system call to ask) is dropped, not used; one idle for longer
  than ``max_idle`` seconds goes back to the pool; one the pool hands out is checked the
  same way and reopened if its peer closed it (redis-py 8.1's pool hands it out anyway).

The command is written to the connection's stream here rather than by redis-py's
``send_packed_command``, which bounds every write with ``asyncio.wait_for``: on Python 3.11
that runs the write as a task of its own, a loop iteration later, and costs about a quarter
of a round trip's client CPU (measured here: 52 against 72 µs per ``EVALSHA``). A command
this size goes to the kernel at once; the socket timeout still bounds a write that must wait
(a full socket buffer), and a connection redis-py has not opened, or whose stream is closing,
goes through ``send_packed_command`` as before. A write or a read that fails (a timeout, a
reset, a cancellation) aborts the stream with what it still buffers, where redis-py would
close it and so still send the rest of a big command, or a TLS stream's whole backlog (its
drain does not wait for the socket beneath): a timed-out command never reaches the server
whole later on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection, ConnectionPool


class ReusedConnections:
    """Runs single commands on connections kept out of a redis-py pool between uses.

    :param pool: the client's pool; it must allow ``keep`` connections beyond the number of
        commands that can be in flight at once.
    :param keep: how many idle connections are kept.
    :param max_idle: seconds after which an idle connection is handed back to the pool.
    """

    def __init__(self, pool: ConnectionPool, *, keep: int, max_idle: float = 5.0) -> None:
        self._pool = pool
        self._keep = keep
        self._max_idle = max_idle
        self._idle: list[tuple[AbstractConnection, float]] = []
        self._shas: dict[str, str] = {}

    async def execute(self, *args: Any) -> Any:
        """Send one command and read its reply (redis-py's raw reply: no response callbacks)."""
        connection = await self._checkout()
        try:
            reply = await _round_trip(connection, args)
        except BaseException as exc:
            await self._failed(connection, exc)
            raise
        await self._checkin(connection)
        return reply

    async def evalsha(self, lua: str, keys: list[str], args: list[Any]) -> Any:
        """``EVALSHA`` of ``lua``; on ``NOSCRIPT`` (a flushed or failed-over server) the script
        is loaded and sent again: the refused call did not run, so this is not a retry."""
        sha = self._shas.get(lua)
        if sha is None:
            sha = self._shas[lua] = hashlib.sha1(lua.encode(), usedforsecurity=False).hexdigest()
        connection = await self._checkout()
        try:
            try:
                reply = await _round_trip(connection, ("EVALSHA", sha, len(keys), *keys, *args))
            except redis_errors.NoScriptError:
                await _round_trip(connection, ("SCRIPT", "LOAD", lua))
                reply = await _round_trip(connection, ("EVALSHA", sha, len(keys), *keys, *args))
        except BaseException as exc:
            await self._failed(connection, exc)
            raise
        await self._checkin(connection)
        return reply

    async def _checkout(self) -> AbstractConnection:
        now = time.monotonic()
        # ``self._idle`` is read afresh each time: a failure elsewhere, while this awaits a
        # discard, swaps it for an empty list and discards what the old one held itself.
        while self._idle:
            connection, since = self._idle.pop()
            if _closed_by_peer(connection):
                await self._hand_back([connection], disconnect=True)
            elif now - since > self._max_idle:  # stale: back to the pool, checked on its way out
                await self._hand_back([connection], disconnect=False)
            else:
                return connection
        fresh: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        if _closed_by_peer(fresh):
            # redis-py 8.1's pool looks at the socket but, while its maintenance
            # notifications are "auto" (the default), hands it out anyway: one the server
            # closed meanwhile is closed here, and opened again by its first command.
            await fresh.disconnect(nowait=True)
        return fresh

    async def _checkin(self, connection: AbstractConnection) -> None:
        if len(self._idle) < self._keep:
            self._idle.append((connection, time.monotonic()))  # no await: the common path
        else:
            await self._hand_back([connection], disconnect=False)

    async def _failed(self, connection: AbstractConnection, exc: BaseException) -> None:
        if isinstance(exc, redis_errors.ResponseError) and not isinstance(
            exc, redis_errors.ReadOnlyError
        ):
            # An error reply (out of memory, a wrong type), read in full: the connection is
            # sound. READONLY is not: the server it points at is no longer the master.
            await self._checkin(connection)
            return
        dropped = [connection]
        if not isinstance(exc, asyncio.CancelledError):
            idle, self._idle = self._idle, []
            dropped += [kept for kept, _ in idle]
        await self._hand_back(dropped, disconnect=True)

    async def _hand_back(self, connections: list[AbstractConnection], *, disconnect: bool) -> None:
        """Return ``connections`` to the pool (disconnected first, if asked), all of them
        even if the caller is cancelled meanwhile (a timeout around a store operation):
        one left out would count as in use forever, and the pool would run dry."""
        await asyncio.shield(_release_all(self._pool, connections, disconnect=disconnect))

    async def aclose(self) -> None:
        """Hand every idle connection back to the pool (which the client then closes)."""
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            await self._pool.release(connection)


def _closed_by_peer(connection: AbstractConnection) -> bool:
    """Whether the server (or a proxy) closed the connection while it was idle, from what the
    event loop already knows. redis-py keeps its stream in private attributes: if they are
    ever missing, the connection is treated as closed: dropped, or reopened by its next command."""
    reader = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        return True
    return reader.at_eof() or reader.exception() is not None or writer.is_closing()


async def _round_trip(connection: AbstractConnection, args: tuple[Any, ...]) -> Any:
    packed = connection.pack_command(*args)
    writer = getattr(connection, "_writer", None)
    if type(writer) is asyncio.StreamWriter and not writer.is_closing():
        await _write(connection, writer, packed)
    else:  # not opened yet, or closing: redis-py connects it, or reports the failure
        await connection.send_packed_command(packed, check_health=False)
        writer = getattr(connection, "_writer", None)
    try:
        return await connection.read_response()
    except redis_errors.ResponseError:
        raise  # an error reply, read in full: the connection is sound
    except BaseException:
        # redis-py closes the stream, which would still send what it buffers (the rest of a
        # big command, a TLS stream's whole backlog): dropped instead, the timed-out command
        # never reaches the server whole.
        if isinstance(writer, asyncio.StreamWriter):
            writer.transport.abort()
        raise


async def _write(
    connection: AbstractConnection, writer: asyncio.StreamWriter, packed: list[bytes]
) -> None:
    """Write a packed command to the connection's open stream (see the module's docstring
    for why not through redis-py), waiting at most its socket timeout for buffer room."""
    try:
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():  # the kernel did not take it all
            async with asyncio.timeout(connection.socket_timeout):
                await writer.drain()
    except BaseException as exc:
        # Dropped at once with what it still buffers: a plain close would first wait for
        # the server to read it all, holding the socket open meanwhile.
        writer.transport.abort()
        if isinstance(exc, TimeoutError):  # (tested first: it is an OSError)
            raise redis_errors.TimeoutError("Timeout writing to socket") from None
        if isinstance(exc, OSError):
            raise redis_errors.ConnectionError(f"Error while writing to socket: {exc}") from exc
        raise


async def _release_all(
    pool: ConnectionPool, connections: list[AbstractConnection], *, disconnect: bool
) -> None:
    for connection in connections:
        if disconnect:
            with contextlib.suppress(Exception):  # it is dropped either way
                await connection.disconnect(nowait=True)
        await pool.release(connection)
