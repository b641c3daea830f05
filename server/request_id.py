"""X-Request-ID: taken from the client (sanitised) or generated, bound into structlog's
contextvars for the request, and set on every response; and the one log line per request.

Two pieces, because Litestar runs middleware only for matched routes: the middleware binds
the id for logging while a handler runs, and a `before_send` hook (app-level, it sees every
response, including 404/405 from routing and refusals raised by middleware) writes the
header. Both read the id through `request_id_for`, which stores it in the scope so they
agree. Handlers can read it as `request.state.request_id`.

The request line (event "request": request_id, method, route template, path, status,
latency_ms, client, api_key) is written by the hook when the response's last body message
goes out; the middleware writes it instead when a response never completes (the client
left, or the server cancelled it). Latency runs from the middleware's start, or for a
request no route matched from its response. `client` is the address the rate limiter
resolved (trusted proxies applied), else the peer; `api_key` the authenticated key's name.
uvicorn's own access line would repeat it, so the middleware turns that logger down.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from engine.logging import get_logger
from server.auth import KEY_NAME_STATE_KEY
from server.ratelimit import CLIENT_STATE_KEY

log = get_logger("server.request")

HEADER = "X-Request-ID"
MAX_LENGTH = 128

# Ids end up in log lines and response headers: only characters that cannot forge a log
# field or a header are kept.
_DISALLOWED = re.compile(r"[^A-Za-z0-9._:\-]")
_HEADER_BYTES = HEADER.lower().encode("latin-1")
_STATE_KEY = "request_id"
# Per-request bookkeeping of the request line, in the scope's state.
_LINE_KEY = "_request_line"


def sanitise(raw: str) -> str | None:
    """The client's id reduced to safe characters and bounded; None if nothing is left."""
    cleaned = _DISALLOWED.sub("", raw)[:MAX_LENGTH]
    return cleaned or None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_for(scope: Scope) -> str:
    """The request's id, decided once per request and remembered in the scope."""
    state = scope.setdefault("state", {})
    existing = state.get(_STATE_KEY)
    if isinstance(existing, str):
        return existing
    request_id: str | None = None
    for name, value in scope.get("headers", ()):
        if name == _HEADER_BYTES:
            request_id = sanitise(value.decode("latin-1"))
            break
    request_id = request_id or new_request_id()
    state[_STATE_KEY] = request_id
    return request_id


class _RequestLine:
    """What the request line needs, gathered as the request goes."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.status: int | None = None
        self.logged = False

    def write(self, scope: Scope, *, completed: bool = True) -> None:
        self.logged = True
        state = scope.get("state", {})
        peer = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": request_id_for(scope),
            "method": scope.get("method"),
            "route": scope.get("path_template"),
            "path": scope.get("path"),
            "status": self.status,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "client": state.get(CLIENT_STATE_KEY) or (peer[0] if peer else None),
            "api_key": state.get(KEY_NAME_STATE_KEY),
        }
        if not completed:
            fields["completed"] = False
        log.info("request", **fields)


def _request_line(scope: Scope) -> _RequestLine:
    state = scope.setdefault("state", {})
    line = state.get(_LINE_KEY)
    if not isinstance(line, _RequestLine):
        line = state[_LINE_KEY] = _RequestLine()
    return line


class RequestIdMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self) -> None:
        # The request line replaces uvicorn's access line (`fusion serve` turns it off;
        # `uvicorn --factory` and embedding servers do not).
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        line = _request_line(scope)
        answered_outside = False
        with structlog.contextvars.bound_contextvars(request_id=request_id_for(scope)):
            try:
                await next_app(scope, receive, send)
            except Exception:
                # Unless the response has begun, the app's exception handler answers it
                # after this returns, and the hook writes the line then.
                answered_outside = line.status is None
                raise
            finally:
                if not line.logged and not answered_outside:
                    line.write(scope, completed=False)


async def set_request_id_header(message: Message, scope: Scope) -> None:
    """`before_send` hook: put the id on the response head; write the request line when
    the response ends."""
    line = _request_line(scope)
    if message["type"] == "http.response.start":
        line.status = message["status"]
        request_id = request_id_for(scope)
        MutableScopeHeaders.from_message(message)[HEADER] = request_id
        # Responses from routing (404/405) bypass the middleware; binding here gives their
        # later log lines the id too. uvicorn runs each request in its own task with a
        # copied context, so the binding ends with the request.
        structlog.contextvars.bind_contextvars(request_id=request_id)
    elif message["type"] == "http.response.body" and not message.get("more_body", False):
        line.write(scope)
