"""X-API-Version and deprecated routes (spec §9, issue #11).

A request may name the API version in `X-API-Version`: "1" (or "v1", the spec's name for
it) is accepted, anything else is refused with 400 naming the supported versions. Every
routed response carries `X-API-Version: 1`, asked for or not, so a client can tell which
version answered.

A route is deprecated declaratively with Litestar's own flag, which also marks the
operation `deprecated: true` in the OpenAPI document; the date it goes away, if known, goes
in the handler's `opt`:

    @get("/old", deprecated=True, opt={"sunset": "2027-05-27"})

and every response of that route carries `X-API-Deprecated: true` and
`X-API-Sunset: 2027-05-27`. `deprecation_headers` builds the same headers for responses
that are deprecated by what the request asked for rather than by their route.
"""

from __future__ import annotations

from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send

from engine.config import Settings
from engine.errors import FusionError, InvalidRequest

ROUTES: list[ControllerRouterHandler] = []

HEADER = "X-API-Version"
CURRENT_VERSION = "1"
SUPPORTED_VERSIONS = (CURRENT_VERSION,)
# The handler `opt` key holding a deprecated route's sunset date (ISO 8601).
SUNSET_OPT = "sunset"


def deprecation_headers(sunset: str | None) -> dict[str, str]:
    """Spec §9's deprecation warning: X-API-Deprecated, and X-API-Sunset when the date the
    deprecated thing stops working is known."""
    headers = {"X-API-Deprecated": "true"}
    if sunset is not None:
        headers["X-API-Sunset"] = sunset
    return headers


def requested_version(raw: str | None) -> str | None:
    """The supported version `raw` names ("1", "v1", any case and padding); None when the
    request names none. Raises InvalidRequest for any other value."""
    if raw is None:
        return None
    version = raw.strip().lower().removeprefix("v")
    if version in SUPPORTED_VERSIONS:
        return version
    raise InvalidRequest(
        f"API version {raw!r} is not supported; supported versions: "
        f"{', '.join(SUPPORTED_VERSIONS)}",
        param=HEADER,
    )


def _route_headers(scope: Scope) -> dict[str, str]:
    headers = {HEADER: CURRENT_VERSION}
    handler = scope.get("route_handler")
    if getattr(handler, "deprecated", False):
        sunset = getattr(handler, "opt", {}).get(SUNSET_OPT)
        headers.update(deprecation_headers(str(sunset) if sunset is not None else None))
    return headers


class ApiVersionMiddleware(ASGIMiddleware):
    """Checks X-API-Version and puts the version and a deprecated route's headers on every
    response of a routed request, errors included."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = _route_headers(scope)
        try:
            requested_version(Headers.from_scope(scope).get(HEADER))
        except InvalidRequest as exc:
            exc.headers = {**headers, **exc.headers}
            raise
        await call_with_headers(next_app, scope, receive, send, headers)


async def call_with_headers(
    next_app: ASGIApp, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
) -> None:
    """Run `next_app` with `headers` added to its response, errors included. A refusal by
    a later middleware leaves as an exception, answered by the app's handler outside this
    middleware's `send`: the headers travel on the exception then."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableScopeHeaders.from_message(message).update(headers)
        await send(message)

    try:
        await next_app(scope, receive, send_with_headers)
    except (FusionError, HTTPException) as exc:
        exc.headers = {**headers, **(exc.headers or {})}
        raise
