"""Deprecation, sunset and removal: of versions, of routes (``@version``), as headers or a 404."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import format_datetime, parsedate_to_datetime
from typing import Final

from gemini_scale.policies import VersionPolicy, utc_datetime
from gemini_scale.versioning.bundle import Version, VersionBundle

__all__ = [
    "Lifecycle",
    "deprecation_headers",
    "deprecation_value",
    "encode_headers",
    "merge_deprecations",
    "route_lifecycle",
    "sunset_value",
    "version_headers",
]

Headers = tuple[tuple[bytes, bytes], ...]


def deprecation_value(when: dt.datetime | dt.date) -> str:
    """RFC 9745 ``Deprecation``: a structured-field date, ``@<epoch seconds>``."""
    moment = utc_datetime(when, "deprecated")
    assert moment is not None
    return f"@{int(moment.timestamp())}"


def sunset_value(when: dt.datetime | dt.date) -> str:
    """RFC 8594 ``Sunset``: an HTTP-date."""
    moment = utc_datetime(when, "sunset")
    assert moment is not None
    return format_datetime(moment.astimezone(dt.UTC), usegmt=True)


def deprecation_headers(
    deprecated: dt.datetime | None,
    sunset: dt.datetime | None,
    info: str | None,
    successor: str | None,
) -> list[tuple[str, str]]:
    """``Deprecation``, ``Sunset`` and the ``Link`` headers (``rel="deprecation"`` to
    ``info``, ``rel="successor-version"`` to ``successor``) of something deprecated;
    nothing for something that is not."""
    headers: list[tuple[str, str]] = []
    if deprecated is not None:
        headers.append(("deprecation", deprecation_value(deprecated)))
    if sunset is not None:
        headers.append(("sunset", sunset_value(sunset)))
    if info is not None:
        headers.append(("link", f'<{info}>; rel="deprecation"'))
    if successor is not None and headers:
        headers.append(("link", f'<{successor}>; rel="successor-version"'))
    return headers


def encode_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """Raw ASGI header pairs."""
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers)


def version_headers(version: Version, path_prefixed: bool) -> Headers:
    """What every answer of ``version`` carries when it is deprecated. A path-prefixed
    version names its replacement as ``</name>``; a dated one has no URL to link to (its
    replacement is named in refusals)."""
    successor = (
        f"/{version.replacement}" if path_prefixed and version.replacement is not None else None
    )
    return encode_headers(
        deprecation_headers(version.deprecated, version.sunset, version.info, successor)
    )


def merge_deprecations(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """``headers`` with one ``Deprecation`` (the earliest) and one ``Sunset`` (the
    earliest), as RFC 9745 and RFC 8594 allow one each, when several sources (a version, a
    route, a model) deprecate one answer; ``Link`` fields are kept, without repeats."""
    out: list[tuple[bytes, bytes]] = []
    deprecation: tuple[int, bytes] | None = None
    sunset: tuple[dt.datetime, bytes] | None = None
    for name, value in headers:
        if name == b"deprecation" and value[:1] == b"@" and value[1:].isdigit():
            moment = int(value[1:])
            if deprecation is None or moment < deprecation[0]:
                deprecation = (moment, value)
        elif name == b"sunset":
            try:
                when = parsedate_to_datetime(value.decode("latin-1"))
            except (TypeError, ValueError):
                out.append((name, value))
                continue
            if sunset is None or when < sunset[0]:
                sunset = (when, value)
        elif (name, value) not in out:
            out.append((name, value))
    if deprecation is not None:
        out.append((b"deprecation", deprecation[1]))
    if sunset is not None:
        out.append((b"sunset", sunset[1]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What a route's :class:`VersionPolicy` means for one version: refuse, or headers."""

    refusal: str | None
    """The 404 message when the route does not exist in that version, with ``{label}``
    where the request's method and route go (filled in per request)."""
    headers: Headers


LABEL: Final = "{label}"


def route_lifecycle(
    policy: VersionPolicy, version: str | None, bundle: VersionBundle | None
) -> Lifecycle:
    """Apply ``policy`` to a request of ``version`` (``None``: the request is unversioned, so
    only deprecation headers apply)."""
    if version is not None and bundle is not None:
        if policy.added is not None and bundle.is_older(version, policy.added):
            return Lifecycle(
                f"{LABEL} is not available in API version {version}; it was added in "
                f"{policy.added}.",
                (),
            )
        if policy.removed is not None and not bundle.is_older(version, policy.removed):
            instead = f" Use {policy.replacement} instead." if policy.replacement else ""
            return Lifecycle(
                f"{LABEL} was removed in API version {policy.removed}.{instead}", ()
            )
    deprecated, sunset = policy.deprecated, policy.sunset
    assert deprecated is None or isinstance(deprecated, dt.datetime)  # VersionPolicy made it so
    assert sunset is None or isinstance(sunset, dt.datetime)
    return Lifecycle(
        None,
        encode_headers(deprecation_headers(deprecated, sunset, policy.info, policy.replacement)),
    )
