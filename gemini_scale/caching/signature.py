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
import itertools
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
_PLAN_SERIALS: Final = itertools.count(1)


class Plan:
    """A policy's constants as the middleware applies them (one per policy object)."""

    __slots__ = ("generation", "lengths", "max_bytes", "methods", "policy", "private", "serial",
                 "streams", "vary", "vary_set")

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
        self.serial = next(_PLAN_SERIALS)
        """A number no other plan of this process has: what signatures name the plan by."""
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


#: Plan (its :attr:`~Plan.serial`), principal (by identity), method, path, raw query, the
#: values of the plan's keyed headers (``Host``, then ``Vary``), body digest.
Signature = tuple[int, int, bytes, str, bytes, tuple[bytes | None, ...], bytes]
#: What a signature means: its principal's serial (see :class:`Signatures`), the entry key
#: and its store name (``None``: the request is not cacheable), and the engine's epoch and
#: the monotonic time until which the key holds.
Known = tuple[int, str | None, str, int, float]
#: What the parts of a signature other than ``Vary`` values and body mean: the principal's
#: serial, the digest of their framed key material (``None``: not cacheable), the tags,
#: their generations' suffix, and the epoch and time until which the suffix holds.
_Context = tuple[int, bytes | None, tuple[str, ...], bytes, int, float]
#: The signature's parts that make its context (its plan, principal, method, path, query).
_ContextKey = tuple[int, int, bytes, str, bytes]
#: A remembered principal: the object (kept, so its identity stays unique meanwhile), its
#: owner tags for the ``principal`` and ``tenant`` scopes, and its serial.
_Owner = tuple[Principal, str | None, str | None, int]
_STALE: Final = -1
#: The serial of "no principal" (``None``, whose identity never changes).
_ANONYMOUS: Final = 0
#: What :meth:`Signatures._serial` answers for a principal not remembered (matches nothing).
_UNKNOWN: Final = -1


class Signatures:
    """Request signatures -> entry keys, remembered (see the module docstring).

    A key is the SHA-256 of: the digest of the framed *context* parts (schema, owner,
    method, query, path, tags: what the route and the caller fix), the framed body digest,
    host and ``Vary`` values, a NUL and the tags' generations. Contexts are remembered
    apart, so a request that differs from a known one only in its body, host or ``Vary``
    values costs one frame and one hash.

    The memos hold numbers, bytes and strings only, never the principal or plan objects:
    the garbage collector stops tracking such tuples, where objects in them would keep two
    tuples per new request tracked until the memo is cleared (and every full collection
    walking them). A principal is remembered once, with a serial number never given twice;
    a signature (which names the principal by identity) holds only if the principal now
    behind that identity has the serial it was worked out for."""

    __slots__ = ("_contexts", "_known", "_next_serial", "_owners", "engine", "query_params")

    def __init__(self, query_params: Collection[bytes] | None, engine: CacheEngine) -> None:
        self.query_params = query_params
        self.engine = engine
        self._known: dict[Signature, Known] = {}
        self._contexts: dict[_ContextKey, _Context] = {}
        self._owners: dict[int, _Owner] = {}
        self._next_serial = _ANONYMOUS + 1

    def get(self, signature: Signature, principal: Principal | None, plan: Plan) -> Known | None:
        """What ``signature`` means, when that is known without the store: remembered and
        still valid, or worked out from its remembered context (a new body, host or ``Vary``
        values on a known route and caller: one frame and one SHA-256). ``None``:
        :meth:`describe`."""
        engine = self.engine
        serial = self._serial(principal)
        known = self._known.get(signature)
        if (
            known is not None
            and known[0] == serial
            and known[3] == engine.epoch
            and known[4] > engine.clock.monotonic()
        ):
            return known
        context = self._contexts.get(signature[:5])
        if (
            context is None
            or context[0] != serial
            or context[4] != engine.epoch  # also a context that is not cacheable
            or context[5] <= engine.clock.monotonic()
        ):
            return None
        return self._key(signature, plan, context)

    async def describe(
        self, signature: Signature, principal: Principal | None, plan: Plan, model: str | None
    ) -> Known:
        """What ``signature`` means (``model``: the route's ``{model}`` parameter); may
        read tag generations from the store (raises ``StoreError``)."""
        engine = self.engine
        owner = self._owner(principal)
        serial = _ANONYMOUS if owner is None else owner[3]
        at: _ContextKey = signature[:5]
        context = self._contexts.get(at)
        if context is None or context[0] != serial:
            context = self._context(at, principal, owner, plan, model)
        base, tags = context[1], context[2]
        if base is None:
            known: Known = (serial, None, "", engine.epoch, math.inf)
            return remember(self._known, signature, known, _MEMO_SIZE)
        if context[4] != engine.epoch or context[5] <= engine.clock.monotonic():
            epoch = engine.epoch  # before the read: a change during it makes this stale
            suffix, fresh_until = await engine.generations(tags)
            context = (serial, base, tags, suffix, epoch, fresh_until)
            remember(self._contexts, at, context, _MEMO_SIZE)
        return self._key(signature, plan, context)

    def _key(self, signature: Signature, plan: Plan, context: _Context) -> Known:
        """The entry key of ``signature`` in its (cacheable, current) ``context``, remembered.

        The SHA-256 of the context's digest, the framed body digest, host (lower case; none:
        empty) and ``Vary`` values (:func:`~gemini_scale.caching.keys.frame`, written out:
        the plan knows how many parts there are), and the tags' generations."""
        body, fields = signature[6], signature[5]
        host = fields[0]
        base: bytes = context[1]  # type: ignore[assignment]
        parts = [base, b"", body, b"" if host is None else host.lower()]
        lengths = [len(body), len(parts[3])]
        for i in range(1, len(fields)):  # indexed: cheaper compiled than map/star-unpacking
            value = fields[i]
            part = b"-" if value is None else b"+" + value.strip(b" \t")
            parts.append(part)
            lengths.append(len(part))
        parts[1] = plan.lengths.pack(*lengths)
        parts.append(context[3])
        material = b"".join(parts)
        key = entry_key(material)
        known = (context[0], key, self.engine.entry_name(key), context[4], context[5])
        return remember(self._known, signature, known, _MEMO_SIZE)

    def _serial(self, principal: Principal | None) -> int:
        """``principal``'s serial, :data:`_UNKNOWN` when it is not remembered."""
        if principal is None:
            return _ANONYMOUS
        owner = self._owners.get(id(principal))
        return owner[3] if owner is not None and owner[0] is principal else _UNKNOWN

    def _owner(self, principal: Principal | None) -> _Owner | None:
        """``principal`` remembered (its owner tags and serial); ``None`` for no principal."""
        if principal is None:
            return None
        owner = self._owners.get(id(principal))
        if owner is None or owner[0] is not principal:
            serial = self._next_serial
            self._next_serial = serial + 1
            owner = (
                principal, owner_tag("principal", principal), owner_tag("tenant", principal),
                serial,
            )
            remember(self._owners, id(principal), owner, _MEMO_SIZE)
        return owner

    def _context(
        self, at: _ContextKey, principal: Principal | None, owned: _Owner | None, plan: Plan,
        model: str | None,
    ) -> _Context:
        _, _, method, path, query_string = at
        policy = plan.policy
        scope: CacheScope = policy.scope
        if owned is None or scope == "shared":
            owner = owner_tag(scope, principal)
        else:
            owner = owned[1] if scope == "principal" else owned[2]
        query = canonical_query(query_string, self.query_params)
        serial = _ANONYMOUS if owned is None else owned[3]
        context: _Context = (serial, None, (), b"", _STALE, -math.inf)
        if owner is not None and query is not None:
            tags = [ALL_TAG] if owner == ALL_TAG else [ALL_TAG, owner]
            if model:
                tags.append(model_tag(model))
            tags += policy.tags
            parts = [KEY_SCHEMA, text(owner), method, query, text(path)]
            parts += [text(tag) for tag in tags]  # the material names its tags: one key, one set
            base = hashlib.sha256(frame(parts)).digest()
            context = (serial, base, tuple(tags), b"", _STALE, -math.inf)
        return remember(self._contexts, at, context, _MEMO_SIZE)
