"""The UI's protections (docs/ui.md, "Security").

- Key: with api_keys set, every UI page needs a key like the API (server/auth.py). A
  browser cannot send a header from a link, a form or an EventSource, so /ui/login takes
  the key once and sets it in the `fusion_key` cookie: HttpOnly (no script reads it),
  SameSite=Strict (a cross-site page never makes the browser send it), Secure over HTTPS,
  Path=/ (the run page's EventSource and cancel call reach /api/fusion/... with it).
- Forged posts (CSRF): besides SameSite=Strict, every UI form post must carry an `Origin`
  (or, failing that, `Referer`) naming this server; browsers send one on every POST, so
  a post from another site, or one that hides where it comes from, is refused (403).
  The app's edge guard (server/guards.py) refuses foreign origins on every route too.
- Content: Jinja autoescapes everything a page prints (step outputs, errors, ids), and
  every page is sent with a Content-Security-Policy that allows no inline script or
  style and nothing from another origin: the pages' script and stylesheet are static
  files of this package.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from litestar import Request
from litestar.datastructures import Cookie

from engine.config import Settings
from engine.errors import ErrorCode, FusionError
from server.auth import KEY_COOKIE, key_digests, key_name
from server.proxies import parse_networks, request_scheme

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class ForgedRequest(FusionError):
    status = 403
    default_code = ErrorCode.ORIGIN_NOT_ALLOWED


def own_origin(request: Request[Any, Any, Any], settings: Settings) -> str:
    scheme = request_scheme(request.scope, parse_networks(settings.trusted_proxies))
    return f"{scheme}://{request.headers.get('host', '')}".lower()


def check_same_origin(request: Request[Any, Any, Any], settings: Settings) -> None:
    """Refuse a form post that does not come from a page of this server."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if referer:
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
    if origin is None or origin.lower() != own_origin(request, settings):
        raise ForgedRequest(
            "this form must be sent from a page of this server (its Origin did not match)",
            param="Origin",
        )


def keys_required(settings: Settings) -> bool:
    return bool(settings.api_keys)


def valid_key(settings: Settings, key: str) -> bool:
    return key_name(f"Bearer {key}", key_digests(settings.api_keys)) is not None


def key_cookie(request: Request[Any, Any, Any], settings: Settings, key: str) -> Cookie:
    secure = own_origin(request, settings).startswith("https://")
    return Cookie(
        key=KEY_COOKIE,
        value=quote(key, safe=""),
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def cleared_cookie() -> Cookie:
    return Cookie(key=KEY_COOKIE, value="", path="/", max_age=0, httponly=True, samesite="strict")


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of the UI only (no open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return "/ui/runs"
