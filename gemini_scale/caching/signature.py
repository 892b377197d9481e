"""Per-policy plans, and request signatures mapped to key material.

A hit must cost hashing only. A request's *signature* (its plan, principal by identity,
method, path, raw query, ``Vary`` values and body digest) is a tuple of values the request
already carries; :class:`Signatures` remembers what each one means (owner, canonical query,
framed key material and tags, see :mod:`gemini_scale.caching.keys`), so a repeated request
skips the canonical encoding. Memos are bounded and cleared when full.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from gemini_scale.caching.keys import (
    ALL_TAG,
    KEY_SCHEMA,
    canonical_query,
    frame,
    model_tag,
    owner_tag,
    text,
)
from gemini_scale.memo import remember
from gemini_scale.policies import CachePolicy, CacheScope, GenerationMode
from gemini_scale.principal import Principal

_MEMO_SIZE: Final = 10_000


class Plan:
    """A policy's constants as the middleware applies them (one per policy object)."""

    __slots__ = ("generation", "max_bytes", "methods", "policy", "private", "streams", "vary",
                 "vary_set")

    def __init__(
        self,
        policy: CachePolicy,
        *,
        vary: Collection[str],
        generation: GenerationMode,
        streams: bool,
        max_bytes: int,
        private: bytes | None,
    ) -> None:
        methods = set(policy.methods)
        if "GET" in methods:
            methods.add("HEAD")  # served from the GET entry
        self.policy = policy
        self.methods = frozenset(methods)
        self.vary = tuple(h.encode("latin-1") for h in sorted({*vary, *policy.vary}))
        self.vary_set = frozenset(self.vary)
        self.generation: GenerationMode = policy.generation or generation
        self.streams = streams if policy.streams is None else policy.streams
        self.max_bytes = policy.max_bytes or max_bytes
        self.private = private if policy.scope != "shared" else None


#: Plan, principal (by identity), method, path, raw query, ``Vary`` values, body digest.
Signature = tuple[Plan, int, bytes, str, bytes, tuple[bytes | None, ...], bytes]
#: The signature's principal (kept, so its identity stays unique), key material and tags;
#: no material when the request is not cacheable.
Known = tuple[Principal | None, bytes | None, list[str]]


class Signatures:
    """Request signatures -> key material and tags, remembered."""

    __slots__ = ("_known", "_owners", "query_params")

    def __init__(self, query_params: Collection[bytes] | None) -> None:
        self.query_params = query_params
        self._known: dict[Signature, Known] = {}
        self._owners: dict[int, tuple[Principal, str | None, str | None]] = {}

    def get(self, signature: Signature, principal: Principal | None, model: str | None) -> Known:
        """What ``signature`` means (``model``: the route's ``{model}`` parameter)."""
        known = self._known.get(signature)
        if known is None or known[0] is not principal:
            known = self._describe(signature, principal, model)
        return known

    def _owner(self, scope: CacheScope, principal: Principal | None) -> str | None:
        """:func:`~gemini_scale.caching.keys.owner_tag`, remembered per principal object."""
        if principal is None or scope == "shared":
            return owner_tag(scope, principal)
        known = self._owners.get(id(principal))
        if known is None or known[0] is not principal:
            known = (principal, owner_tag("principal", principal), owner_tag("tenant", principal))
            remember(self._owners, id(principal), known, _MEMO_SIZE)
        return known[1] if scope == "principal" else known[2]

    def _describe(
        self, signature: Signature, principal: Principal | None, model: str | None
    ) -> Known:
        plan, _, method, path, query_string, vary, body = signature
        policy = plan.policy
        owner = self._owner(policy.scope, principal)
        query = canonical_query(query_string, self.query_params)
        found: Known = (principal, None, [])
        if owner is not None and query is not None:
            tags = [ALL_TAG] if owner == ALL_TAG else [ALL_TAG, owner]
            if model:
                tags.append(model_tag(model))
            tags += policy.tags
            parts = [KEY_SCHEMA, text(owner), method, query, body, text(path)]
            parts += [b"-" if value is None else b"+" + value.strip(b" \t") for value in vary]
            parts += [text(tag) for tag in tags]  # the material names its tags: one key, one set
            found = (principal, frame(parts), tags)
        remember(self._known, signature, found, _MEMO_SIZE)
        return found
