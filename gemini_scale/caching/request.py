"""What the cache reads from a request: its caching headers in one pass, and whether a
Gemini generation request may be answered from cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gemini_scale.header_values import bounded_decimal
from gemini_scale.policies import GenerationMode
from gemini_scale.types import Message, Receive

#: Paths whose answers depend on sampling settings (research/security.md D5).
GENERATION_METHODS: Final = (":generateContent", ":streamGenerateContent")
#: Streamed answers (SSE with ``alt=sse``, a JSON array without).
STREAM_METHOD: Final = ":streamGenerateContent"


def header_fields(headers: Any) -> dict[bytes, bytes]:
    """The ASGI ``headers`` as a dict; field lines of one name joined with ``,``."""
    if not isinstance(headers, list):
        headers = list(headers)
    fields: dict[bytes, bytes] = dict(headers)
    if len(fields) != len(headers):
        fields = {}
        for name, value in headers:
            seen = fields.get(name)
            fields[name] = value if seen is None else seen + b"," + value
    return fields


def replay_messages(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that yields ``messages`` again, in order, then defers to ``receive``."""
    pending = messages[::-1]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


#: A declared length past any body cap: a longer one reads as this.
_LONGEST: Final = 2**63


def content_length(fields: Mapping[bytes, bytes]) -> int | None:
    """The declared body length; ``None`` when absent or not one non-negative integer."""
    value = fields.get(b"content-length")
    return None if value is None else bounded_decimal(value, _LONGEST)


def _is_map(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # JSON gives dicts: no ABC check


def _member(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def is_deterministic(body: Any) -> bool:
    """Whether a ``GenerateContentRequest`` asks for one reproducible answer: temperature
    0 (Gemini's default is 1) and at most one candidate."""
    if not _is_map(body):
        return False
    config = _member(body, "generationConfig", "generation_config")
    if not _is_map(config):
        return False
    temperature = _number(config.get("temperature"))
    candidates = _member(config, "candidateCount", "candidate_count")
    count = 1.0 if candidates is None else _number(candidates)
    return temperature == 0 and count is not None and count <= 1


def generation_allowed(path: str, body: Any, mode: GenerationMode) -> bool:
    """Whether ``mode`` lets a POST to ``path`` be cached: other methods (``countTokens``,
    embeddings) always; generation per ``mode`` (``deterministic``: :func:`is_deterministic`)."""
    return generation_permitted(path, mode, mode == "deterministic" and is_deterministic(body))


def generation_permitted(path: str, mode: GenerationMode, deterministic: bool) -> bool:
    """:func:`generation_allowed` from the body's :func:`is_deterministic` (which the cache
    remembers per body, so a repeated body is not walked again)."""
    if not path.endswith(GENERATION_METHODS):
        return True
    if mode == "deterministic":
        return deterministic
    return mode == "all"
