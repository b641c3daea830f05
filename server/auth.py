"""Optional API keys (issue #11): Authorization: Bearer <key> on every route but /health*.

`settings.api_keys` maps a name to a key, or to "sha256:<hex>" of the key so the
configuration need not hold the secret itself. With none set every request passes. With
any set, every routed request but /health and /health/* (process managers and load
balancers probe those without credentials) needs a valid key; /metrics, /internal/* and
the OpenAPI document need one too, as they tell about the server's operation. A refused
request gets 401 `authentication_failed` in the §7 envelope with `WWW-Authenticate: Bearer`.

The web UI (server/ui) cannot send a header from a plain link or an EventSource, so the key
is also accepted from the `fusion_key` cookie that its login form sets (HttpOnly,
SameSite=Strict: a cross-site page never sends it; server/ui/security.py). The header wins
when both are present. The login and logout pages and the UI's static files are public.

Keys are compared as SHA-256 digests with hmac.compare_digest, against every configured key
whatever matched first, so the time taken tells nothing about which bytes or which key came
close. A key is never logged, on success or failure; its name is: bound in the structlog
context (`api_key`) while the request runs and kept in the scope's state (`api_key_name`)
for the request log line and the metrics.

Serving on an address other than loopback without any key logs a warning when the app is
built: anyone who can reach the address can then use every route.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from ipaddress import ip_address
from urllib.parse import unquote

import structlog
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Receive, Scope, Send

from engine.config import Settings
from engine.errors import ErrorCode, FusionError
from engine.logging import get_logger

log = get_logger("server.auth")

ROUTES: list[ControllerRouterHandler] = []

HASH_PREFIX = "sha256:"
# The cookie the UI's login form sets (server/ui/security.py).
KEY_COOKIE = "fusion_key"
# Reachable without a key: the UI's login and logout (which only clears the key's cookie)
# and its own static files (no data in them).
PUBLIC_UI_PATHS = ("/ui/login", "/ui/logout")
PUBLIC_UI_PREFIXES = ("/ui/static/",)
# Where the authenticated key's name is kept for the request log line and the metrics.
KEY_NAME_STATE_KEY = "api_key_name"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_BEARER = re.compile(r"Bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


class AuthenticationFailed(FusionError):
    status = 401
    default_code = ErrorCode.AUTHENTICATION_FAILED


def key_digests(api_keys: dict[str, str]) -> dict[str, bytes]:
    """settings.api_keys as name -> SHA-256 digest of the key. Raises ValueError (naming
    the key, never showing it) for an empty key or a malformed hash."""
    digests: dict[str, bytes] = {}
    for name, value in api_keys.items():
        if value.startswith(HASH_PREFIX):
            hex_digest = value[len(HASH_PREFIX) :]
            if not _HEX_DIGEST.fullmatch(hex_digest):
                raise ValueError(f"api_keys.{name}: a hashed key is 'sha256:' and 64 hex digits")
            digests[name] = bytes.fromhex(hex_digest)
        elif value:
            digests[name] = hashlib.sha256(value.encode("utf-8")).digest()
        else:
            raise ValueError(f"api_keys.{name}: the key is empty")
    return digests


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def is_public(path: str) -> bool:
    if path in PUBLIC_UI_PATHS or path.startswith(PUBLIC_UI_PREFIXES):
        return True
    return path == "/health" or path.startswith("/health/")


def key_name(authorization: str | None, digests: dict[str, bytes]) -> str | None:
    """The name of the configured key the Authorization header carries, or None."""
    match = _BEARER.fullmatch(authorization or "")
    if match is None:
        return None
    presented = hashlib.sha256(match.group(1).encode("utf-8")).digest()
    found: str | None = None
    for name, digest in digests.items():
        # No early exit: every key is compared, whichever matches.
        if hmac.compare_digest(presented, digest) and found is None:
            found = name
    return found


def _cookie(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, percent-decoded (the UI quotes the
    key, which may hold characters a cookie cannot), or None."""
    for part in (header or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return unquote(value.strip('"')) or None
    return None


class ApiKeyMiddleware(ASGIMiddleware):
    """The key check of the module docstring; passes everything when no key is set."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.digests = key_digests(settings.api_keys)
        if not self.digests and not is_loopback(settings.host):
            log.warning(
                "serving on a non-loopback address without API keys: anyone who can reach "
                "it can use every route; set api_keys (FUSION_API_KEYS) to require a key",
                host=settings.host,
            )

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not self.digests or is_public(scope["path"]):
            await next_app(scope, receive, send)
            return
        headers = Headers.from_scope(scope)
        authorization = headers.get("authorization")
        if authorization is None:
            cookie = _cookie(headers.get("cookie"), KEY_COOKIE)
            authorization = f"Bearer {cookie}" if cookie else None
        name = key_name(authorization, self.digests)
        if name is None:
            log.warning(
                "request refused: no valid API key",
                path=scope["path"],
                authorization="missing" if authorization is None else "invalid",
            )
            raise AuthenticationFailed(
                "a valid API key is required: send it as 'Authorization: Bearer <key>'",
                param="Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scope.setdefault("state", {})[KEY_NAME_STATE_KEY] = name
        with structlog.contextvars.bound_contextvars(api_key=name):
            await next_app(scope, receive, send)
