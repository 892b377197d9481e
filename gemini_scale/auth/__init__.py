"""OAuth 2.0 resource-server validation: JWT access tokens, introspection, API keys."""

from __future__ import annotations
