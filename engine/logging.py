"""Logging: structlog for our own loggers, with stdlib logging (uvicorn, litestar, libraries)
rendered by the same formatter, so every line of the process has one format.

Context bound with `structlog.contextvars.bind_contextvars` (the server binds `request_id`
per request) is merged into every line, including lines emitted through stdlib loggers.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}

# Loggers that install their own handlers (uvicorn's default dictConfig does): they are made
# to propagate to the root handler instead, so their lines are rendered like ours.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar")

# Marks the root handler this module installs, so reconfiguring replaces only ours and
# leaves handlers that others (pytest's capture, an embedding application) attached.
_HANDLER_MARK = "_fusion_handler"


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


# C0 controls, DEL and C1 controls: in a value written raw to a terminal they move the
# cursor, recolour or rewrite earlier lines, or forge whole log lines (a newline).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(text: str, pattern: re.Pattern[str] = _CONTROLS) -> str:
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _escape_controls(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Console lines: control characters in string values (a model id, a path from a
    request) are written as ``\\xNN``. Other values are rendered with repr, which
    escapes them already; the JSON renderer escapes them too."""
    return {k: _escape(v) if isinstance(v, str) else v for k, v in event_dict.items()}


def _plain_traceback_escaped(sio: TextIO, exc_info: ExcInfo) -> None:
    """A plain traceback whose lines stay lines but whose other control characters (in
    exception messages built from request data) are escaped."""
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(_escape(buffer.getvalue(), _CONTROLS_BUT_LINES))


def _renderer(fmt: str, stream: TextIO) -> list[Processor]:
    if fmt == "json":
        return [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    colors = bool(getattr(stream, "isatty", lambda: False)())
    # Plain tracebacks: rich's default also prints local variables, which can hold secrets.
    return [
        _escape_controls,
        structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=_plain_traceback_escaped),
    ]


def configure_logging(
    fmt: str = "console",
    level: str = "info",
    *,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging for the process. Safe to call again: the
    previous handler installed here is replaced.

    fmt: "console" (human-readable) or "json" (one JSON object per line).
    level: critical | error | warning | info | debug.
    stream: where lines go; stderr by default.
    """
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', not {fmt!r}")
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}") from None
    out = stream if stream is not None else sys.stderr
    shared = _shared_processors()

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a cached logger would keep the level filter of the first configuration.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(fmt, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers.clear()
        foreign.propagate = True
        foreign.setLevel(logging.NOTSET)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger; `initial` values are bound to every line it emits."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **initial)
    return logger
