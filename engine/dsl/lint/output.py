"""`fusion validate`'s reports: text, JSON (findings and a summary), GitHub workflow
commands, and SARIF 2.1.0 for code-scanning tools."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from engine.dsl.issues import dotted
from engine.dsl.lint.base import Finding, Rule, Severity
from engine.dsl.lint.registry import RULES

COMPILE_RULE = "compile"  # the rule id of a compile error, in JSON and SARIF
_GITHUB = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}
_SARIF = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Summary:
    files: int
    errors: int
    warnings: int
    infos: int

    @classmethod
    def of(cls, files: int, findings: Sequence[Finding]) -> Summary:
        def count(severity: Severity) -> int:
            return sum(1 for f in findings if f.severity is severity)

        return cls(files, count(Severity.ERROR), count(Severity.WARNING), count(Severity.INFO))


def text(finding: Finding) -> str:
    if finding.rule == COMPILE_RULE:
        return finding.issue.text()  # as before lint existed: scripts parse these lines
    return f"{finding.issue.text()} [{finding.severity.value}: {finding.rule}]"


def github(finding: Finding) -> str:
    note = "" if finding.rule == COMPILE_RULE else f" [{finding.rule}]"
    return finding.issue.github(_GITHUB[finding.severity], note)


def sarif(findings: Sequence[Finding]) -> dict[str, Any]:
    rules = [
        {
            "id": COMPILE_RULE,
            "shortDescription": {"text": "the workflow does not compile"},
            "defaultConfiguration": {"level": "error"},
        },
        *(
            {
                "id": rule.id,
                "shortDescription": {"text": _summary(rule)},
                "fullDescription": {"text": " ".join((rule.__doc__ or "").split())},
                "defaultConfiguration": {"level": _SARIF[rule.severity]},
            }
            for rule in RULES
        ),
    ]
    index = {rule["id"]: i for i, rule in enumerate(rules)}
    results = []
    for f in findings:
        region = {"startLine": f.issue.line or 1, "startColumn": f.issue.col or 1}
        results.append(
            {
                "ruleId": f.rule,
                "ruleIndex": index[f.rule],
                "level": _SARIF[f.severity],
                "message": {"text": f"{dotted(f.issue.path)}: {f.issue.message}"},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": _uri(f.issue.file)},
                            "region": region,
                        }
                    }
                ],
            }
        )
    driver = {"name": "fusion validate", "rules": rules}
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{"tool": {"driver": driver}, "results": results}],
    }


def _uri(file: str | None) -> str:
    """SARIF wants a URI: a relative path as is (resolved against the checkout by code
    scanning), an absolute one as file://."""
    path = PurePath(file or "workflow")
    return path.as_uri() if path.is_absolute() else path.as_posix()


def _summary(rule: Rule) -> str:
    """The first line of the rule module's docstring, less its "rule-id: " prefix."""
    doc = sys.modules[type(rule).__module__].__doc__ or rule.id
    return doc.splitlines()[0].removeprefix(f"{rule.id}: ")


def render(findings: Sequence[Finding], summary: Summary, fmt: str) -> str:
    """The report for stdout ("" for text and github when nothing was found)."""
    if fmt == "json":
        return json.dumps(
            {"findings": [f.to_dict() for f in findings], "summary": summary.__dict__}, indent=2
        )
    if fmt == "sarif":
        return json.dumps(sarif(findings), indent=2)
    line = github if fmt == "github" else text
    return "\n".join(line(f) for f in findings)
