"""Response caching: canonical keys, stored entries, single flight and the middleware."""

from __future__ import annotations

from gemini_scale.caching.engine import CacheEngine, CacheStats
from gemini_scale.caching.entry import CorruptEntryError, StoredResponse
from gemini_scale.caching.keys import ALL_TAG, model_tag, principal_tag, tenant_tag
from gemini_scale.caching.middleware import CACHE_HIT_KEY, CacheMiddleware

__all__ = [
    "ALL_TAG",
    "CACHE_HIT_KEY",
    "CacheEngine",
    "CacheMiddleware",
    "CacheStats",
    "CorruptEntryError",
    "StoredResponse",
    "model_tag",
    "principal_tag",
    "tenant_tag",
]
