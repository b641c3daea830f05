"""Rate limits per client and endpoint group (spec §8, issue #11).

Each request to a limited group takes one hit from the counter of (group, client); groups
never share a counter. Paths outside the groups (/health*, /metrics, /internal/*, the
OpenAPI document) are never limited: monitors and process managers poll them, and the
operational routes are protected by API keys instead.

The limiter is the `limits` package's moving window over its asyncio in-memory storage: a
client never gets more than N requests into any window of the period (a fixed window lets
2N through around a window's edge), the counters live in this process only, and entries
expire with their window, so memory stays bounded by the clients active in one period.
Its operations are in-memory and awaitable, so nothing blocks the event loop.

Every response of a limited group carries X-RateLimit-Limit, X-RateLimit-Remaining and
X-RateLimit-Reset (epoch seconds at which the oldest hit in the window expires); a refused
request gets 429 `rate_limit_exceeded` in the §7 envelope with Retry-After.

The client is the peer address, or, when the peer is a configured trusted proxy, the first
address of X-Forwarded-For counted from the right that is not a trusted proxy: the hops to
its left were written by the client itself and prove nothing.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from engine.config import Settings
from engine.errors import RateLimited
from engine.logging import get_logger
from server.proxies import client_address, parse_networks
from server.versioning import call_with_headers

log = get_logger("server.ratelimit")

ROUTES: list[ControllerRouterHandler] = []

# Group -> the path prefixes it covers (a prefix matches itself and the paths below it).
GROUPS: dict[str, tuple[str, ...]] = {
    "models": ("/v1/models",),
    "fusion": ("/api/fusion",),
    "rag": ("/api/rag",),
    "mcp": ("/api/mcp",),
    "inference": ("/v1/chat/completions", "/v1/embeddings", "/v1/audio"),
}

# Where the request's client address is kept for the request log line (server/request_id.py).
CLIENT_STATE_KEY = "client"


def group_for(path: str) -> str | None:
    """The endpoint group a path belongs to; None for paths that are never limited."""
    for group, prefixes in GROUPS.items():
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return group
    return None


def parse_limits(rate_limits: dict[str, str | None]) -> dict[str, RateLimitItem]:
    """settings.rate_limits parsed; groups set to null are left out. Raises ValueError on an
    unknown group or a limit `limits` cannot parse."""
    unknown = sorted(set(rate_limits) - set(GROUPS))
    if unknown:
        raise ValueError(
            f"rate_limits: unknown group(s) {', '.join(unknown)}; "
            f"the groups are {', '.join(GROUPS)}"
        )
    parsed: dict[str, RateLimitItem] = {}
    for group, text in rate_limits.items():
        if text is None:
            continue
        try:
            parsed[group] = parse(text)
        except ValueError as exc:
            raise ValueError(
                f"rate_limits.{group}: {text!r} is not a rate limit such as '10/minute'"
            ) from exc
    return parsed


class RateLimitMiddleware(ASGIMiddleware):
    """The per-group limits of the module docstring; a no-op when rate_limit_enabled is
    false. The client it resolves is kept in the scope's state for the request log."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limit_enabled
        self.limits = parse_limits(settings.rate_limits)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        client = client_address(scope, self.trusted_proxies)
        scope.setdefault("state", {})[CLIENT_STATE_KEY] = client
        group = group_for(scope["path"])
        item = self.limits.get(group) if self.enabled and group is not None else None
        if group is None or item is None:
            await next_app(scope, receive, send)
            return
        allowed = await self.limiter.hit(item, group, client)
        stats = await self.limiter.get_window_stats(item, group, client)
        headers = {
            "X-RateLimit-Limit": str(item.amount),
            "X-RateLimit-Remaining": str(max(stats.remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
        }
        if not allowed:
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            log.info("rate limited", group=group, client=client, limit=str(item))
            raise RateLimited(
                f"Rate limit exceeded. Try again in {retry_after} seconds.",
                headers={**headers, "Retry-After": str(retry_after)},
            )
        await call_with_headers(next_app, scope, receive, send, headers)
