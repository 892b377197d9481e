"""Service-account API keys (``x-goog-api-key``), stored only as SHA-256 digests.

An operator generates a random key, gives it to the service account and stores only
:meth:`APIKeys.hash_key` of it. A plain, unsalted SHA-256 is the right hash here: keys are
random strings with at least 128 bits of entropy (not passwords), so there is nothing to
guess, and one digest per request keeps the check cheap.

Lookup hashes the presented key and looks the digest up in a dict. That comparison is not
constant-time, and need not be: its timing can at best reveal how much of the *digest* of
the attacker's own guess matches a stored digest, and SHA-256's preimage resistance makes
that useless for building a key that hashes to a stored digest.

Environment syntax (:meth:`APIKeys.from_env`): entries separated by ``;`` or newlines, each
``<digest>=<subject>[:<scopes>[:<tenant>]]`` where ``<digest>`` is ``sha256:<64 hex>`` (or the
bare 64 hex digits) and ``<scopes>`` is space-separated::

    sha256:9f86...0f08=batch-job:gemini.generate gemini.read;
    sha256:6030...5b4c=reporting:gemini.read:acme

Subjects and tenants cannot contain ``:``, ``;``, ``=`` or whitespace; each entry's client id
is its subject.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gemini_scale.errors import ConfigurationError
from gemini_scale.principal import Principal

__all__ = ["APIKeyEntry", "APIKeys"]

#: Longest key accepted, in bytes; longer ones are refused before hashing.
_MAX_KEY_LENGTH = 512

#: A key is visible ASCII (RFC 9110 ``VCHAR``): it travels in a header, and anything else
#: (spaces, controls, Latin-1 decoded bytes) cannot be a key an operator issued.
_KEY = re.compile(rf"[\x21-\x7e]{{1,{_MAX_KEY_LENGTH}}}")
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_NAME = re.compile(r"[^\s:;=]+")
_ENTRY_SEPARATOR = re.compile(r"[;\n]")
_SYNTAX = "expected '<sha256 digest>=<subject>[:<scopes>[:<tenant>]]'"


@dataclass(frozen=True, kw_only=True)
class APIKeyEntry:
    """Who holds an API key, and what it grants."""

    subject: str
    """The service account; the principal's ``subject``."""
    scopes: frozenset[str] = frozenset()
    """Scopes the key grants."""
    tenant: str | None = None
    """The tenant the account belongs to, if tenants are used."""
    client_id: str | None = None
    """The principal's ``client_id``; the subject when unset."""

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject:
            raise ConfigurationError("An API key entry needs a non-empty subject.")
        if not isinstance(self.scopes, frozenset) or not all(
            isinstance(s, str) and s and not any(c.isspace() for c in s) for s in self.scopes
        ):
            raise ConfigurationError(
                "An API key entry's scopes must be a frozenset of non-empty strings without "
                "whitespace."
            )


class APIKeys:
    """A fixed set of API keys, known by digest, mapped to principals."""

    ISSUER = "urn:gemini-scale:api-key"
    """The ``issuer`` of every principal an API key establishes."""

    def __init__(self, entries: Mapping[str, APIKeyEntry]) -> None:
        """Keys of ``entries`` are digests (``sha256:<hex>`` or bare hex), never plaintext keys.

        Raises:
            ConfigurationError: A key is not a SHA-256 digest, or one digest appears twice.
                The message names the entry's position, never its key.
        """
        self._principals: dict[str, Principal] = {}
        for position, (digest, entry) in enumerate(entries.items(), start=1):
            normalized = _normalize_digest(digest, position)
            if not isinstance(entry, APIKeyEntry):
                raise ConfigurationError(f"API key entry #{position} is not an APIKeyEntry.")
            if normalized in self._principals:
                raise ConfigurationError(f"API key entry #{position} repeats an earlier digest.")
            self._principals[normalized] = Principal(
                issuer=self.ISSUER,
                subject=entry.subject,
                client_id=entry.client_id or entry.subject,
                tenant=entry.tenant,
                scopes=entry.scopes,
            )

    def __len__(self) -> int:
        return len(self._principals)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self)} keys>)"

    @staticmethod
    def hash_key(key: str) -> str:
        """The digest an operator stores for ``key``: ``sha256:<hex>``.

        Raises:
            ConfigurationError: ``key`` could never be accepted by :meth:`lookup` (empty,
                longer than 512 bytes, or not visible ASCII).
        """
        if not _KEY.fullmatch(key):
            raise ConfigurationError(
                f"An API key must be 1 to {_MAX_KEY_LENGTH} visible ASCII characters."
            )
        return "sha256:" + _digest(key)

    @classmethod
    def from_env(cls, value: str) -> APIKeys:
        """Parse the environment syntax described in this module's docstring.

        Raises:
            ConfigurationError: Bad syntax, a plaintext key or no entries at all. Messages
                name the entry's position, never its content.
        """
        entries: dict[str, APIKeyEntry] = {}
        raw_entries = [e.strip() for e in _ENTRY_SEPARATOR.split(value)]
        for position, raw in enumerate((e for e in raw_entries if e), start=1):
            digest, sep, holder = raw.partition("=")
            if not sep:
                raise ConfigurationError(f"API key entry #{position}: {_SYNTAX}.")
            normalized = _normalize_digest(digest.strip(), position)
            if normalized in entries:
                raise ConfigurationError(f"API key entry #{position} repeats an earlier digest.")
            entries[normalized] = _parse_holder(holder, position)
        if not entries:
            raise ConfigurationError(f"The API key configuration has no entries: {_SYNTAX}.")
        return cls(entries)

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None`` for an unknown or impossible key."""
        if not _KEY.fullmatch(key):
            return None
        return self._principals.get(_digest(key))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _normalize_digest(digest: str, position: int) -> str:
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        # Never echo the value: it may well be a plaintext key pasted by mistake.
        raise ConfigurationError(
            f"API key entry #{position}: the key must be a SHA-256 digest "
            "('sha256:<64 hex digits>'), not a plaintext key; compute it with "
            "APIKeys.hash_key()."
        )
    return match.group(1).lower()


def _parse_holder(holder: str, position: int) -> APIKeyEntry:
    """``<subject>[:<scopes>[:<tenant>]]`` as an entry."""
    parts = holder.split(":")
    if len(parts) > 3:
        raise ConfigurationError(f"API key entry #{position}: {_SYNTAX}.")
    subject = parts[0].strip()
    scopes = frozenset(parts[1].split()) if len(parts) > 1 else frozenset()
    tenant = parts[2].strip() if len(parts) > 2 else None
    if not _NAME.fullmatch(subject) or (tenant is not None and not _NAME.fullmatch(tenant)):
        raise ConfigurationError(f"API key entry #{position}: {_SYNTAX}.")
    if any("=" in s for s in scopes):
        raise ConfigurationError(f"API key entry #{position}: {_SYNTAX}.")
    return APIKeyEntry(subject=subject, scopes=scopes, tenant=tenant)
