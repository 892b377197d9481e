"""Response header lists as the layers that read them need them."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["lowercased"]


def lowercased(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` as a list whose names are lower case.

    ASGI asks apps for lower-case names and any iterable of pairs, but apps send
    ``Set-Cookie`` and generators all the same (prometheus-client's ASGI app does). A layer
    that decides from the names (never cache an answer with a cookie) must see them all, in
    one spelling. The list given is returned as it is when it needs no change.
    """
    if type(headers) is not list:
        headers = list(headers)
    for name, _ in headers:
        if not name.islower() and name.lower() != name:  # islower(): no upper, some lower
            return [(name.lower(), value) for name, value in headers]
    return headers
