"""Silencing a finding in the file: ``# lint: ignore[rule-id]`` (several ids comma
separated, or ``# lint: ignore`` for every rule) at the end of the finding's line or on
a line of its own just above it."""

from __future__ import annotations

import re
from collections.abc import Sequence

from engine.dsl.lint.base import Finding

_IGNORE = re.compile(r"#\s*lint:\s*ignore(?:\[(?P<ids>[^\]]*)\])?")


def _ignores(line: str, rule: str) -> bool:
    match = _IGNORE.search(line)
    if match is None:
        return False
    ids = match.group("ids")
    return ids is None or rule in {part.strip() for part in ids.split(",")}


def unsuppressed(findings: Sequence[Finding], text: str) -> list[Finding]:
    lines = text.splitlines()
    kept = []
    for finding in findings:
        line = finding.issue.line
        here = lines[line - 1] if line and line <= len(lines) else ""
        above = lines[line - 2] if line and 2 <= line <= len(lines) + 1 else ""
        own_line_above = above.lstrip().startswith("#")
        if _ignores(here, finding.rule) or (own_line_above and _ignores(above, finding.rule)):
            continue
        kept.append(finding)
    return kept
