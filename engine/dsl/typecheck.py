"""Compile-time types of template expressions, after actionlint's ``expr_sema``.

The checker walks a template's Jinja syntax tree with the types of the names in scope
(``input`` from input_schema, ``steps.X.output`` from each step type's output schema,
``item`` from the for_each list ...) and reports, through a callback, what can never work:
an unknown field of an object whose fields are all known, a field or index of a value that
has none, and an ordering comparison of incompatible types. Whatever cannot be known is
``Any`` and is never reported: a wrong report is worse than a missed one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from jinja2 import nodes

from engine.dsl.hints import suggest
from engine.dsl.issues import Path
from engine.dsl.templating import Template
from engine.dsl.types import (
    ANY,
    BOOL,
    INTEGER,
    NULL,
    NUMBER,
    STRING,
    AnyType,
    ArrayType,
    BoolType,
    NullType,
    NumberType,
    ObjectType,
    StringType,
    Type,
    bounded,
    from_schema,
    join,
    join_all,
    mismatches,
    of_value,
)
from engine.dsl.values import DictValue, ListValue, Literal, TemplateValue, Value

if TYPE_CHECKING:
    from engine.dsl.compiled import CompiledStep

Report = Callable[[str], None]
ReportAt = Callable[[str, Path], None]  # message, path relative to the workflow

# Filters whose result type does not depend on their input.
_STRING_FILTERS = frozenset(
    "join upper lower title capitalize trim string replace format truncate indent center "
    "striptags urlencode tojson escape e forceescape wordwrap filesizeformat pprint urlize "
    "xmlattr".split()
)
_INTEGER_FILTERS = frozenset({"length", "count", "wordcount", "int"})
_NUMBER_FILTERS = frozenset({"float", "round"})
# Filters giving back their array unchanged in type.
_SAME_ARRAY_FILTERS = frozenset(
    {"sort", "unique", "reverse", "select", "reject", "selectattr", "rejectattr"}
)
_ELEMENT_FILTERS = frozenset({"first", "last", "min", "max", "random"})
# Reading these is a probe: a missing field is what they are there to handle.
_PROBING_FILTERS = frozenset({"default", "d"})
_PROBING_TESTS = frozenset({"defined", "undefined", "none"})
_ORDERING = {"lt": "<", "lteq": "<=", "gt": ">", "gteq": ">="}
# Python's own attributes of each kind (str.upper, list.count ...) that a template may call.
_PY_TYPES: dict[type[Type], tuple[type, ...]] = {
    StringType: (str,),
    ArrayType: (list,),
    ObjectType: (dict,),
    NumberType: (int, float),
    BoolType: (bool,),
    NullType: (type(None),),
}


def element(t: Type) -> Type:
    """The type of one item when iterating ``t`` (Jinja iterates a string by characters
    and an object by its keys)."""
    if isinstance(t, ArrayType):
        return t.elem
    if isinstance(t, StringType | ObjectType):
        return STRING
    return ANY


class Checker:
    """Infers the types of one template's expressions, reporting what can never work."""

    def __init__(self, names: Mapping[str, Type], report: Report) -> None:
        self.names = dict(names)
        self.report = report

    # -- statements (templates with text, {% if %} and {% for %}) ----------------------------
    def check_template(self, ast: nodes.Template) -> None:
        self._body(ast.body)

    def _body(self, body: list[nodes.Node]) -> None:
        for node in body:
            self._statement(node)

    def _statement(self, node: nodes.Node) -> None:
        if isinstance(node, nodes.Output):
            for part in node.nodes:
                if not isinstance(part, nodes.TemplateData):
                    self.infer(part)
        elif isinstance(node, nodes.For):
            over = self.infer(node.iter)
            outer = dict(self.names)
            self._bind(node.target, element(over))
            self.names["loop"] = ANY
            if node.test is not None:
                self.infer(node.test)
            self._body(node.body)
            self.names = outer
            self._body(node.else_)
        elif isinstance(node, nodes.If):
            self.infer(node.test)
            self._body(node.body)
            for branch in node.elif_:
                self._statement(branch)
            self._body(node.else_)
        elif isinstance(node, nodes.Assign | nodes.AssignBlock):
            # A {% set %} may be reassigned in a loop or branch: its type is not tracked.
            if isinstance(node, nodes.Assign):
                self.infer(node.node)
            else:
                self._body(node.body)
            self._bind(node.target, ANY)
        else:
            # Other statements (filter and with blocks): check their expressions, knowing
            # nothing of the names they bind.
            for child in node.iter_child_nodes():
                if isinstance(child, nodes.Expr):
                    self.infer(child)
                else:
                    self._statement(child)

    def _bind(self, target: nodes.Node, t: Type) -> None:
        if isinstance(target, nodes.Name):
            self.names[target.name] = t
        else:  # unpacking: {% for k, v in ... %}
            for name in target.find_all(nodes.Name):
                self.names[name.name] = ANY

    # -- expressions -------------------------------------------------------------------------
    def infer(self, node: nodes.Node, *, probe: bool = False) -> Type:
        """The type of an expression; ``probe``: a missing field is expected (the operand
        of ``default`` or ``is defined``), so none is reported."""
        if isinstance(node, nodes.Const):
            return of_value(node.value)
        if isinstance(node, nodes.Name):
            return self.names.get(node.name, ANY)
        if isinstance(node, nodes.Getattr):
            owner = self.infer(node.node, probe=probe)
            return self.field(owner, node.attr, node.node, probe=probe)
        if isinstance(node, nodes.Getitem):
            return self.getitem(node, probe=probe)
        if isinstance(node, nodes.List | nodes.Tuple):
            return bounded(ArrayType(join_all([self.infer(i) for i in node.items])))
        if isinstance(node, nodes.Dict):
            return self.dict_literal(node)
        if isinstance(node, nodes.Compare):
            return self.compare(node)
        if isinstance(node, nodes.CondExpr):
            self.infer(node.test)
            then = self.infer(node.expr1)
            # Without an else, a false test gives an undefined value: unknown.
            return join(then, self.infer(node.expr2)) if node.expr2 is not None else ANY
        if isinstance(node, nodes.Filter):
            return self.filter(node)
        if isinstance(node, nodes.Test):
            self.infer(node.node, probe=node.name in _PROBING_TESTS)
            self._args(node)
            return BOOL
        if isinstance(node, nodes.Not):
            self.infer(node.node)
            return BOOL
        if isinstance(node, nodes.And | nodes.Or):
            # Python semantics: the result is one of the operands.
            return join(self.infer(node.left), self.infer(node.right))
        if isinstance(node, nodes.Concat):
            for part in node.nodes:
                self.infer(part)
            return STRING
        if isinstance(node, nodes.BinExpr):
            return self.arithmetic(node)
        if isinstance(node, nodes.UnaryExpr):
            operand = self.infer(node.node)
            return operand if isinstance(operand, NumberType) else ANY
        if isinstance(node, nodes.Call):
            self.infer(node.node)
            self._args(node)
            return ANY
        for child in node.iter_child_nodes():
            if isinstance(child, nodes.Expr):
                self.infer(child)
        return ANY

    def _args(self, node: nodes.Call | nodes.Filter | nodes.Test) -> list[Type]:
        args = [self.infer(a) for a in node.args]
        for kw in node.kwargs:
            self.infer(kw.value)
        for dyn in (node.dyn_args, node.dyn_kwargs):
            if dyn is not None:
                self.infer(dyn)
        return args

    def dict_literal(self, node: nodes.Dict) -> Type:
        props: dict[str, Type] = {}
        strict = True
        for pair in node.items:
            value = self.infer(pair.value)
            if isinstance(pair.key, nodes.Const) and isinstance(pair.key.value, str):
                props[pair.key.value] = value
            else:
                self.infer(pair.key)
                strict = False  # a computed key: any name may be there
        return bounded(ObjectType(props, strict=strict))

    # -- fields and indexes --------------------------------------------------------------------
    def field(self, owner: Type, name: str, where: nodes.Node, *, probe: bool) -> Type:
        """``owner.name`` (and ``owner['name']``, which Jinja resolves alike)."""
        if isinstance(owner, AnyType):
            return ANY
        if isinstance(owner, ObjectType) and name in owner.props:
            return owner.props[name]
        if any(hasattr(py, name) for py in _PY_TYPES[type(owner)]):
            return ANY  # a method (str.upper, list.index, dict.items): called, not read
        if isinstance(owner, ObjectType) and not owner.strict:
            if owner.typos and suggest(name, owner.props) and not probe:
                self.report(no_field(describe(where), owner, name))
            return ANY
        if not probe:
            self.report(no_field(describe(where), owner, name))
        return ANY

    def getitem(self, node: nodes.Getitem, *, probe: bool) -> Type:
        owner = self.infer(node.node, probe=probe)
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            return self.field(owner, node.arg.value, node.node, probe=probe)
        if isinstance(node.arg, nodes.Slice):
            for part in (node.arg.start, node.arg.stop, node.arg.step):
                if part is not None:
                    self.infer(part)
            key: Type = ANY
        else:
            key = self.infer(node.arg)
        if isinstance(owner, AnyType | ObjectType):
            return ANY
        if isinstance(owner, ArrayType | StringType):
            if isinstance(node.arg, nodes.Slice):
                return owner
            if isinstance(key, StringType):
                return ANY  # a computed name: Jinja looks it up as an attribute
            return owner.elem if isinstance(owner, ArrayType) else STRING
        if not probe:
            self.report(
                f"{describe(node.node)} is {owner}: it cannot be indexed "
                "(only a list, a string or an object can)"
            )
        return ANY

    # -- operators -------------------------------------------------------------------------------
    def compare(self, node: nodes.Compare) -> Type:
        left_node, left = node.expr, self.infer(node.expr)
        for operand in node.ops:
            right = self.infer(operand.expr)
            if operand.op in _ORDERING and not orderable(left, right):
                self.report(
                    f"cannot compare {describe(left_node)} ({left}) with "
                    f"{describe(operand.expr)} ({right}) using '{_ORDERING[operand.op]}'"
                )
            elif operand.op in ("in", "notin") and isinstance(
                right, NumberType | BoolType | NullType
            ):
                self.report(
                    f"'in' needs a list, a string or an object, but {describe(operand.expr)} "
                    f"is {right}"
                )
            left_node, left = operand.expr, right
        return BOOL

    def arithmetic(self, node: nodes.BinExpr) -> Type:
        left, right = self.infer(node.left), self.infer(node.right)
        if isinstance(left, NumberType) and isinstance(right, NumberType):
            whole = left.integer and right.integer and not isinstance(node, nodes.Div)
            return INTEGER if whole else NUMBER
        if isinstance(node, nodes.Div):
            return ANY
        if (
            isinstance(node, nodes.Add)
            and left == right
            and isinstance(left, StringType | ArrayType)
        ):
            return left
        return ANY

    # -- filters -----------------------------------------------------------------------------------
    def filter(self, node: nodes.Filter) -> Type:
        name = node.name
        base = ANY if node.node is None else self.infer(node.node, probe=name in _PROBING_FILTERS)
        args = self._args(node)
        if name in _PROBING_FILTERS:
            return join(base, args[0]) if args else base
        if name == "map":
            return self.map_filter(base, node, args)
        return filter_result(name, base)

    def map_filter(self, base: Type, node: nodes.Filter, args: list[Type]) -> Type:
        item = element(base) if isinstance(base, ArrayType) else ANY
        for kw in node.kwargs:
            if kw.key == "attribute" and isinstance(kw.value, nodes.Const):
                attribute = kw.value.value
                if isinstance(item, ObjectType) and isinstance(attribute, str):
                    return ArrayType(item.props.get(attribute, ANY))
                return ArrayType(ANY)
        if node.args and isinstance(node.args[0], nodes.Const) and len(node.args) == 1:
            return ArrayType(filter_result(str(node.args[0].value), item))
        return ArrayType(ANY)


def filter_result(name: str, base: Type) -> Type:
    """The type a filter gives for an input of type ``base`` (Any where not modelled)."""
    if name in _STRING_FILTERS:
        return STRING
    if name in _INTEGER_FILTERS:
        return INTEGER
    if name in _NUMBER_FILTERS:
        return NUMBER
    if name == "abs":
        return base if isinstance(base, NumberType) else ANY
    if name == "list":
        return ArrayType(element(base))
    if name in _SAME_ARRAY_FILTERS:
        return base if isinstance(base, ArrayType) else ANY
    if name in _ELEMENT_FILTERS:
        return element(base) if isinstance(base, ArrayType | StringType) else ANY
    if name == "sum":
        return element(base) if isinstance(element(base), NumberType) else ANY
    return ANY


def orderable(left: Type, right: Type) -> bool:
    """Whether ``<`` may work on the two (Python refuses, e.g., a string with a number)."""
    if isinstance(left, AnyType) or isinstance(right, AnyType):
        return True
    if isinstance(left, NumberType | BoolType) and isinstance(right, NumberType | BoolType):
        return True
    return type(left) is type(right) and isinstance(left, StringType | ArrayType)


def no_field(owner_text: str, owner: Type, name: str) -> str:
    if isinstance(owner, ObjectType):
        hint = suggest(name, owner.props)
        return f"{owner_text} has no field '{name}'{hint}; its type is {owner}"
    if isinstance(owner, ArrayType):
        return (
            f"{owner_text} is {owner}: it has no field '{name}' "
            "(index an item first, e.g. [0], or iterate it)"
        )
    return f"{owner_text} is {owner}: it has no field '{name}'"


def describe(node: nodes.Node) -> str:
    """The expression as written, for a plain reference chain; else a generic name."""
    parts: list[str] = []
    while True:
        if isinstance(node, nodes.Getattr):
            parts.append(f".{node.attr}")
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            parts.append(f"[{node.arg.value!r}]")
        elif isinstance(node, nodes.Name):
            return node.name + "".join(reversed(parts))
        elif isinstance(node, nodes.Const) and not parts:
            return repr(node.value)
        else:
            return "the value"
        node = node.node


# -- a whole workflow ---------------------------------------------------------------------------
def input_type(schema: Any) -> Type:
    """``input``. JSON Schema lets a caller pass keys input_schema does not declare, so
    an undeclared key is no mistake in itself; one close to a declared key (``qeury``
    beside ``query``) is a typo, unless ``additionalProperties`` is spelt out."""
    t = from_schema(schema)
    if (
        isinstance(t, ObjectType)
        and not t.strict
        and isinstance(schema, dict)
        and "additionalProperties" not in schema
        and "patternProperties" not in schema
    ):
        return ObjectType(t.props, typos=True)
    return t


def base_names(input_schema: Any, roles: Mapping[str, bool]) -> dict[str, Type]:
    """The names every template sees, bar ``steps``; ``roles``: role -> optional. Config keys
    are Any: a caller may override any key, or add one, with a value of any type."""
    return {
        "input": input_type(input_schema),
        "config": ObjectType(),
        "models": ObjectType(
            {role: ANY if optional else STRING for role, optional in roles.items()}
        ),
    }


def step_state(output: Type, repeats: bool) -> Type:
    """``steps.X``. Not strict: unknown attributes are reported by the reference check."""
    return ObjectType(
        {
            "output": output,
            "status": STRING,
            "ran": BOOL,
            "error": ANY,  # a message, or null
            "attempts": INTEGER,
            "iterations": INTEGER if repeats else ANY,
            "until_met": ANY,  # a boolean once a repeat step has run, else null
        }
    )


class WorkflowChecker:
    """Types every template of a compiled workflow's steps, in dependency order, so that
    each step's output type is known before a later step reads it."""

    def __init__(self, names: Mapping[str, Type], report: ReportAt) -> None:
        self.names = dict(names)
        self.states: dict[str, Type] = {}
        self._report = report
        self._seen: set[tuple[str, Path]] = set()

    def report(self, message: str, path: Path) -> None:
        if (message, path) not in self._seen:  # one template may repeat an expression
            self._seen.add((message, path))
            self._report(message, path)

    def scope(self, **extra: Type) -> dict[str, Type]:
        return {**self.names, "steps": ObjectType(dict(self.states)), **extra}

    def check_steps(self, steps: Iterable[tuple[CompiledStep, Path]]) -> None:
        for step, path in steps:
            output = bounded(self.step_output(step, path))
            self.states[step.id] = step_state(output, step.repeat is not None)

    def step_output(self, step: CompiledStep, path: Path) -> Type:
        outer = self.scope()
        if step.when is not None:
            self.value(step.when, (*path, "when"), outer)
        inner: dict[str, Type] = outer
        if step.for_each is not None:
            items = self.value(step.for_each, (*path, "for_each"), outer)
            # A literal, or text around a template, the compiler has judged already.
            each = step.for_each
            if (
                isinstance(each, TemplateValue)
                and each.template.native
                and not isinstance(items, AnyType | ArrayType)
            ):
                self.report(
                    f"for_each must give a list, but {each.template.source.strip()} is {items}",
                    (*path, "for_each"),
                )
            inner = {
                **outer,
                "item": element(items) if isinstance(items, ArrayType) else ANY,
                "index": INTEGER,
            }
        plugin = step.plugin
        declared = (
            ANY
            if plugin.output_param is not None
            else from_schema(plugin.output_schema_for(step.raw_params, step.prepared))
        )
        if step.repeat is not None:
            inner = {**outer, "iteration": INTEGER, "previous": declared}
        params = step.params
        if isinstance(params, DictValue):
            types = {k: self.value(v, (*path, k), inner) for k, v in params.items.items()}
        elif isinstance(params, Literal) and isinstance(params.value, dict):
            types = {k: of_value(v) for k, v in params.value.items()}
        else:
            types = {}
        result = types.get(plugin.output_param, ANY) if plugin.output_param else declared
        if step.repeat is not None:
            self.value(step.repeat.until, (*path, "repeat", "until"), {**inner, "output": result})
        if step.for_each is not None:
            result = ArrayType(result)
        # A step that is skipped, or fails with on_error: continue, outputs its default
        # (null without one).
        if step.default is not None:
            return join(result, self.value(step.default, (*path, "default"), outer))
        return join(result, NULL) if step.on_error == "continue" else result

    def check_output(
        self, output: Value | None, sinks: list[str], schema: dict[str, Any] | None
    ) -> Type:
        """The workflow's output type, checked against its output_schema."""
        if output is not None:
            result = self.value(output, ("output",), self.scope())
        else:
            states = {sid: self.states.get(sid, ANY) for sid in sinks}
            result = ObjectType(
                {
                    sid: s.props["output"] if isinstance(s, ObjectType) else ANY
                    for sid, s in states.items()
                },
                strict=True,
            )
        if schema is None:
            return bounded(result)
        for where, problem in mismatches(result, schema, root="the output"):
            self.report(f"output_schema is not met: {problem}", ("output", *where))
        return from_schema(schema)

    def value(self, value: Value, path: Path, names: Mapping[str, Type]) -> Type:
        """The type of a compiled value, reporting on each template at its own path."""
        if isinstance(value, TemplateValue):
            return self.template(value.template, path, names)
        if isinstance(value, DictValue):
            return bounded(
                ObjectType(
                    {k: self.value(v, (*path, k), names) for k, v in value.items.items()},
                    strict=True,
                )
            )
        if isinstance(value, ListValue):
            return bounded(
                ArrayType(
                    join_all([self.value(v, (*path, i), names) for i, v in enumerate(value.items)])
                )
            )
        if isinstance(value, Literal):
            return of_value(value.value)
        return ANY

    def template(self, template: Template, path: Path, names: Mapping[str, Type]) -> Type:
        checker = Checker(names, lambda message: self.report(message, path))
        try:
            if template.expression_node is not None:
                return checker.infer(template.expression_node)
            checker.check_template(template.ast)
        except RecursionError:
            # A chain just shallow enough for Jinja's parser: left untyped, not a crash.
            return ANY
        return STRING
