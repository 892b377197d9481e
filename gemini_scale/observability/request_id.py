"""Request ids: the trusted proxy's ``X-Request-ID``, or one generated here (DESIGN.md §4)."""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable
from typing import Final

from gemini_scale.keys import TrustedProxies
from gemini_scale.types import Scope

__all__ = ["REQUEST_ID_HEADER", "RequestIds"]

REQUEST_ID_HEADER: Final = b"x-request-id"
#: What an id from a proxy may look like: a UUID, a hex digest, ``trace-123:abc``... Anything
#: else (spaces, quotes, control bytes: log injection) is replaced.
_VALID: Final = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


class RequestIds:
    """Pick a request's id: the ``X-Request-ID`` of a trusted proxy when it is well formed,
    else a new one (32 hex digits: a random prefix per process, then a counter). A value
    from any other client is replaced: it would let a client forge or collide ids in the
    logs."""

    __slots__ = ("__weakref__", "_count", "_prefix", "any_trusted", "trusted")

    def __init__(self, trusted_proxies: TrustedProxies | Iterable[str] = ()) -> None:
        self.trusted = (
            trusted_proxies if isinstance(trusted_proxies, TrustedProxies)
            else TrustedProxies(trusted_proxies)
        )
        #: Whether any proxy is trusted (otherwise every id is new).
        self.any_trusted = bool(self.trusted)
        # A random 64-bit prefix per instance (so per worker process) and a counter: unique
        # without a system call per request. Ids are identifiers, not secrets.
        self._reseed()
        _instances.add(self)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex().encode()
        self._count = int.from_bytes(os.urandom(4), "big")

    def __call__(self, scope: Scope) -> tuple[bytes, bool]:
        """``(id, taken)``: the id, and whether it is the proxy's own (already in the
        request's headers)."""
        found = self.from_proxy(scope) if self.any_trusted else None
        if found is not None:
            return found, True
        return self.new(), False

    def from_proxy(self, scope: Scope) -> bytes | None:
        """The well-formed ``X-Request-ID`` of a trusted proxy, if the peer is one."""
        if self.from_trusted_peer(scope):
            found = None  # the last one: a proxy that appends its own id wins over the client
            for name, value in scope["headers"]:
                if name == REQUEST_ID_HEADER:
                    found = value
            if found is not None and _VALID.fullmatch(found):
                return bytes(found)
        return None

    def from_trusted_peer(self, scope: Scope) -> bool:
        """Whether the request's peer is one of the trusted proxies."""
        client = scope.get("client")
        return self.trusted.trusts_peer(client[0] if client else None)

    def new(self) -> bytes:
        """A new id."""
        self._count += 1
        return self._prefix + b"%016x" % self._count


_instances: weakref.WeakSet[RequestIds] = weakref.WeakSet()


def _reseed_after_fork() -> None:
    # A worker forked from a parent that built the app (gunicorn --preload) must not
    # continue the parent's sequence: every worker would hand out the same ids.
    for ids in list(_instances):
        ids._reseed()


os.register_at_fork(after_in_child=_reseed_after_fork)
