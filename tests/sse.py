"""Strict parsing of Gemini's SSE framing, shared by the tests."""

from __future__ import annotations

import json
from typing import Any


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Parse Gemini SSE strictly: only ``data: <json>\\r\\n\\r\\n`` events, nothing else."""
    assert raw.endswith(b"\r\n\r\n"), raw[-40:]
    events = []
    for frame in raw.split(b"\r\n\r\n")[:-1]:
        assert frame.startswith(b"data: "), frame[:40]
        assert b"\n" not in frame, frame[:80]
        assert b"\r" not in frame, frame[:80]
        events.append(json.loads(frame[len(b"data: ") :]))
    return events
