"""Versions and the bundle that orders them, newest (the head) first."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from gemini_scale.errors import ConfigurationError
from gemini_scale.policies import utc_datetime
from gemini_scale.versioning.changes import VersionChange

__all__ = ["Version", "VersionBundle"]

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Version:
    """One version of an API: its name and the changes that lead to it from the version
    before it. ``Version("2026-03-01", FieldRenamed("user.name", "fullName"))``.

    Options:
        deprecated: when the version was deprecated (answers carry RFC 9745 ``Deprecation``).
        sunset: when it stops being served (RFC 8594 ``Sunset``).
        info: a URL about the deprecation (``Link: <url>; rel="deprecation"``).
        removed: the version is no longer served: its requests get a 404 naming
            ``replacement`` (or the head).
        replacement: the version to move to, named in headers and refusals.
    """

    __slots__ = ("changes", "deprecated", "info", "name", "removed", "replacement", "sunset")

    def __init__(
        self,
        name: str,
        *changes: VersionChange,
        deprecated: dt.datetime | dt.date | None = None,
        sunset: dt.datetime | dt.date | None = None,
        info: str | None = None,
        removed: bool = False,
        replacement: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(f"version name {name!r}: letters, digits, '.', '_', '-'")
        for change in changes:
            if not isinstance(change, VersionChange):
                raise ConfigurationError(f"version {name}: {change!r} is not a VersionChange")
        self.name = name
        self.changes = tuple(changes)
        self.deprecated = utc_datetime(deprecated, "deprecated")
        self.sunset = utc_datetime(sunset, "sunset")
        self.info = info
        self.removed = removed
        self.replacement = replacement

    def __repr__(self) -> str:
        return f"Version({self.name!r}, {len(self.changes)} changes)"


class VersionBundle:
    """The versions of one API, newest first: the first is the **head**, the one the app
    implements. Requests of older versions are migrated up through the changes of every
    newer version; answers back down.

    ``shims`` are changes applied at every version (or, with ``versions=`` set on the
    change, at those versions only) before the version chain: input normalization such as
    Gemini's two spellings of a field.
    """

    __slots__ = ("_chains", "_index", "dated", "head", "shims", "versions")

    def __init__(self, *versions: Version, shims: Sequence[VersionChange] = ()) -> None:
        if not versions:
            raise ConfigurationError("a VersionBundle needs at least one version")
        names = [v.name for v in versions]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"version names must be unique: {names}")
        if versions[-1].changes:
            raise ConfigurationError(
                f"the oldest version ({versions[-1].name}) has nothing before it to change"
            )
        if versions[0].removed:
            raise ConfigurationError("the head version cannot be removed")
        self.versions: tuple[Version, ...] = tuple(versions)
        self.head = versions[0]
        self.shims = tuple(shims)
        self.dated = all(_DATE.fullmatch(n) for n in names)
        if self.dated and names != sorted(names, reverse=True):
            raise ConfigurationError(f"dated versions must be listed newest first: {names}")
        self._index = {v.name: i for i, v in enumerate(versions)}
        for version in versions:
            if version.replacement is not None and version.replacement not in self._index:
                raise ConfigurationError(
                    f"version {version.name}: unknown replacement {version.replacement!r}"
                )
        self._chains: dict[str, tuple[VersionChange, ...]] = {}
        for i, version in enumerate(versions):
            shims_here = tuple(
                s for s in self.shims
                if s.versions is None or version.name in s.versions
            )
            chain = [c for newer in reversed(versions[:i]) for c in newer.changes]
            self._chains[version.name] = (*shims_here, *chain)

    @property
    def names(self) -> tuple[str, ...]:
        """Version names, newest first."""
        return tuple(self._index)

    def get(self, name: str) -> Version | None:
        """The version called ``name``, if any."""
        index = self._index.get(name)
        return None if index is None else self.versions[index]

    def is_older(self, name: str, than: str) -> bool:
        """Whether version ``name`` comes before version ``than``."""
        return self._index[name] > self._index[than]

    def chain(self, name: str) -> tuple[VersionChange, ...]:
        """What a request of version ``name`` goes through, in order: the shims for it,
        then every newer version's changes, oldest first. Answers take it in reverse."""
        return self._chains[name]

    def closest(self, name: str) -> Version | None:
        """For dated bundles: the newest version not after ``name`` (an unknown date
        "waterfalls" to the version in force on that day); ``None`` before the first."""
        if not self.dated or not _DATE.fullmatch(name):
            return None
        try:
            dt.date.fromisoformat(name)
        except ValueError:  # 2026-02-30 looks like a date and is not one
            return None
        for version in self.versions:
            if version.name <= name:
                return version
        return None

    def changelog(self, title: str = "API versions", intro: str = "") -> str:
        """The bundle's changes as a Markdown page, newest version first (``intro``: a
        paragraph under the title)."""
        lines = [f"# {title}", ""]
        if intro:
            lines += [intro, ""]
        for version in self.versions:
            notes = []
            if version is self.head:
                notes.append("head")
            if version.removed:
                notes.append("removed")
            if version.deprecated is not None:
                notes.append(f"deprecated {version.deprecated.date().isoformat()}")
            if version.sunset is not None:
                notes.append(f"sunset {version.sunset.date().isoformat()}")
            suffix = f" ({', '.join(notes)})" if notes else ""
            lines += [f"## {version.name}{suffix}", ""]
            if version.changes:
                lines += [f"- {describe(change)}" for change in version.changes]
            elif version is self.versions[-1]:
                lines.append("- The first version.")
            else:
                lines.append("- The same wire format as the version before it.")
            lines.append("")
        if self.shims:
            lines += ["## Every version", ""]
            for shim in self.shims:
                only = f"(in {', '.join(sorted(shim.versions))}) " if shim.versions else ""
                lines.append(f"- {only}{describe(shim)}")
            lines.append("")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"VersionBundle({', '.join(self.names)})"


def describe(change: VersionChange) -> str:
    """A change's one-line description (its ``description``, else its docstring)."""
    text = getattr(change, "description", "") or type(change).__doc__ or type(change).__name__
    return " ".join(text.split())
