"""Per-policy plans, and request signatures mapped to entry keys.

A hit must cost hashing only. A request's *signature* (its plan, principal by identity,
method, path, raw query, ``Host`` and ``Vary`` values and body digest) is a tuple of values
the request already carries; :class:`Signatures` remembers what each one means (the entry
key and its store name, valid while the engine's tag generations hold), so a repeated
request costs one dictionary lookup. Its *context* (plan, principal, method, path, query: owner,
canonical query, tags and their generations, see :mod:`gemini_scale.caching.keys`) is
remembered apart, so a new request on a known route costs one frame and one SHA-256
(a miss with a new body, host or ``Vary`` values). Memos are bounded and cleared when full.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Collection
from typing import TYPE_CHECKING, Final

from gemini_scale.caching.keys import (
    ALL_TAG,
    KEY_SCHEMA,
    canonical_query,
    entry_key,
    frame,
    model_tag,
    owner_tag,
    text,
)
from gemini_scale.memo import remember
from gemini_scale.policies import CachePolicy, CacheScope, GenerationMode
from gemini_scale.principal import Principal

if TYPE_CHECKING:
    from gemini_scale.caching.engine import CacheEngine

_MEMO_SIZE: Final = 10_000


class Plan:
    """A policy's constants as the middleware applies them (one per policy object)."""

    __slots__ = ("generation", "lengths", "max_bytes", "methods", "policy", "private", "streams",
                 "vary", "vary_set")

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
        keyed = sorted({*vary, *policy.vary} - {"host"})
        self.vary = (b"host", *(h.encode("latin-1") for h in keyed))
        """The request headers keyed: ``Host`` (the authority, RFC 9111 §2), then ``Vary``."""
        self.vary_set = frozenset(self.vary)
        self.lengths = struct.Struct(f"!{1 + len(self.vary)}I")
        """The frame of a key's request parts: the body digest, the host, the ``Vary`` values."""
        self.generation: GenerationMode = policy.generation or generation
        self.streams = streams if policy.streams is None else policy.streams
        self.max_bytes = policy.max_bytes or max_bytes
        self.private = private if policy.scope != "shared" else None


#: Plan, principal (by identity), method, path, raw query, the values of the plan's keyed
#: headers (``Host``, then ``Vary``), body digest.
Signature = tuple[Plan, int, bytes, str, bytes, tuple[bytes | None, ...], bytes]
#: What a signature means: its principal (kept, so its identity stays unique), the entry
#: key and its store name (``None``: the request is not cacheable), and the engine's
#: epoch and the monotonic time until which the key holds.
Known = tuple[Principal | None, str | None, str, int, float]
#: What the parts of a signature other than ``Vary`` values and body mean: the principal,
#: the digest of their framed key material (``None``: not cacheable), the tags, their
#: generations' suffix, and the epoch and time until which the suffix holds.
_Context = tuple[Principal | None, bytes | None, list[str], bytes, int, float]
#: The signature's parts that make its context (its plan, principal, method, path, query).
_ContextKey = tuple[Plan, int, bytes, str, bytes]
_STALE: Final = -1


class Signatures:
    """Request signatures -> entry keys, remembered (see the module docstring).

    A key is the SHA-256 of: the digest of the framed *context* parts (schema, owner,
    method, query, path, tags: what the route and the caller fix), the framed body digest,
    host and ``Vary`` values, a NUL and the tags' generations. Contexts are remembered
    apart, so a request that differs from a known one only in its body, host or ``Vary``
    values costs one frame and one hash."""

    __slots__ = ("_contexts", "_known", "_owners", "engine", "query_params")

    def __init__(self, query_params: Collection[bytes] | None, engine: CacheEngine) -> None:
        self.query_params = query_params
        self.engine = engine
        self._known: dict[Signature, Known] = {}
        self._contexts: dict[_ContextKey, _Context] = {}
        self._owners: dict[int, tuple[Principal, str | None, str | None]] = {}

    def get(self, signature: Signature, principal: Principal | None) -> Known | None:
        """What ``signature`` means, when that is known without the store: remembered and
        still valid, or worked out from its remembered context (a new body, host or ``Vary``
        values on a known route and caller: one frame and one SHA-256). ``None``:
        :meth:`describe`."""
        engine = self.engine
        known = self._known.get(signature)
        if (
            known is not None
            and known[0] is principal
            and known[3] == engine.epoch
            and known[4] > engine.clock.monotonic()
        ):
            return known
        context = self._contexts.get(signature[:5])
        if (
            context is None
            or context[0] is not principal
            or context[4] != engine.epoch  # also a context that is not cacheable
            or context[5] <= engine.clock.monotonic()
        ):
            return None
        return self._key(signature, principal, context)

    async def describe(
        self, signature: Signature, principal: Principal | None, model: str | None
    ) -> Known:
        """What ``signature`` means (``model``: the route's ``{model}`` parameter); may
        read tag generations from the store (raises ``StoreError``)."""
        engine = self.engine
        at: _ContextKey = signature[:5]
        context = self._contexts.get(at)
        if context is None or context[0] is not principal:
            context = self._context(at, principal, model)
        base, tags = context[1], context[2]
        if base is None:
            known: Known = (principal, None, "", engine.epoch, math.inf)
            return remember(self._known, signature, known, _MEMO_SIZE)
        if context[4] != engine.epoch or context[5] <= engine.clock.monotonic():
            epoch = engine.epoch  # before the read: a change during it makes this stale
            suffix, fresh_until = await engine.generations(tags)
            context = (principal, base, tags, suffix, epoch, fresh_until)
            remember(self._contexts, at, context, _MEMO_SIZE)
        return self._key(signature, principal, context)

    def _key(self, signature: Signature, principal: Principal | None, context: _Context) -> Known:
        """The entry key of ``signature`` in its (cacheable, current) ``context``, remembered.

        The SHA-256 of the context's digest, the framed body digest, host (lower case; none:
        empty) and ``Vary`` values (:func:`~gemini_scale.caching.keys.frame`, written out:
        the plan knows how many parts there are), and the tags' generations."""
        plan, body = signature[0], signature[6]
        host, *vary = signature[5]
        values = [b"" if host is None else host.lower()]
        values += [b"-" if value is None else b"+" + value.strip(b" \t") for value in vary]
        material = b"".join((
            context[1],  # type: ignore[arg-type]
            plan.lengths.pack(len(body), *map(len, values)), body, *values, context[3],
        ))
        key = entry_key(material)
        known = (principal, key, self.engine.entry_name(key), context[4], context[5])
        return remember(self._known, signature, known, _MEMO_SIZE)

    def _owner(self, scope: CacheScope, principal: Principal | None) -> str | None:
        """:func:`~gemini_scale.caching.keys.owner_tag`, remembered per principal object."""
        if principal is None or scope == "shared":
            return owner_tag(scope, principal)
        known = self._owners.get(id(principal))
        if known is None or known[0] is not principal:
            known = (principal, owner_tag("principal", principal), owner_tag("tenant", principal))
            remember(self._owners, id(principal), known, _MEMO_SIZE)
        return known[1] if scope == "principal" else known[2]

    def _context(
        self, at: _ContextKey, principal: Principal | None, model: str | None
    ) -> _Context:
        plan, _, method, path, query_string = at
        policy = plan.policy
        owner = self._owner(policy.scope, principal)
        query = canonical_query(query_string, self.query_params)
        context: _Context = (principal, None, [], b"", _STALE, -math.inf)
        if owner is not None and query is not None:
            tags = [ALL_TAG] if owner == ALL_TAG else [ALL_TAG, owner]
            if model:
                tags.append(model_tag(model))
            tags += policy.tags
            parts = [KEY_SCHEMA, text(owner), method, query, text(path)]
            parts += [text(tag) for tag in tags]  # the material names its tags: one key, one set
            base = hashlib.sha256(frame(parts)).digest()
            context = (principal, base, tags, b"", _STALE, -math.inf)
        return remember(self._contexts, at, context, _MEMO_SIZE)
