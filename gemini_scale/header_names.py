"""Response header lists as the layers that read them need them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

__all__ = ["lowercased"]


def lowercased(headers: Iterable[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` as a list of ``(name, value)`` tuples whose names are lower case.

    ASGI asks apps for lower-case names and allows any iterable of pairs, tuples or 2-item
    lists; apps send ``Set-Cookie`` and generators all the same (prometheus-client's ASGI
    app does). A layer that decides from the names (never cache an answer with a cookie)
    must see them all, in one spelling and one form. The list given is returned as it is
    when it needs no change.
    """
    if type(headers) is not list:
        headers = list(headers)
    for pair in headers:
        name = pair[0]
        # islower(): no upper case, some lower case
        if type(pair) is not tuple or (not name.islower() and name.lower() != name):
            return [(bytes(name).lower(), bytes(value)) for name, value in headers]
    return cast("list[tuple[bytes, bytes]]", headers)
