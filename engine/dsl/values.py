"""A workflow value (a step parameter, ``output``) compiled to a tree whose template leaves
are compiled once; rendering walks the tree and evaluates only the templates."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from engine.dsl.issues import Path
from engine.dsl.templating import Template, TemplateCompileError, is_template


class Value:
    __slots__ = ()

    def render(self, ctx: Mapping[str, Any]) -> Any:
        raise NotImplementedError


class Literal(Value):
    __slots__ = ("mutable", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.mutable = isinstance(value, dict | list)

    def render(self, ctx: Mapping[str, Any]) -> Any:
        # A fresh copy per render: a step that mutates its parameters must not change
        # the workflow for the next run.
        return copy.deepcopy(self.value) if self.mutable else self.value


class TemplateValue(Value):
    __slots__ = ("template",)

    def __init__(self, template: Template) -> None:
        self.template = template

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return self.template.render(ctx)


class ListValue(Value):
    __slots__ = ("items",)

    def __init__(self, items: list[Value]) -> None:
        self.items = items

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return [item.render(ctx) for item in self.items]


class DictValue(Value):
    __slots__ = ("items",)

    def __init__(self, items: dict[str, Value]) -> None:
        self.items = items

    def render(self, ctx: Mapping[str, Any]) -> Any:
        return {key: value.render(ctx) for key, value in self.items.items()}


OnTemplate = Callable[[Path, Template], None]
OnError = Callable[[Path, TemplateCompileError], None]


def compile_value(
    value: Any,
    path: Path,
    names: frozenset[str],
    on_template: OnTemplate,
    on_error: OnError,
) -> Value:
    """Compile every template in ``value``; a subtree without templates stays one Literal."""
    if is_template(value):
        try:
            template = Template(value, names)
        except TemplateCompileError as exc:
            on_error(path, exc)
            return Literal(value)
        on_template(path, template)
        return TemplateValue(template)
    if isinstance(value, dict):
        items = {
            k: compile_value(v, (*path, k), names, on_template, on_error) for k, v in value.items()
        }
        if all(isinstance(v, Literal) for v in items.values()):
            return Literal(value)
        return DictValue(items)
    if isinstance(value, list):
        elements = [
            compile_value(v, (*path, i), names, on_template, on_error) for i, v in enumerate(value)
        ]
        if all(isinstance(v, Literal) for v in elements):
            return Literal(value)
        return ListValue(elements)
    return Literal(value)
