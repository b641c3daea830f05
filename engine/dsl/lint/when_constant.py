"""when-constant: a `when` whose value never changes from run to run."""

from __future__ import annotations

from jinja2 import nodes

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Severity, finding, step_path
from engine.dsl.source import Document
from engine.dsl.templating import GLOBAL_NAMES, Template, TemplateRenderError
from engine.dsl.values import TemplateValue


class WhenConstant:
    """A `when` template that is always true or always false: an expression that reads
    nothing (``{{ 1 == 1 }}``), or text around a template such as
    ``"{{ input.mode }} == 'slow'"``, which renders to a non-empty string, and any
    non-empty string is truthy. The comparison belongs inside the braces:
    ``"{{ input.mode == 'slow' }}"``. A literal `true` or `false` is taken as meant
    (switching a step off by hand)."""

    id = "when-constant"
    severity = Severity.WARNING

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        found = []
        for sid, step in workflow.steps.items():
            path = (*step_path(workflow, sid), "when")
            # A literal `true` or `false` (the schema allows no other) is meant as written.
            if isinstance(step.when, TemplateValue):
                message = _template_message(step.when.template)
                if message:
                    found.append(finding(self, doc, message, path))
        return found


def _constant(value: bool | None, what: str) -> str:
    if value is None:
        return f"'when' is {what}: it gives the same value on every run"
    runs = "always runs" if value else "never runs (it is always skipped)"
    return f"'when' is {what}: the step {runs}"


def _template_message(template: Template) -> str | None:
    source = template.source.strip()
    if not template.native:
        if _has_outer_text(template):
            return (
                f"'when' is text around a template ({source!r}): it renders to a non-empty "
                "string, which is always true; put the whole condition inside one "
                "{{ expression }}, e.g. \"{{ input.mode == 'slow' }}\""
            )
        return None
    if any(ref.root not in GLOBAL_NAMES for ref in template.references):
        return None
    value: bool | None = None
    if template.linear:  # renders in-process in bounded time: safe to evaluate here
        try:
            value = bool(template.render({}))
        except TemplateRenderError:
            return None  # fails at run time, which is another problem
    return _constant(value, f"a constant expression ({source})")


def _has_outer_text(template: Template) -> bool:
    """Text outside any {% if %} or loop: the rendering can never be empty."""
    return any(
        isinstance(node, nodes.Output)
        and any(isinstance(n, nodes.TemplateData) and n.data for n in node.nodes)
        for node in template.ast.body
    )
