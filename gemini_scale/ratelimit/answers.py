"""What a limited response says: RateLimit headers and the 429 in Google's envelope."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gemini_scale.memo import remember
from gemini_scale.ratelimit.engine import Decision, Limit


def limit_names(limits: Sequence[Limit], prefix: str = "") -> dict[Limit, str]:
    """``requests`` / ``tokens`` when a kind has one limit, ``requests-60s`` when several;
    ``prefix`` tells limiters apart (``ip-requests``)."""
    kinds = [limit.kind for limit in limits]
    return {
        limit: prefix + (limit.kind if kinds.count(limit.kind) == 1 else limit.name)
        for limit in limits
    }


#: id(limits) -> (limits, prefix, {id(limit): b'"name";r='}, RateLimit-Policy items); limits
#: are per-policy constants, held in the entry so their ids cannot be reused meanwhile.
#: (Keyed by the id alone, an int: hashing a tuple key costs more than the rest. A limiter
#: with another prefix and the same limits object replaces the entry.)
_POLICY_CACHE: dict[int, tuple[Sequence[Limit], str, dict[int, bytes], bytes]] = {}
_POLICY_CACHE_SIZE = 1024


def _policy_items(prefix: str, limits: Sequence[Limit]) -> tuple[dict[int, bytes], bytes]:
    key = id(limits)
    found = _POLICY_CACHE.get(key)
    if found is not None and found[0] is limits and found[1] == prefix:
        return found[2], found[3]
    by_limit = limit_names(limits, prefix)
    heads = {id(limit): _head(by_limit[limit]) for limit in limits}
    items = ", ".join(
        f'"{by_limit[limit]}";q={limit.amount};w={limit.window}' for limit in limits
    ).encode()
    if type(limits) is tuple:
        remember(_POLICY_CACHE, key, (limits, prefix, heads, items), _POLICY_CACHE_SIZE)
    return heads, items


def _head(name: str) -> bytes:
    return f'"{name}";r='.encode()


def rate_limit_headers(
    decisions: Sequence[tuple[str, Sequence[Limit], Decision]],
) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` listing every limit of the policies that applied (IETF httpapi
    draft form: ``"requests";q=60;w=60, "tokens";q=1000000;w=60``) and ``RateLimit`` for the
    most constrained limit the request was checked against (``"requests";r=41;t=17``), or
    on a refusal the limit that refused it, ``t`` then being ``Retry-After``.
    Each entry is (name prefix, the policy's limits, the decision). Nothing when no limit
    was checked (a store failure under ``on_store_error="open"``)."""
    if len(decisions) == 1:  # one limiter met the request (the usual case): no ranking
        prefix, limits, decision = decisions[0]
        found = decision.tightest()
        if found is None:
            return []
        heads, items = _policy_items(prefix, limits)
        limit, remaining, reset_after = found
        head = heads.get(id(limit)) or _head(limit_names([limit], prefix)[limit])
        return [(b"ratelimit-policy", items), _rate_limit_field(head, remaining, reset_after)]
    policies: list[bytes] = []
    best_share = best_reset = math.inf
    best: tuple[bytes, int, float] | None = None
    for prefix, limits, decision in decisions:
        found = decision.tightest()
        if found is None:
            continue
        heads, items = _policy_items(prefix, limits)
        policies.append(items)
        limit, remaining, reset_after = found
        # The limiter that refused the request names the limit that refused it.
        share = remaining / limit.amount if decision.allowed else -1.0
        if share < best_share or (share == best_share and reset_after < best_reset):
            best_share, best_reset = share, reset_after
            head = heads.get(id(limit)) or _head(limit_names([limit], prefix)[limit])
            best = (head, remaining, reset_after)
    if best is None:
        return []
    policy = policies[0] if len(policies) == 1 else b", ".join(policies)
    return [(b"ratelimit-policy", policy), _rate_limit_field(*best)]


def _rate_limit_field(head: bytes, remaining: int, reset_after: float) -> tuple[bytes, bytes]:
    reset = math.ceil(reset_after)
    return (b"ratelimit", b"%s%d;t=%d" % (head, remaining, reset if reset > 0 else 0))


def quota_details(
    decision: Decision, dimensions: Sequence[str], labels: dict[str, str]
) -> tuple[str, list[dict[str, Any]]]:
    """The 429 message and its ``details``: ``QuotaFailure`` (which limit, which key
    dimension) and ``RetryInfo``, in the shape Gemini itself answers with."""
    key = "+".join(dimensions)
    violations = []
    parts = []
    for state in decision.violated:
        limit = state.limit
        kind = limit.kind.capitalize()
        per = _per(limit.window)
        quota_id = f"{kind}Per{per}Per{''.join(d.title().replace('_', '') for d in dimensions)}"
        violations.append(
            {
                "subject": key,
                "description": f"{limit.kind} per {limit.window}s per {key}",
                "quotaMetric": f"gemini-scale/{limit.kind}",
                "quotaId": quota_id,
                "quotaDimensions": {"key": key, **labels},
                "quotaValue": str(limit.amount),
            }
        )
        parts.append(f"{limit.kind}: {limit.amount} per {limit.window}s")
    retry = decision.retry_after
    message = f"Quota exceeded for {', '.join(parts)} per {key}. Please retry in {retry}s."
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": violations},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry}s"},
    ]
    return message, details


def _per(window: int) -> str:
    return {1: "Second", 60: "Minute", 3600: "Hour", 86400: "Day"}.get(window, f"{window}Seconds")
