"""Timestamps as the spec writes them: ISO 8601 in UTC with a Z."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(ts: float | None = None, timespec: str = "milliseconds") -> str:
    """``ts`` (epoch seconds; now when None) as ``2025-11-17T10:00:00.000Z``."""
    moment = datetime.fromtimestamp(ts, UTC) if ts is not None else datetime.now(UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")
