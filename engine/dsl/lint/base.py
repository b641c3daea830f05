"""The lint framework: a finding (rule, severity, located issue), the Rule protocol every
rule module implements, and the walks over a compiled workflow that rules share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from jinja2 import nodes

from engine.dsl.compiled import CompiledStep, CompiledWorkflow
from engine.dsl.issues import Issue, Path
from engine.dsl.source import Document
from engine.dsl.templating import Template
from engine.dsl.values import DictValue, ListValue, TemplateValue, Value


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    issue: Issue  # the message and where: file, line, column, key path

    def to_dict(self) -> dict[str, Any]:
        return {**self.issue.to_dict(), "rule": self.rule, "severity": self.severity.value}


class Rule(Protocol):
    """One lint rule: ``id`` (kebab-case, as reported), its default ``severity``, and a
    docstring saying what it finds and why that is a mistake."""

    id: str
    severity: Severity

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]: ...


def finding(
    rule: Rule, doc: Document, message: str, path: Path, *, at_key: bool = False
) -> Finding:
    return Finding(rule.id, rule.severity, doc.issue(message, path, at_key=at_key))


@dataclass(frozen=True)
class Located:
    """A template of the workflow, where it is written and what it belongs to."""

    path: Path
    template: Template
    step: str | None  # None: the workflow's `output`
    part: str  # "param", "when", "for_each", "until", "default" or "output"


def step_path(workflow: CompiledWorkflow, step_id: str) -> Path:
    raw_steps = workflow.definition.get("steps")
    for index, raw in enumerate(raw_steps if isinstance(raw_steps, list) else []):
        if isinstance(raw, dict) and raw.get("step_id") == step_id:
            return ("steps", index)
    return ("steps",)


def _walk(value: Value | None, path: Path) -> Iterator[tuple[Path, Template]]:
    if isinstance(value, TemplateValue):
        yield path, value.template
    elif isinstance(value, DictValue):
        for key, item in value.items.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, ListValue):
        for index, item in enumerate(value.items):
            yield from _walk(item, (*path, index))


def step_templates(workflow: CompiledWorkflow, step: CompiledStep) -> Iterator[Located]:
    base = step_path(workflow, step.id)
    parts: list[tuple[str, Value | None, Path]] = [
        ("param", step.params, base),
        ("when", step.when, (*base, "when")),
        ("for_each", step.for_each, (*base, "for_each")),
        ("until", step.repeat.until if step.repeat else None, (*base, "repeat", "until")),
        ("default", step.default, (*base, "default")),
    ]
    for part, value, path in parts:
        for where, template in _walk(value, path):
            yield Located(where, template, step.id, part)


def templates(workflow: CompiledWorkflow) -> Iterator[Located]:
    """Every template of the workflow's steps and its `output`; those of an inline child
    workflow belong to the child and are not walked."""
    for step in workflow.steps.values():
        yield from step_templates(workflow, step)
    for where, template in _walk(workflow.output, ("output",)):
        yield Located(where, template, None, "output")


def mentions_step(node: nodes.Node, step_id: str) -> bool:
    """Whether an expression reads ``steps.<step_id>`` (any attribute)."""
    for sub in [node, *node.find_all((nodes.Getattr, nodes.Getitem))]:
        if not isinstance(sub, nodes.Getattr | nodes.Getitem):
            continue
        if not (isinstance(sub.node, nodes.Name) and sub.node.name == "steps"):
            continue
        if isinstance(sub, nodes.Getattr) and sub.attr == step_id:
            return True
        if (
            isinstance(sub, nodes.Getitem)
            and isinstance(sub.arg, nodes.Const)
            and sub.arg.value == step_id
        ):
            return True
    return False
