"""Optional API keys (issue #11): Authorization: Bearer <key> on every route but /health*.

A skeleton wired into server/app.py; filled in by issue #11's work."""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from engine.config import Settings

ROUTES: list[ControllerRouterHandler] = []


class ApiKeyMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        await next_app(scope, receive, send)
