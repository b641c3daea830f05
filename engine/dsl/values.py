"""A workflow value (a step parameter, ``output``) compiled to a tree whose template leaves
are compiled once; rendering walks the tree and evaluates only the templates."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from engine.dsl.issues import Path
from engine.dsl.templating import Template, TemplateCompileError, is_template

# Results of the value's sandboxed templates, rendered beforehand (engine.dsl.rendering).
Rendered = Mapping[Template, Any]


class Value:
    __slots__ = ("sandboxed",)
    # The templates that must render in the sandbox (not provably linear), in tree order.
    sandboxed: tuple[Template, ...]

    def render(self, ctx: Mapping[str, Any], done: Rendered | None = None) -> Any:
        raise NotImplementedError


class Literal(Value):
    __slots__ = ("mutable", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.mutable = isinstance(value, dict | list)
        self.sandboxed = ()

    def render(self, ctx: Mapping[str, Any], done: Rendered | None = None) -> Any:
        # A fresh copy per render: a step that mutates its parameters must not change
        # the workflow for the next run.
        return copy.deepcopy(self.value) if self.mutable else self.value


class TemplateValue(Value):
    __slots__ = ("template",)

    def __init__(self, template: Template) -> None:
        self.template = template
        self.sandboxed = () if template.linear else (template,)

    def render(self, ctx: Mapping[str, Any], done: Rendered | None = None) -> Any:
        if done is not None and self.template in done:
            return done[self.template]
        return self.template.render(ctx)


class ListValue(Value):
    __slots__ = ("items",)

    def __init__(self, items: list[Value]) -> None:
        self.items = items
        self.sandboxed = tuple(t for item in items for t in item.sandboxed)

    def render(self, ctx: Mapping[str, Any], done: Rendered | None = None) -> Any:
        return [item.render(ctx, done) for item in self.items]


class DictValue(Value):
    __slots__ = ("items",)

    def __init__(self, items: dict[str, Value]) -> None:
        self.items = items
        self.sandboxed = tuple(t for item in items.values() for t in item.sandboxed)

    def render(self, ctx: Mapping[str, Any], done: Rendered | None = None) -> Any:
        return {key: value.render(ctx, done) for key, value in self.items.items()}


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
