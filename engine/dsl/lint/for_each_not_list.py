"""for-each-not-list: a `for_each` over a value that is not a list."""

from __future__ import annotations

from typing import Any

from jinja2 import nodes

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Severity, finding, step_path
from engine.dsl.source import Document
from engine.dsl.values import TemplateValue


class ForEachNotList:
    """``for_each: "{{ config.KEY }}"`` (or ``input.NAME``) where the workflow's own value
    for it, the `config` entry or the input's schema `default`, is not a list. The type
    checker cannot tell: config keys are typed `any`, as a caller may override them, and an
    input property without a `type` is `any` too. A literal that is no list, or an
    expression whose type is known not to be one, is a compile error already."""

    id = "for-each-not-list"
    severity = Severity.WARNING

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        found = []
        for sid, step in workflow.steps.items():
            each = step.for_each
            if not isinstance(each, TemplateValue) or not _plain_reference(each.template):
                continue
            (ref,) = each.template.references
            if len(ref.path) != 1:
                continue
            key = str(ref.path[0])
            value, where = _own_value(workflow, ref.root, key)
            if where and not isinstance(value, list):
                found.append(
                    finding(
                        self,
                        doc,
                        f"for_each reads {ref.root}.{key}, whose {where} is "
                        f"{_kind(value)} ({value!r}), not a list: the step fails unless "
                        "every caller passes a list",
                        (*step_path(workflow, sid), "for_each"),
                    )
                )
        return found


def _plain_reference(template: Any) -> bool:
    node = template.expression_node
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        node = node.node
    return isinstance(node, nodes.Name) and len(template.references) == 1


def _own_value(workflow: CompiledWorkflow, root: str, key: str) -> tuple[Any, str | None]:
    if root == "config" and key in workflow.config:
        return workflow.config[key], "value in 'config'"
    props = workflow.input_schema.get("properties")
    prop = props.get(key) if root == "input" and isinstance(props, dict) else None
    if isinstance(prop, dict) and "default" in prop and "type" not in prop:
        return prop["default"], "default in input_schema"
    return None, None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "null"
