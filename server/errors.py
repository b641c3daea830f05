"""Every error leaves the server as the spec's §7 envelope:
{"error": {"type", "message", "param", "code"}}, with the status that goes with the type.

Three handlers cover everything: domain errors (FusionError) carry their own status,
type and code; Litestar's HTTPException (routing 404/405, validation 400, 413, 429, ...)
is mapped by status; anything else is a 500 with a generic message, logged with its
traceback here and never shown to the client.

Each answer is also remembered for /internal/diagnostics' recent errors
(server/diagnostics.py says which are kept).
"""

from __future__ import annotations

import re
from enum import Enum
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from engine.errors import ERROR_TYPES, ErrorCode, FusionError
from engine.logging import get_logger
from engine.store import storage_error
from server.diagnostics import record_error

log = get_logger("server.errors")

GENERIC_500_MESSAGE = "Internal server error"

# The code for an error that brings none (Litestar's routing, validation and limits): one
# per status; the type follows the status (engine.errors.ERROR_TYPES).
_DEFAULT_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.AUTHENTICATION_FAILED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMIT_EXCEEDED,
    500: ErrorCode.INTERNAL_ERROR,
    503: ErrorCode.SERVICE_UNAVAILABLE,
    504: ErrorCode.TIMEOUT,
}


def type_and_code(status: int) -> tuple[str, str]:
    """The envelope's (type, code) for an error that brings only its HTTP status."""
    if status in _DEFAULT_CODES:
        return ERROR_TYPES[status], _DEFAULT_CODES[status]
    # A status no ErrorCode has (Litestar may raise any): a code from its reason phrase.
    phrase = _phrase(status) or "error"
    code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
    return ("internal_error" if status >= 500 else "invalid_request_error", code)


def error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: ErrorCode | None = None,
    param: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    default_type, default_code = type_and_code(status)
    body: dict[str, Any] = {
        "type": type_ or default_type,
        "message": message,
        "param": param,
        "code": code or default_code,
    }
    if details is not None:
        body["details"] = details
    return Response(
        content={"error": body},
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def _log_server_error(request: Request[Any, Any, Any], exc: BaseException) -> None:
    log.error(
        "request failed",
        method=request.method,
        path=request.url.path,
        error_type=type(exc).__name__,
        exc_info=exc,
    )


def _remembered(
    request: Request[Any, Any, Any],
    status: int,
    response: Response[dict[str, Any]],
    message: str | None = None,
) -> Response[dict[str, Any]]:
    """The response, once recorded for diagnostics; `message` replaces the client's."""
    error = response.content["error"]
    record_error(request.scope, status, error["code"], message or error["message"])
    return response


def handle_fusion_error(
    request: Request[Any, Any, Any], exc: FusionError
) -> Response[dict[str, Any]]:
    if exc.status >= 500:
        _log_server_error(request, exc)
    response = Response(
        content=exc.envelope(),
        status_code=exc.status,
        headers=exc.headers or None,
        media_type="application/json",
    )
    # A client's own rate-limit refusals would push the real errors out of the buffer.
    if exc.code is ErrorCode.RATE_LIMIT_EXCEEDED:
        return response
    return _remembered(request, exc.status, response)


def handle_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    status = exc.status_code
    # Litestar's own headers (Allow on 405, rate-limit headers on 429) must survive the
    # rewrite of the body.
    headers = dict(exc.headers or {})
    if status >= 500:
        _log_server_error(request, exc)
        message = GENERIC_500_MESSAGE if status == 500 else exc.detail
        return _remembered(request, status, error_response(status, message, headers=headers))
    if isinstance(exc, ValidationException):
        return _remembered(request, status, _validation_response(exc, headers))
    response = error_response(status, _client_message(request, exc), headers=headers)
    # Routing misses (no such path or method) are scanners' noise, not the server's errors.
    if status in (404, 405):
        return response
    return _remembered(request, status, response)


def _client_message(request: Request[Any, Any, Any], exc: HTTPException) -> str:
    # Routing raises 404/405 with only the reason phrase; say what did not match instead.
    if exc.detail == _phrase(exc.status_code):
        if exc.status_code == 404:
            return f"No route matches {request.method} {request.url.path}"
        if exc.status_code == 405:
            return f"Method {request.method} is not allowed on {request.url.path}"
    return exc.detail


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _validation_response(
    exc: ValidationException, headers: dict[str, str]
) -> Response[dict[str, Any]]:
    problems = _validation_problems(exc.extra)
    if not problems:
        # Litestar reports a missing parameter only in its message.
        missing = _MISSING_PARAM.match(exc.detail)
        param = missing.group(1) if missing else None
        return error_response(exc.status_code, exc.detail, param=param, headers=headers)
    first = problems[0]
    return error_response(
        exc.status_code,
        f"{exc.detail}: {first['message']}",
        param=first["param"],
        details=problems,
        headers=headers,
    )


_MISSING_PARAM = re.compile(r"Missing required \w+ parameter '([^']+)'")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _validation_problems(extra: Any) -> list[dict[str, Any]]:
    """Litestar's ValidationException.extra is a list of {"message", "key", "source"};
    key is the offending field, dotted for nested body fields."""
    if not isinstance(extra, list):
        return []
    problems: list[dict[str, Any]] = []
    for item in extra:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", "invalid value"))
        problems.append(
            {
                "param": _offending_field(item.get("key"), message),
                "message": message,
                "source": _plain(item.get("source")),
            }
        )
    return problems


def _offending_field(key: Any, message: str) -> str | None:
    # msgspec reports a missing field at its parent object ("data" for the body itself);
    # the caller needs the missing field's own path.
    path = str(key) if key is not None else None
    missing = _MISSING_FIELD.search(message)
    if missing is None:
        return path
    if path in (None, "data"):
        return missing.group(1)
    return f"{path}.{missing.group(1)}"


def _plain(value: Any) -> Any:
    # ParamType is an Enum: send its value, not a repr.
    return value.value if isinstance(value, Enum) else value


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    # A full or read-only database reached outside the store's own translation (a direct
    # read on a connection) still says so: 507/503, not a generic 500.
    storage = storage_error(exc)
    if storage is not None:
        storage.__cause__ = exc  # the log keeps apsw's traceback
        return handle_fusion_error(request, storage)
    _log_server_error(request, exc)
    # The exception's text may hold internals; its class says enough to find the log line.
    return _remembered(
        request,
        500,
        error_response(500, GENERIC_500_MESSAGE),
        f"{GENERIC_500_MESSAGE} ({type(exc).__name__})",
    )


def exception_handlers() -> ExceptionHandlersMap:
    """Handlers for `Litestar(exception_handlers=...)`. Keyed by class, so Litestar picks
    the most specific one along the exception's MRO; unmatched routes (404) and methods
    (405) raise HTTPException subclasses and land in handle_http_exception."""
    return {
        FusionError: handle_fusion_error,
        HTTPException: handle_http_exception,
        Exception: handle_unexpected,
    }
