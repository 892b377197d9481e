"""Numbers and dates in header fields (``Content-Length``, delta-seconds, HTTP-dates), read
without surprises.

``int()`` refuses more than 4,300 digits (``ValueError``) and compiled code cannot turn an
integer past a float's range into a float (``OverflowError``): a client or an upstream that
sends a field of hundreds of digits must get the same answer as for a large number.
"""

from __future__ import annotations

from calendar import timegm
from email.utils import parsedate_tz

__all__ = ["bounded_decimal", "http_date"]

_SHORT_DIGITS = 18


def bounded_decimal(value: bytes | str, ceiling: int) -> int | None:
    """A field that is one non-negative decimal number (ASCII digits only), at most
    ``ceiling``: a larger number, however long, reads as ``ceiling``; ``None`` when the
    field is not such a number."""
    if isinstance(value, str):  # httpx's decoded headers
        if not value.isascii():
            return None
        value = value.encode("ascii")
    if not value.isdigit():  # bytes.isdigit: ASCII digits only, False when empty
        return None
    if len(value) <= _SHORT_DIGITS:  # the usual field: int() of it is cheap
        return min(int(value), ceiling)
    digits = value.lstrip(b"0")
    if len(digits) > len(str(ceiling)):
        return ceiling
    return min(int(digits or b"0"), ceiling)


def http_date(value: bytes | str) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7, its three formats) in wall-clock seconds, or ``None``
    when the field is not one."""
    if isinstance(value, bytes):
        if not value.isascii():
            return None
        value = value.decode("ascii")
    if len(value) > 64 or not value.isascii():
        return None
    try:
        parts = parsedate_tz(value)
        return None if parts is None else float(timegm(parts[:6]) - (parts[9] or 0))
    except (TypeError, ValueError, IndexError, OverflowError):  # a year past 9999, say
        return None
