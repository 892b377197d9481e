"""The upstream Gemini API: a pooled client with server keys, and an in-process transport."""

from __future__ import annotations

from gemini_scale.upstream.asgi_transport import StreamingASGITransport
from gemini_scale.upstream.client import (
    DEFAULT_BASE_URL,
    FORWARDED_QUERY_PARAMS,
    GeminiUpstream,
    UpstreamResponse,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "FORWARDED_QUERY_PARAMS",
    "GeminiUpstream",
    "StreamingASGITransport",
    "UpstreamResponse",
]
