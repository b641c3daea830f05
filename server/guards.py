"""The server's edge against the browser: a local server is reachable from every web page
the user opens, so requests are checked before any handler sees them.

- Host allow-list (`allowed_hosts`): a DNS-rebinding page reaches us under its own name, so
  a Host header that is not the bind address or a localhost name is refused (421).
- Origin (`cors_allow_origins`): a browser names the page that sent a request in `Origin`.
  Same-origin requests and clients that send none (curl, SDKs) pass; any other origin is
  refused (403) unless it is configured, and then Litestar's CORS support answers it. Form
  posts and multipart uploads are "simple" requests that a browser sends without asking
  first, so refusing them here is what protects the upload routes.
- Content type: a JSON route (one whose handler takes `data`) with a body must be sent as
  `application/json` or `application/*+json` (415 otherwise): `text/plain` and form bodies
  are what a page can send cross-site without a preflight.
- JSON depth (`max_json_depth`): msgspec, jsonschema and our own walkers recurse once per
  level, so a body nested thousands deep would end in RecursionError (a 500 with a huge
  traceback). The depth is counted on the raw bytes as they are received, in linear time,
  and the request is refused (400) before the body is decoded.
"""

from __future__ import annotations

import re
from itertools import accumulate

from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from engine.config import Settings
from engine.errors import ErrorCode, FusionError, InvalidRequest
from engine.logging import get_logger
from server.proxies import parse_networks, request_scheme

log = get_logger("server.guards")

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
ANY = "*"


class HostNotAllowed(FusionError):
    status = 421
    default_code = ErrorCode.HOST_NOT_ALLOWED


class OriginNotAllowed(FusionError):
    status = 403
    default_code = ErrorCode.ORIGIN_NOT_ALLOWED


class UnsupportedMediaType(FusionError):
    status = 415
    default_code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


def cors_config(settings: Settings) -> CORSConfig | None:
    """Litestar's CORS handling for the configured origins; None when none are."""
    if not settings.cors_allow_origins:
        return None
    return CORSConfig(allow_origins=list(settings.cors_allow_origins))


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host values to accept, lower-cased; None accepts any."""
    names = settings.allowed_hosts
    if names is None:
        bind = f"[{settings.host}]" if ":" in settings.host else settings.host
        names = [bind, *LOCAL_HOSTS]
    if ANY in names:
        return None
    # A bare name accepts any port; "name:port" only that port.
    return frozenset(name.lower() for name in names)


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


class EdgeGuardMiddleware(ASGIMiddleware):
    """Host, Origin, content-type and JSON-depth checks (see the module docstring). Runs
    for every routed HTTP request; its refusals raise FusionErrors, so they leave in the
    §7 envelope like any other error."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.hosts = allowed_hosts(settings)
        self.cors = cors_config(settings)
        self.max_json_depth = settings.max_json_depth
        self.proxies = parse_networks(settings.trusted_proxies)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = Headers.from_scope(scope)
        host = headers.get("host", "")
        self._check_host(host)
        self._check_origin(headers.get("origin"), scope, host)
        if _takes_json(scope) and _has_body(headers):
            content_type = headers.get("content-type", "")
            if not is_json_media_type(content_type):
                raise UnsupportedMediaType(
                    f"this route takes a JSON body: send it with Content-Type "
                    f"application/json, not {content_type or 'none'}",
                    param="Content-Type",
                )
            receive = _depth_limited(receive, self.max_json_depth, scope)
        await next_app(scope, receive, send)

    def _check_host(self, host: str) -> None:
        if self.hosts is None:
            return
        host = host.lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host in self.hosts or name in self.hosts:
            return
        raise HostNotAllowed(
            f"the Host header {host or '(none)'!r} is not one this server answers to; "
            "add it to the allowed_hosts setting (FUSION_ALLOWED_HOSTS)",
            param="Host",
        )

    def _check_origin(self, origin: str | None, scope: Scope, host: str) -> None:
        if origin is None:
            return  # not a browser, or a same-origin GET
        # Behind a TLS proxy the browser's origin is https:// while the hop to us is not.
        if origin.lower() == f"{request_scheme(scope, self.proxies)}://{host}".lower():
            return
        if self.cors is not None and self.cors.is_origin_allowed(origin):
            return
        raise OriginNotAllowed(
            f"cross-origin requests from {origin!r} are refused; add the origin to the "
            "cors_allow_origins setting to allow them",
            param="Origin",
        )


def _takes_json(scope: Scope) -> bool:
    handler = scope.get("route_handler")
    return getattr(handler, "parsed_data_field", None) is not None


def _has_body(headers: Headers) -> bool:
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "0").strip()
    return not (length.isdigit() and int(length) == 0)


def _depth_limited(receive: Receive, max_depth: int, scope: Scope) -> Receive:
    """`receive` that counts the JSON body's nesting as its chunks pass and raises a 400
    the moment it passes `max_depth`, before the body reaches the decoder."""
    counter = JsonDepthCounter(max_depth)

    async def checked() -> ReceiveMessage:
        message = await receive()
        if message["type"] == "http.request" and not counter.feed(message.get("body", b"")):
            log.warning("json body too deep", path=scope.get("path"), max_depth=max_depth)
            raise InvalidRequest(
                f"the JSON body is nested deeper than {max_depth} levels "
                "(the max_json_depth setting)",
                code=ErrorCode.JSON_TOO_DEEP,
            )
        return message

    return checked


# Outside strings JSON has no backslashes; inside, each escape is a backslash and one more
# character. Dropping those pairs left to right leaves only real string delimiters.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _open in b"[{":
    _STEP[_open] = 1
for _close in b"]}":
    _STEP[_close] = -1


class JsonDepthCounter:
    """The nesting depth of a JSON text fed in chunks of any size, in linear time and all
    in C: escapes are dropped, the text between quote pairs (string contents) is cut out,
    and the brackets left are counted; the running maximum is only computed once the
    brackets seen could have passed the limit. State between chunks: inside a string or
    not, and an escape cut in two."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.depth = 0
        self._in_string = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bool:
        """Count `chunk`; False once the depth has passed the limit."""
        data = _ESCAPE.sub(b"", self._pending + chunk)
        # A backslash still left closes the chunk: its escaped character comes next.
        self._pending = b"\\" if data.endswith(b"\\") else b""
        parts = data.split(b'"')
        outside = b"".join(parts[1 if self._in_string else 0 :: 2])
        self._in_string = (self._in_string + len(parts) - 1) % 2 == 1
        brackets = outside.translate(None, _NOT_BRACKETS)
        opens = brackets.count(b"[") + brackets.count(b"{")
        start, self.depth = self.depth, self.depth + 2 * opens - len(brackets)
        if start + opens <= self.max_depth:
            return True
        deepest = max(accumulate(map(_STEP.__getitem__, brackets), initial=start))
        return deepest <= self.max_depth
