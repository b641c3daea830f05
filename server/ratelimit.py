"""Rate limits per client and endpoint group (spec §8, issue #11).

A skeleton wired into server/app.py; filled in by issue #11's work."""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from engine.config import Settings

ROUTES: list[ControllerRouterHandler] = []


class RateLimitMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        await next_app(scope, receive, send)
