"""Sandboxed Jinja templates for workflow values.

Every template is parsed and compiled once, when the workflow is loaded. A value that is
exactly one ``{{ expr }}`` evaluates to the expression's native value (a list stays a list);
any other template renders to a string. Parsing also yields the template's references
(``steps.X.output``, ``models.role`` ...) so the compiler can derive dependencies from the
syntax tree rather than from a regex, and refuse escapes before anything runs.
"""

from __future__ import annotations

import operator
import re
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    ValuesView,
)
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog
from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.dsl.hints import suggest

log = structlog.get_logger(__name__)

MAX_RANGE = 10_000
MAX_REPEAT = 1_000_000  # longest string/list a `*` may build
MAX_EXPONENT = 256

_NATIVE = re.compile(r"^\{\{[-+]?(?P<expr>.*?)[-+]?\}\}$", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")
# Jinja statements that reach outside the template (loaders) have no place in a value.
_FORBIDDEN_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Include, "include"),
    (nodes.Import, "import"),
    (nodes.FromImport, "import"),
    (nodes.Extends, "extends"),
    (nodes.Macro, "macro"),
    (nodes.CallBlock, "call"),
)


class TemplateCompileError(Exception):
    """A template that cannot be accepted: bad syntax or a refused construct."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno


class TemplateRenderError(Exception):
    """A template failed while rendering (undefined value, sandbox violation, type error)."""


@dataclass(frozen=True)
class Reference:
    """A name the template reads, with the constant attribute path after it:
    ``steps.retrieve.output[0]`` is ``Reference("steps", ("retrieve", "output", 0))``."""

    root: str
    path: tuple[str | int, ...]
    lineno: int


MAX_STRING = 1_000_000  # longest string a width, padding or replace may build
MAX_RANGE_ITEMS = 100_000  # range() items one render may iterate, nested loops included
_WIDTH = re.compile(r"(\d{7,})")  # a width or precision of a million or more
_range_budget: ContextVar[list[int] | None] = ContextVar("range_budget", default=None)


class _BoundedRange(Sequence[int]):
    """range() whose iteration draws on the render's budget, so nested loops over
    ranges cannot spin for minutes while the event loop waits."""

    def __init__(self, rng: range) -> None:
        self._rng = rng

    def __len__(self) -> int:
        return len(self._rng)

    def __getitem__(self, index: Any) -> Any:
        return self._rng[index]

    def __iter__(self) -> Iterator[int]:
        budget = _range_budget.get()
        for value in self._rng:
            if budget is not None:
                budget[0] -= 1
                if budget[0] < 0:
                    raise SecurityError(
                        f"the template iterates more than {MAX_RANGE_ITEMS} range() items"
                    )
            yield value


def _safe_range(*args: int) -> _BoundedRange:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng)} items exceeds the limit of {MAX_RANGE}")
    return _BoundedRange(rng)


def _refuse_long(size: int, what: str) -> None:
    if size > MAX_STRING:
        raise SecurityError(f"{what} would build {size} characters (limit {MAX_STRING})")


def _check_widths(fmt: Any, what: str) -> None:
    if isinstance(fmt, str) and _WIDTH.search(fmt):
        raise SecurityError(f"{what}: widths or precisions of a million or more are refused")


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _guard_call(obj: Any, args: tuple[Any, ...]) -> None:
    """Refuse str methods whose result size an argument sets, before they allocate."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _refuse_long(args[0], f"str.{name}()")
    elif name == "expandtabs" and args and isinstance(args[0], int):
        _refuse_long(len(owner) * args[0], "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        _refuse_long(_replaced_size(owner, *args[:3]), "str.replace()")


def _guarded_filters(filters: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Jinja calls filters directly, not through the sandbox's call(): wrap the ones
    whose output size an argument sets."""
    center, indent, fmt, replace = (
        filters["center"],
        filters["indent"],
        filters["format"],
        filters["replace"],
    )

    def safe_center(value: Any, width: int = 80) -> str:
        _refuse_long(int(width), "center")
        return center(value, width)

    def safe_indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> str:
        pad = width if isinstance(width, str) else " " * int(width)
        _refuse_long(len(str(value)) * (len(pad) + 1), "indent")
        return indent(value, width, *args, **kwargs)

    def safe_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_widths(value, "format")
        return fmt(value, *args, **kwargs)

    def safe_replace(eval_ctx: Any, value: Any, old: Any, new: Any, count: Any = None) -> str:
        _refuse_long(_replaced_size(str(value), str(old), str(new), count), "replace")
        return replace(eval_ctx, value, old, new, count)

    safe_replace.jinja_pass_arg = replace.jinja_pass_arg  # type: ignore[attr-defined]
    return {
        **filters,
        "center": safe_center,
        "indent": safe_indent,
        "format": safe_format,
        "replace": safe_replace,
    }


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        _guard_call(obj, args)
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox swaps str.format for its own formatter when the attribute is read,
        # so call() never sees it: check the widths here.
        if isinstance(getattr(value, "__self__", None), str):
            _check_widths(value.__self__, f"str.{getattr(value, '__name__', 'format')}()")
        return super().wrap_str_format(value)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return not attr.startswith("_") and super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Template data is JSON, so `x.name` means the key: otherwise a step named `items`
        # (or an output key `values`, `keys`, `get`...) resolves to a dict method.
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "%":
            _check_widths(left, "'%' formatting")
            return operator.mod(left, right)
        if op == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} exceeds the limit of {MAX_EXPONENT}")
            return operator.pow(left, right)
        for seq, count in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(count, int)
            if sized and len(seq) * count > MAX_REPEAT:
                raise SecurityError(
                    f"repeating a sequence to {len(seq) * count} items exceeds "
                    f"the limit of {MAX_REPEAT}"
                )
        return operator.mul(left, right)


def _new_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """``dict(...)`` for templates: the type itself would expose ``dict.update(input, ...)``,
    which the sandbox cannot see as a mutation (it checks bound methods only)."""
    return dict(*args, **kwargs)


def _make_environment() -> _Environment:
    env = _Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    # cycler/joiner/namespace/lipsum are stateful or useless in a value: only these remain.
    env.globals = {"range": _safe_range, "dict": _new_dict}
    env.filters = _guarded_filters(env.filters)
    return env


ENV = _make_environment()
GLOBAL_NAMES = frozenset(ENV.globals)
# Names that exist only in some places of a step: say where, rather than "unknown".
_SCOPED_NAMES = {
    "item": "inside a step with 'for_each'",
    "index": "inside a step with 'for_each'",
    "iteration": "inside a step with 'repeat'",
    "previous": "inside a step with 'repeat'",
    "output": "in 'repeat.until' (elsewhere use steps.<step_id>.output)",
}


# Templates built only of these nodes render in time and memory linear in the size of the
# data they read: no loops, calls, repetition, powers or %-formatting, each node evaluated
# once and yielding at most the size of its operands (filters: those that preserve size up
# to a constant factor). They render in-process; every other template renders in the
# sandbox (engine.sandbox) under a time and memory budget.
_LINEAR_NODES = frozenset(
    {
        nodes.Template,
        nodes.Output,
        nodes.TemplateData,
        nodes.If,
        nodes.Name,
        nodes.Getattr,
        nodes.Getitem,
        nodes.Slice,
        nodes.Const,
        nodes.Compare,
        nodes.Operand,
        nodes.And,
        nodes.Or,
        nodes.Not,
        nodes.Neg,
        nodes.Pos,
        nodes.CondExpr,
        nodes.Add,
        nodes.Sub,
        nodes.Div,
        nodes.FloorDiv,
        nodes.Concat,
        nodes.List,
        nodes.Tuple,
        nodes.Dict,
        nodes.Pair,
        nodes.Keyword,
        nodes.Filter,
        nodes.Test,
    }
)
_LINEAR_FILTERS = frozenset(
    {
        "default",
        "d",
        "length",
        "count",
        "lower",
        "upper",
        "trim",
        "string",
        "int",
        "float",
        "abs",
        "round",
        "first",
        "last",
        "tojson",
        "capitalize",
        "title",
        "list",
    }
)
MAX_LINEAR_NODES = 64


def _is_linear(ast: nodes.Template) -> bool:
    for count, node in enumerate(ast.find_all(nodes.Node), 1):
        if count > MAX_LINEAR_NODES or type(node) not in _LINEAR_NODES:
            return False
        if isinstance(node, nodes.Filter) and node.name not in _LINEAR_FILTERS:
            return False
    return True


def is_template(value: Any) -> bool:
    return isinstance(value, str) and any(m in value for m in _MARKERS)


class Template:
    """One compiled template string."""

    __slots__ = (
        "_ast",
        "_computed",
        "_expression",
        "_render",
        "expression_node",
        "linear",
        "native",
        "references",
        "source",
    )

    def __init__(self, source: str, allowed_names: frozenset[str] | None) -> None:
        """``allowed_names``: the root names the template may read; None when the template
        was checked already (the sandbox's copy of one)."""
        self.source = source
        try:
            ast = ENV.parse(source)
            bound = _scan(ast)
        except TemplateSyntaxError as exc:
            raise TemplateCompileError(
                f"template syntax error: {exc.message}", exc.lineno
            ) from None
        except RecursionError:
            # Jinja's parser and tree walks recurse per level of nesting (about ten frames
            # for each parenthesis): a deep expression is refused, not a crash.
            raise TemplateCompileError(
                "the template nests too deeply (parentheses, brackets or a long operator chain)"
            ) from None
        self.references = tuple(_references(ast, bound))
        if allowed_names is not None:
            for ref in self.references:
                if ref.root not in allowed_names and ref.root not in GLOBAL_NAMES:
                    raise TemplateCompileError(_unknown_name(ref.root, allowed_names), ref.lineno)
        match = _NATIVE.match(source.strip())
        # The one expression of a native template (whitespace around it does not count).
        self.expression_node = _single_expression(ast) if match else None
        self.native = self.expression_node is not None
        # A plain reference (input.x, steps.a.output[0]) yields data that is already plain;
        # anything computed (a literal, a filter, a call) may hold lazy or undefined parts.
        self._computed = self.expression_node is not None and not _is_reference(
            self.expression_node
        )
        self._expression = match.group("expr") if self.native and match else None
        self.linear = _is_linear(ast)
        self._ast = ast
        self._render: Callable[[Mapping[str, Any]], Any] | None = None

    @property
    def ast(self) -> nodes.Template:
        """The parsed template (the type checker walks it)."""
        return self._ast

    def _compile(self) -> Callable[[Mapping[str, Any]], Any]:
        """Python code generation, deferred to the first render: validating a workflow
        needs only the parse, and most of a template's cost is generating its code."""
        if self._expression is not None:
            return ENV.compile_expression(self._expression, undefined_to_none=False)
        return ENV.from_string(self._ast).render

    def render(self, context: Mapping[str, Any]) -> Any:
        budget = _range_budget.set([MAX_RANGE_ITEMS])
        try:
            if self._render is None:
                # Jinja folds constants while generating code, so a constant expression
                # that fails ('x'['x']) fails here: a render error like any other.
                self._render = self._compile()
            result = self._render(context)
            if self.native:
                result = _as_data(result, deep=self._computed)
        except UndefinedError as exc:
            raise TemplateRenderError(f"{exc.message} in {self.source!r}") from None
        except SecurityError as exc:
            raise TemplateRenderError(f"refused: {exc} in {self.source!r}") from None
        except MemoryError:
            raise  # the sandbox's budget, reported as such by its worker
        except Exception as exc:
            if not isinstance(exc, _DATA_ERRORS):
                # Still the step's failure, not the run's crash; but one of these may be
                # an engine bug rather than the template's, so it is seen in the log.
                log.warning(
                    "template_render_unexpected_error",
                    error_type=type(exc).__name__,
                    error=str(exc),
                    template=self.source[:200],
                )
            raise TemplateRenderError(f"{type(exc).__name__}: {exc} in {self.source!r}") from None
        finally:
            _range_budget.reset(budget)
        return result


# What a template does to the data it reads can fail in these ways ('a' + 1, a missing
# key, int('x'), 1 / 0, dictsort on a number, a filter's own checks): the template's
# fault, not the engine's.
_DATA_ERRORS = (
    TemplateError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    AttributeError,
    NameError,
)


def _unknown_name(name: str, allowed: frozenset[str]) -> str:
    scope = _SCOPED_NAMES.get(name)
    if scope:
        return f"'{name}' is only defined {scope}"
    available = sorted(allowed | GLOBAL_NAMES)
    return f"unknown name '{name}'{suggest(name, available)}; available: {', '.join(available)}"


def _is_reference(node: nodes.Node) -> bool:
    while isinstance(node, nodes.Getattr | nodes.Getitem):
        node = node.node
    return isinstance(node, nodes.Name)


def _as_data(value: Any, *, deep: bool) -> Any:
    """A native result as plain data. Jinja filters return lazy iterators (map, select,
    reverse), ``range`` and dict views; these become lists, or a step would get a
    generator it can consume once and never serialise. StrictUndefined only raises when
    used, so one left inside a list (``[input.missing]``) is raised here; a bound method
    (``input.s.upper`` without ``()``) is no value at all."""
    if isinstance(value, str) and type(value) is not str:
        return str(value)  # Markup (from tojson, escape): a plain string is the data
    if isinstance(value, str | int | float | bool | None):
        return value
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises with its own message
    if isinstance(value, dict):
        if not deep:
            return value
        return {_as_key(k): _as_data(v, deep=True) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_data(v, deep=True) for v in value] if deep else value
    if isinstance(
        value, tuple | range | _BoundedRange | Iterator | KeysView | ValuesView | ItemsView
    ):
        return [_as_data(v, deep=True) for v in value]
    if callable(value):
        raise TypeError(
            f"the expression gives a {type(value).__name__}, not a value (missing '()'?)"
        )
    return value


def _as_key(key: Any) -> str | int | float:
    """A mapping key the result can keep: JSON's keys are strings, and a number becomes
    one when the result is stored or sent; anything else (``{(1, 2): 3}``) has no JSON form."""
    if isinstance(key, str | int | float) and not isinstance(key, bool):
        return key
    raise TypeError(f"a mapping key must be a string or a number, not {type(key).__name__}")


def _single_expression(ast: nodes.Template) -> nodes.Node | None:
    """The expression of a template that is one ``{{ expr }}``, else None. Whitespace
    around it is ignored: a YAML block scalar (``value: >``) ends in a newline, and the
    value is still meant to keep its native type."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts = [
        n
        for n in ast.body[0].nodes
        if not (isinstance(n, nodes.TemplateData) and not n.data.strip())
    ]
    if len(parts) == 1 and not isinstance(parts[0], nodes.TemplateData):
        return parts[0]
    return None


def _scan(ast: nodes.Template) -> set[str]:
    """One walk over the tree: refuse escapes, and return the names the template binds
    itself ({% for x %}, {% set y %}, loop), which are not references."""
    bound: set[str] = set()
    forbidden = dict(_FORBIDDEN_NODES)
    for node in ast.find_all(nodes.Node):
        what = forbidden.get(type(node))
        if what is not None:
            raise TemplateCompileError(
                f"'{what}' is not allowed in workflow templates", node.lineno
            )
        if isinstance(node, nodes.Getattr | nodes.Getitem):
            name = node.attr if isinstance(node, nodes.Getattr) else _const_key(node.arg)
            if isinstance(name, str) and name.startswith("_"):
                raise TemplateCompileError(
                    f"attribute '{name}' is not allowed: names starting with '_' are private",
                    node.lineno,
                )
        elif isinstance(node, nodes.Filter | nodes.Test):
            _check_filter_or_test(node)
        elif isinstance(node, nodes.Name) and node.ctx in ("store", "param"):
            bound.add(node.name)
        elif isinstance(node, nodes.For):
            bound.add("loop")
    return bound


# Filters that take another filter's or test's name as an argument: (its position, which).
_NAME_ARGUMENTS = {
    "map": (0, "filter"),
    "select": (0, "test"),
    "reject": (0, "test"),
    "selectattr": (1, "test"),
    "rejectattr": (1, "test"),
}


def _check_filter_or_test(node: nodes.Filter | nodes.Test) -> None:
    """Jinja looks a filter or test up when it generates the code, which waits for the
    first render here, and one under an ``if`` only when that line runs: an unknown name is
    refused at load instead, wherever it is."""
    kind = "filter" if isinstance(node, nodes.Filter) else "test"
    _check_known(kind, node.name, node.lineno)
    named = _NAME_ARGUMENTS.get(node.name) if kind == "filter" else None
    if named is not None:
        position, named_kind = named
        # map(attribute='x') has no name argument; a name held in a variable is not known.
        argument = node.args[position] if len(node.args) > position else None
        if isinstance(argument, nodes.Const) and isinstance(argument.value, str):
            _check_known(named_kind, argument.value, node.lineno)


def _check_known(kind: str, name: str, lineno: int) -> None:
    if kind == "filter":
        known, other, other_use = ENV.filters, ENV.tests, f"a test ('value is {name}')"
    else:
        known, other, other_use = ENV.tests, ENV.filters, f"a filter ('value | {name}')"
    if name in known:
        return
    hint = f": '{name}' is {other_use}" if name in other else suggest(name, known)
    raise TemplateCompileError(f"unknown {kind} '{name}'{hint}", lineno)


def _const_key(node: nodes.Node) -> str | int | None:
    if isinstance(node, nodes.Const) and isinstance(node.value, str | int):
        return node.value
    return None


def _references(ast: nodes.Template, local: set[str]) -> Iterator[Reference]:
    stack: list[nodes.Node] = [ast]
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.Name | nodes.Getattr | nodes.Getitem):
            root, path, dynamic = _flatten(node)
            stack.extend(dynamic)
            if root is not None:
                if root.ctx == "load" and root.name not in local:
                    yield Reference(root.name, path, node.lineno)
                continue
        stack.extend(node.iter_child_nodes())


def _flatten(node: nodes.Node) -> tuple[nodes.Name | None, tuple[str | int, ...], list[nodes.Node]]:
    """Split ``a.b[0][x].c`` into its root Name, the constant path before the first dynamic
    subscript (``b, 0``), and the nodes still to walk (``x``). A chain on anything but a
    Name (a filter's result, a literal) has no root."""
    outer: list[str | int] = []
    dynamic: list[nodes.Node] = []
    while True:
        if isinstance(node, nodes.Getattr):
            outer.append(node.attr)
            node = node.node
        elif isinstance(node, nodes.Getitem):
            key = _const_key(node.arg)
            if key is None:
                dynamic.append(node.arg)
                outer.clear()
            else:
                outer.append(key)
            node = node.node
        elif isinstance(node, nodes.Name):
            return node, tuple(reversed(outer)), dynamic
        else:
            dynamic.append(node)
            return None, (), dynamic
