"""Tests of the upstream client, the streaming ASGI transport and the offline stand-in."""
