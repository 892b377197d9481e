"""Distributed rate limiting of requests and Gemini tokens."""

from __future__ import annotations
