"""`fusion validate`'s lint rules: mistakes a workflow compiles with but that are almost
certainly not what its author meant. Each rule is its own module; RULES lists them."""

from __future__ import annotations

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Rule, Severity
from engine.dsl.lint.registry import RULES
from engine.dsl.lint.suppress import unsuppressed
from engine.dsl.source import Document

__all__ = ["RULES", "Finding", "Rule", "Severity", "lint"]


def lint(workflow: CompiledWorkflow, doc: Document, text: str = "") -> list[Finding]:
    """Every rule's findings for one compiled workflow, in source order, less those its
    ``text`` silences with ``# lint: ignore[...]`` comments (engine.dsl.lint.suppress)."""
    found = [f for rule in RULES for f in rule.check(workflow, doc)]
    found.sort(key=lambda f: (f.issue.line or 0, f.issue.col or 0, f.rule))
    return unsuppressed(found, text)
