"""What a limited response says: RateLimit headers and the 429 in Google's envelope."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gemini_scale.ratelimit.engine import Decision, Limit, LimitState


def limit_names(limits: Sequence[Limit]) -> dict[Limit, str]:
    """``requests`` / ``tokens`` when a kind has one limit, ``requests-60s`` when several."""
    kinds = [limit.kind for limit in limits]
    return {limit: limit.kind if kinds.count(limit.kind) == 1 else limit.name for limit in limits}


def policy_header(limits: Sequence[Limit], names: dict[Limit, str]) -> str:
    """``RateLimit-Policy: "requests";q=60;w=60, "tokens";q=1000000;w=60`` (IETF draft)."""
    return ", ".join(f'"{names[limit]}";q={limit.amount};w={limit.window}' for limit in limits)


def state_header(state: LimitState, names: dict[Limit, str]) -> str:
    """``RateLimit: "requests";r=41;t=17`` for the most constrained limit."""
    reset = max(0, math.ceil(state.reset_after))
    return f'"{names[state.limit]}";r={state.remaining};t={reset}'


def rate_limit_headers(decision: Decision, limits: Sequence[Limit]) -> list[tuple[bytes, bytes]]:
    """The headers every limited response carries (none when no decision was made)."""
    constrained = decision.most_constrained()
    if constrained is None:
        return []
    names = limit_names(limits)
    return [
        (b"ratelimit-policy", policy_header(limits, names).encode()),
        (b"ratelimit", state_header(constrained, names).encode()),
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
