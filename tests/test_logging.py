"""engine.logging: one format for structlog and stdlib lines, with contextvars merged."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from engine.logging import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    configure_logging()


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_from_structlog_and_stdlib_carry_bound_context() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        get_logger("fusion.test").info("from structlog", answer=42)
        logging.getLogger("uvicorn.access").info('%s - "%s %s"', "127.0.0.1", "GET", "/health")
    get_logger("fusion.test").info("after the request")

    first, second, third = _records(stream)
    assert first["event"] == "from structlog"
    assert first["answer"] == 42
    assert first["request_id"] == "req-1"
    assert first["level"] == "info"
    assert first["logger"] == "fusion.test"
    assert str(first["timestamp"]).endswith("Z")
    assert second["event"] == '127.0.0.1 - "GET /health"'
    assert second["logger"] == "uvicorn.access"
    assert second["request_id"] == "req-1"
    assert "request_id" not in third


def test_level_filters_both_kinds_of_logger() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream=stream)
    get_logger("fusion.test").info("dropped")
    logging.getLogger("some.library").info("dropped too")
    get_logger("fusion.test").warning("kept")
    assert [r["event"] for r in _records(stream)] == ["kept"]


def test_exceptions_are_structured_in_json() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        raise ValueError("bad thing")
    except ValueError:
        get_logger("fusion.test").exception("failed")
    (record,) = _records(stream)
    assert record["level"] == "error"
    assert "ValueError" in json.dumps(record["exception"])


def test_console_format_is_one_readable_line() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    with structlog.contextvars.bound_contextvars(request_id="req-2"):
        get_logger("fusion.test").info("hello", n=1)
    line = stream.getvalue().strip()
    assert "hello" in line
    assert "request_id=req-2" in line
    assert "\x1b[" not in line  # no colour codes when the stream is not a terminal


def test_reconfiguring_replaces_the_previous_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "info", stream=second)
    get_logger("fusion.test").info("once")
    assert first.getvalue() == ""
    assert len(_records(second)) == 1


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "loud")
