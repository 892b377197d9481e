"""What a limited response says: RateLimit headers and the 429 in Google's envelope."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gemini_scale.ratelimit.engine import Decision, Limit


def limit_names(limits: Sequence[Limit], prefix: str = "") -> dict[Limit, str]:
    """``requests`` / ``tokens`` when a kind has one limit, ``requests-60s`` when several;
    ``prefix`` tells limiters apart (``ip-requests``)."""
    kinds = [limit.kind for limit in limits]
    return {
        limit: prefix + (limit.kind if kinds.count(limit.kind) == 1 else limit.name)
        for limit in limits
    }


#: (prefix, limits) -> (names, RateLimit-Policy items); limits are per-policy constants.
_POLICY_CACHE: dict[tuple[str, tuple[Limit, ...]], tuple[dict[Limit, str], list[str]]] = {}
_POLICY_CACHE_SIZE = 1024


def _policy_items(prefix: str, limits: Sequence[Limit]) -> tuple[dict[Limit, str], list[str]]:
    key = (prefix, limits) if type(limits) is tuple else None
    found = _POLICY_CACHE.get(key) if key is not None else None
    if found is None:
        names = limit_names(limits, prefix)
        found = (names, [f'"{names[lim]}";q={lim.amount};w={lim.window}' for lim in limits])
        if key is not None:
            if len(_POLICY_CACHE) >= _POLICY_CACHE_SIZE:
                _POLICY_CACHE.clear()
            _POLICY_CACHE[key] = found
    return found


def rate_limit_headers(
    decisions: Sequence[tuple[str, Sequence[Limit], Decision]],
) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` listing every limit that applied (IETF httpapi draft form:
    ``"requests";q=60;w=60, "tokens";q=1000000;w=60``) and ``RateLimit`` for the most
    constrained one (``"requests";r=41;t=17``). Nothing when no limit was checked (a store
    failure under ``on_store_error="open"``)."""
    policies: list[str] = []
    tightest: tuple[float, float, int, str] | None = None
    floor, ceil = math.floor, math.ceil
    for prefix, limits, decision in decisions:
        if not decision.states:
            continue
        names, items = _policy_items(prefix, limits)
        policies += items
        for state in decision.states:
            limit = state.limit
            amount = limit.amount
            remaining = max(0, floor(amount - state.used + 1e-9))  # LimitState.remaining
            share = remaining / amount
            reset_after = state.reset_after
            if tightest is None or (share, reset_after) < (tightest[0], tightest[1]):
                reset = max(0, ceil(reset_after))
                item = f'"{names[limit]}";r={remaining};t={reset}'
                tightest = (share, reset_after, remaining, item)
    if tightest is None:
        return []
    return [
        (b"ratelimit-policy", ", ".join(policies).encode()),
        (b"ratelimit", tightest[3].encode()),
    ]


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
