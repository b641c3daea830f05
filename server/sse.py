"""Server-sent events as the routes write them (orchestrate, job events; the OpenAI chat
stream writes OpenAI's data-only events itself)."""

from __future__ import annotations

from typing import Any

import msgspec

# No caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(name: str, data: Any, event_id: int | None = None) -> bytes:
    """One event; `event_id` lets a client resume with Last-Event-ID."""
    head = b"" if event_id is None else b"id: " + str(event_id).encode() + b"\n"
    return head + b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
