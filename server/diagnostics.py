"""GET /internal/diagnostics (spec §6.2) and the ring buffer of recent errors (issue #11).

A skeleton wired into server/app.py; filled in by issue #11's work."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

ROUTES: list[ControllerRouterHandler] = []
