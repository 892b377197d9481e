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


def rate_limit_headers(
    decisions: Sequence[tuple[str, Sequence[Limit], Decision]],
) -> list[tuple[bytes, bytes]]:
    """``RateLimit-Policy`` listing every limit that applied (IETF httpapi draft form:
    ``"requests";q=60;w=60, "tokens";q=1000000;w=60``) and ``RateLimit`` for the most
    constrained one (``"requests";r=41;t=17``). Nothing when no limit was checked (a store
    failure under ``on_store_error="open"``)."""
    policies: list[str] = []
    tightest: tuple[float, float, str] | None = None
    for prefix, limits, decision in decisions:
        if not decision.states:
            continue
        names = limit_names(limits, prefix)
        policies += [f'"{names[lim]}";q={lim.amount};w={lim.window}' for lim in limits]
        for state in decision.states:
            share = state.remaining / state.limit.amount
            reset = max(0, math.ceil(state.reset_after))
            item = f'"{names[state.limit]}";r={state.remaining};t={reset}'
            if tightest is None or (share, state.reset_after) < tightest[:2]:
                tightest = (share, state.reset_after, item)
    if tightest is None:
        return []
    return [
        (b"ratelimit-policy", ", ".join(policies).encode()),
        (b"ratelimit", tightest[2].encode()),
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
