"""Checks of configured URLs, shared by the settings and the components that take them."""

from __future__ import annotations

from urllib.parse import urlsplit


def http_url_problem(value: str, *, base: bool = False) -> str | None:
    """What is wrong with ``value`` as an ``http(s)`` URL (``None``: nothing). ``base``: it
    is a base other paths are appended to, so it carries no query or fragment either.

    The message never repeats the value: a URL may hold a password.
    """
    if not value.isprintable() or " " in value:
        # urlsplit drops surrounding blanks and tabs or newlines anywhere: the URL would
        # then be used otherwise than it was written (an issuer is compared exactly).
        return "must be a URL without spaces or control characters"
    try:
        parts = urlsplit(value)
        port = parts.port  # reads it: a port that is not a number is refused here
    except ValueError:
        return "must be a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if port == 0:
        return "must not name port 0"
    if base and (parts.query or parts.fragment or "?" in value or "#" in value):
        return "must not carry a query or a fragment"
    return None
