"""Validation issues: what is wrong, where (file, line, column, key path), and how to fix it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import ErrorCode, InvalidRequest

Path = tuple[str | int, ...]


def json_pointer(path: Path) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


@dataclass(frozen=True)
class Issue:
    message: str
    path: Path = ()
    file: str | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based

    @property
    def pointer(self) -> str:
        return json_pointer(self.path)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.pointer
        data["key"] = dotted(self.path)
        return data

    def text(self) -> str:
        where = self.file or "<workflow>"
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        return f"{where}: {dotted(self.path)}: {self.message}"

    def github(self, command: str = "error", note: str = "") -> str:
        """A GitHub workflow command (``error``, ``warning`` or ``notice``) annotating the
        issue's place; ``note`` is appended to the message."""
        # GitHub's workflow-command syntax: properties are comma separated and, like the
        # message, percent-encoded ('%' first, or a '%' in a template would be misread);
        # a property value also must not contain ':' or ','.
        props = [f"file={_gh_escape(self.file or 'workflow', prop=True)}"]
        if self.line is not None:
            props += [f"line={self.line}", f"col={self.col or 1}"]
        message = _gh_escape(f"{dotted(self.path)}: {self.message}{note}")
        return f"::{command} {','.join(props)}::{message}"


def _gh_escape(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def format_issues(issues: Sequence[Issue], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([i.to_dict() for i in issues], indent=2)
    if fmt == "github":
        return "\n".join(i.github() for i in issues)
    return "\n".join(i.text() for i in issues)


class WorkflowInvalid(InvalidRequest):
    """A workflow definition with one or more issues; all of them are reported at once."""

    default_code = ErrorCode.INVALID_WORKFLOW

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        first = self.issues[0]
        more = f" (and {len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        super().__init__(
            f"{dotted(first.path)}: {first.message}{more}",
            param=first.pointer or None,
            details=[i.to_dict() for i in self.issues],
        )
