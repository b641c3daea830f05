"""Every error code has one HTTP status (engine.errors.ERROR_STATUS): checked at every raise
site in engine/ and server/ by reading the source, and at construction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import engine.dsl.issues
import engine.net
import server.guards
from engine.errors import (
    ERROR_STATUS,
    ERROR_TYPES,
    ErrorCode,
    FusionError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    status_allows,
)
from engine.rag.formats.common import FormatError
from server.errors import _DEFAULT_CODES, type_and_code

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "server").rglob("*.py")])
# Modules that define error classes of their own: imported so the walk below sees them.
_DEFINING = (engine.dsl.issues, engine.net, server.guards)


def _error_classes() -> dict[str, type[FusionError]]:
    found: dict[str, type[FusionError]] = {}
    pending: list[type[FusionError]] = [FusionError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def _raise_sites() -> list[tuple[str, str, ast.expr]]:
    """(where, callee name, code expression) of every call passing `code=`."""
    sites = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
            for keyword in node.keywords:
                if keyword.arg == "code":
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    sites.append((where, name, keyword.value))
    return sites


def _member(expr: ast.expr) -> ErrorCode | None:
    if (
        isinstance(expr, ast.Attribute)
        and isinstance(expr.value, ast.Name)
        and expr.value.id == "ErrorCode"
    ):
        return ErrorCode[expr.attr]
    return None


def test_every_code_has_exactly_one_status_and_a_type() -> None:
    # Each member carries its one status; every status has a type.
    assert {code.status for code in ErrorCode} <= set(ERROR_TYPES)


def test_every_raise_site_passes_a_code_of_its_class_status() -> None:
    classes = _error_classes()
    # A FormatError becomes an InvalidRequest naming the file (engine.rag.extract).
    statuses = {name: cls.status for name, cls in classes.items()}
    statuses[FormatError.__name__] = InvalidRequest.status
    checked = 0
    for where, name, expr in _raise_sites():
        assert not isinstance(expr, ast.Constant), f"{where}: a bare string code, not an ErrorCode"
        code = _member(expr)
        if code is None or name not in statuses:
            continue  # passed through (`code=exc.code`): checked when constructed
        assert status_allows(code, statuses[name]), f"{where}: {name} with '{code}'"
        checked += 1
    assert checked > 50  # the scan reads the raise sites, not nothing


def test_every_class_default_code_fits_its_status() -> None:
    for cls in _error_classes().values():
        assert status_allows(cls.default_code, cls.status), cls.__name__
        assert cls.status in ERROR_TYPES, cls.__name__


def test_every_code_is_used() -> None:
    # engine/errors.py lists every code in ErrorCode: a use is a raise site or a default.
    text = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES if p.name != "errors.py")
    used = {cls.default_code for cls in _error_classes().values()} | set(_DEFAULT_CODES.values())
    unused = [c for c in ErrorCode if c not in used and f"ErrorCode.{c.name}" not in text]
    assert unused == []


def test_a_code_of_another_status_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="model_not_loaded"):
        NotFound("x", code=ErrorCode.MODEL_NOT_LOADED)
    assert ServiceUnavailable("x", code=ErrorCode.MODEL_NOT_LOADED).status == 503
    error = NotFound("x", code=ErrorCode.MODEL_NOT_FOUND)
    assert (error.status, error.type, error.code) == (404, "not_found_error", "model_not_found")
    # spec §7: invalid_workflow is "Workflow ID not found or invalid"
    assert NotFound("x", code=ErrorCode.INVALID_WORKFLOW).status == 404
    assert InvalidRequest("x", code=ErrorCode.INVALID_WORKFLOW).status == 400


def test_the_server_default_codes_fit_their_status() -> None:
    for status, code in _DEFAULT_CODES.items():
        assert ERROR_STATUS[code] == status
        assert type_and_code(status) == (ERROR_TYPES[status], code)
