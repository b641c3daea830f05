"""X-Request-ID: taken from the client (sanitised) or generated, bound into structlog's
contextvars for the request, and set on every response.

Two pieces, because Litestar runs middleware only for matched routes: the middleware binds
the id for logging while a handler runs, and a `before_send` hook (app-level, it sees every
response, including 404/405 from routing) writes the header. Both read the id through
`request_id_for`, which stores it in the scope so they agree. Handlers can read it as
`request.state.request_id`.
"""

from __future__ import annotations

import re
import uuid

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
MAX_LENGTH = 128

# Ids end up in log lines and response headers: only characters that cannot forge a log
# field or a header are kept.
_DISALLOWED = re.compile(r"[^A-Za-z0-9._:\-]")
_HEADER_BYTES = HEADER.lower().encode("latin-1")
_STATE_KEY = "request_id"


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


class RequestIdMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        with structlog.contextvars.bound_contextvars(request_id=request_id_for(scope)):
            await next_app(scope, receive, send)


async def set_request_id_header(message: Message, scope: Scope) -> None:
    """`before_send` hook: put the id on the response head."""
    if message["type"] == "http.response.start":
        request_id = request_id_for(scope)
        MutableScopeHeaders.from_message(message)[HEADER] = request_id
        # Responses from routing (404/405) bypass the middleware; binding here gives the
        # server's access log line the id too. uvicorn runs each request in its own task
        # with a copied context, so the binding ends with the request.
        structlog.contextvars.bind_contextvars(request_id=request_id)
