"""Unit tests of engine.dsl.templating: native values, strict undefined, the sandbox at
render time, and the references parsed out of a template's syntax tree."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dsl.templating import (
    MAX_RANGE,
    MAX_RANGE_ITEMS,
    Reference,
    Template,
    TemplateCompileError,
    TemplateRenderError,
    is_template,
)

NAMES = frozenset({"input", "config", "models", "steps"})


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {
        "input": {
            "xs": [1, 2, 3],
            "d": {"k": "v"},
            "n": 7,
            "flag": True,
            "nothing": None,
            "s": "Hello",
            "docs": [{"text": "a"}, {"text": "b"}],
        },
        "config": {"top_k": 5},
        "models": {"gen": "qwen-7b"},
        "steps": {"a": {"output": [{"text": "first"}], "status": "completed", "ran": True}},
    }


def render(source: str, ctx: dict[str, Any], names: frozenset[str] = NAMES) -> Any:
    return Template(source, names).render(ctx)


# -- native values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ input.xs }}", [1, 2, 3]),
        ("{{ input.d }}", {"k": "v"}),
        ("{{ input.n }}", 7),
        ("{{ input.n / 2 }}", 3.5),
        ("{{ input.flag }}", True),
        ("{{ input.nothing }}", None),
        ("{{ input.xs | length > 2 }}", True),
        ("{{ config.top_k * 4 }}", 20),
        ("{{ [input.n, input.s] }}", [7, "Hello"]),
        ("{{ {'a': input.n} }}", {"a": 7}),
        ("{{ steps.a.output[0] }}", {"text": "first"}),
        # whitespace around the one expression does not make it text
        ("  {{ input.xs }}  ", [1, 2, 3]),
        ("{{ input.xs }}\n", [1, 2, 3]),  # a YAML block scalar ends in a newline
        ("{{- input.xs -}}", [1, 2, 3]),
        ("{{input.xs}}", [1, 2, 3]),
    ],
)
def test_single_expression_keeps_native_type(
    source: str, expected: Any, ctx: dict[str, Any]
) -> None:
    template = Template(source, NAMES)
    assert template.native
    result = template.render(ctx)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("n={{ input.n }}", "n=7"),
        ("{{ input.n }}{{ input.n }}", "77"),
        ("{{ input.n }} {{ input.flag }}", "7 True"),
        ("{{ input.xs }} items", "[1, 2, 3] items"),
        ("{% if input.flag %}{{ input.n }}{% endif %}", "7"),
        ("{% for x in input.xs %}{{ x }},{% endfor %}", "1,2,3,"),
    ],
)
def test_mixed_text_renders_to_a_string(source: str, expected: str, ctx: dict[str, Any]) -> None:
    template = Template(source, NAMES)
    assert not template.native
    assert template.render(ctx) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ input.xs | map('string') }}", ["1", "2", "3"]),
        ("{{ input.docs | map(attribute='text') }}", ["a", "b"]),
        ("{{ input.xs | select('odd') }}", [1, 3]),
        ("{{ input.xs | reverse }}", [3, 2, 1]),
        ("{{ range(3) }}", [0, 1, 2]),
        ("{{ input.d.items() }}", [["k", "v"]]),
        ("{{ (1, 2) }}", [1, 2]),
    ],
)
def test_lazy_results_become_lists(source: str, expected: list[Any], ctx: dict[str, Any]) -> None:
    """Jinja filters return generators: a native value must be data a step can use twice
    and the run can serialise, so they are materialised."""
    assert render(source, ctx) == expected


def test_a_method_without_call_is_not_a_value(ctx: dict[str, Any]) -> None:
    with pytest.raises(TemplateRenderError, match=r"gives a builtin_function_or_method.*'\(\)'"):
        render("{{ input.s.upper }}", ctx)
    assert render("{{ input.s.upper() }}", ctx) == "HELLO"


def test_is_template() -> None:
    assert is_template("{{ x }}")
    assert is_template("a {% if x %}b{% endif %}")
    assert is_template("{# comment #}")
    assert not is_template("plain text")
    assert not is_template("{ not: a template }")
    assert not is_template(5)


# -- undefined values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ input.missing }}", "'dict object' has no attribute 'missing'"),
        ("x {{ input.missing }}", "'dict object' has no attribute 'missing'"),
        ("{{ input.xs[10] }}", "no element 10"),
        ("{{ steps.a.output[0].nope }}", "has no attribute 'nope'"),
        # StrictUndefined only raises when used: one left inside a container still fails
        ("{{ [input.missing] }}", "has no attribute 'missing'"),
        ("{{ {'k': input.missing} }}", "has no attribute 'missing'"),
        ("{{ input.docs | map(attribute='nope') | list }}", "has no attribute 'nope'"),
    ],
)
def test_undefined_raises_with_a_clear_message(
    source: str, message: str, ctx: dict[str, Any]
) -> None:
    with pytest.raises(TemplateRenderError) as info:
        render(source, ctx)
    assert message in str(info.value)
    assert repr(source) in str(info.value)  # names the template that failed


# -- the sandbox at render time -----------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ range(10**9) }}", f"exceeds the limit of {MAX_RANGE}"),
        ("{{ range(10**9) | list | length }}", f"exceeds the limit of {MAX_RANGE}"),
        ("{{ 'a' * 10**8 }}", "repeating a sequence to 100000000 items"),
        ("{{ 10**8 * 'a' }}", "repeating a sequence to 100000000 items"),
        ("{{ input.xs * 10**6 }}", "repeating a sequence to 3000000 items"),
        ("{{ 2 ** 100000 }}", "exponent 100000 exceeds the limit"),
        ("{{ 2.0 ** 1000 }}", "exponent 1000 exceeds the limit"),
        # a dynamic attribute walk cannot be refused statically: the sandbox refuses it
        ("{{ input | attr('__class__') }}", "access to attribute '__class__' of 'dict'"),
        ("{{ input | attr('__cl' ~ 'ass__') }}", "access to attribute '__class__'"),
        ("{{ input.s[input.s[:0] ~ '__class__'] }}", "access to attribute '__class__'"),
        ("{{ input.docs | map(attribute='__class__') | list }}", "attribute '__class__'"),
        ("{{ '{0.__class__}'.format(input.s) }}", "access to attribute '__class__'"),
        ("{{ dict.mro() }}", "has no attribute 'mro'"),
        # `dict` is a function, not the type: dict.update(input, ...) cannot mutate the run
        ("{{ dict.update(input, {'x': 1}) }}", "has no attribute 'update'"),
        # values are immutable: templates cannot change the run's data
        ("{{ input.xs.append(4) }}", "attribute 'append' of 'list' object is unsafe"),
        ("{{ input.d.update({'k': 1}) }}", "attribute 'update' of 'dict' object is unsafe"),
        ("{{ input.xs.pop() }}", "attribute 'pop' of 'list' object is unsafe"),
        # output sizes set by an argument are checked before anything is allocated
        ("{{ '%0999999999d' | format(1) }}", "format: widths or precisions of a million"),
        ("{{ '%09999999d' % 1 }}", "'%' formatting: widths or precisions"),
        ("{{ '{:>9999999}'.format(1) }}", "str.format(): widths or precisions"),
        ("{{ '{0:>9999999}'.format_map({}) }}", "str.format_map(): widths"),
        ("{{ 'x' | center(10**9) }}", "center would build 1000000000 characters"),
        ("{{ 'x'.ljust(10**9) }}", "str.ljust() would build 1000000000 characters"),
        ("{{ 'x'.zfill(10**9) }}", "str.zfill() would build"),
        ("{{ 'a\tb'.expandtabs(10**8) }}", "str.expandtabs() would build"),
        ("{{ 'ab' | replace('', 'x' * 999999) }}", "replace would build 2999999 characters"),
        ("{{ 'ab'.replace('', 'x' * 999999) }}", "str.replace() would build"),
        ("{{ input.s | indent(10**7) }}", "indent would build"),
        # nested loops over ranges draw on one budget per render
        (
            "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}",
            f"iterates more than {MAX_RANGE_ITEMS} range() items",
        ),
    ],
)
def test_sandbox_refuses_at_render_time(source: str, message: str, ctx: dict[str, Any]) -> None:
    before = repr(ctx)
    template = Template(source, NAMES)  # statically fine: nothing to see before running
    with pytest.raises(TemplateRenderError) as info:
        template.render(ctx)
    assert message in str(info.value)
    assert repr(ctx) == before  # nothing was changed on the way


def test_attr_walk_returns_nothing_usable(ctx: dict[str, Any]) -> None:
    """Chained attr() lookups fail at the first hop; the second never sees a class."""
    with pytest.raises(TemplateRenderError):
        render("{{ input | attr('__class__') | attr('__mro__') }}", ctx)


def test_limits_allow_ordinary_sizes(ctx: dict[str, Any]) -> None:
    assert render(f"{{{{ range({MAX_RANGE}) | list | length }}}}", ctx) == MAX_RANGE
    assert render("{{ 'ab' * 3 }}", ctx) == "ababab"
    assert render("{{ 2 ** 10 }}", ctx) == 1024
    assert render("{{ '%05d' % 42 }}", ctx) == "00042"
    assert render("{{ '{:>4}'.format(7) }}", ctx) == "   7"
    assert render("{{ 'a' | center(5) }}", ctx) == "  a  "
    assert render("{{ 'a b' | replace(' ', '-') }}", ctx) == "a-b"
    assert render("{{ range(5)[2] }}", ctx) == 2
    assert (
        render("{% for a in range(300) %}{% for b in range(300) %}{% endfor %}{% endfor %}ok", ctx)
        == "ok"
    )


# -- static refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ input.__class__ }}", "attribute '__class__' is not allowed"),
        ("{{ input.s.__class__.__mro__ }}", "is not allowed"),
        ("{{ input.__mro__ }}", "attribute '__mro__' is not allowed"),
        ("{{ input.x.__subclasses__() }}", "attribute '__subclasses__' is not allowed"),
        ("{{ range['__globals__'] }}", "attribute '__globals__' is not allowed"),
        ("{{ input._private }}", "attribute '_private' is not allowed"),
        ("{% include 'x' %}", "'include' is not allowed"),
        ("{% import 'x' as y %}", "'import' is not allowed"),
        ("{% from 'x' import y %}", "'import' is not allowed"),
        ("{% extends 'x' %}", "'extends' is not allowed"),
        ("{% macro m() %}{% endmacro %}", "'macro' is not allowed"),
        ("{{ cycler(1, 2) }}", "unknown name 'cycler'"),
        ("{{ joiner() }}", "unknown name 'joiner'"),
        ("{{ namespace() }}", "unknown name 'namespace'"),
        ("{{ lipsum() }}", "unknown name 'lipsum'"),
        ("{{ self }}", "unknown name 'self'"),
        ("{{ item }}", "'item' is only defined inside a step with 'for_each'"),
        ("{{ previous }}", "'previous' is only defined inside a step with 'repeat'"),
        ("{{ inptu.x }}", "did you mean 'input'?"),
        ("{{ input.x | }}", "template syntax error"),
        ("{% for x in input.xs %}", "template syntax error"),
    ],
)
def test_refused_when_compiled(source: str, message: str) -> None:
    with pytest.raises(TemplateCompileError) as info:
        Template(source, NAMES)
    assert message in info.value.message


def test_compile_error_carries_the_template_line() -> None:
    with pytest.raises(TemplateCompileError) as info:
        Template("line one\nline two\n{{ input.__class__ }}", NAMES)
    assert info.value.lineno == 3


def test_item_and_index_are_names_when_allowed() -> None:
    template = Template("{{ index }}: {{ item.text }}", NAMES | {"item", "index"})
    assert template.render({"item": {"text": "t"}, "index": 2}) == "2: t"


# -- references ---------------------------------------------------------------------------


def refs(source: str, names: frozenset[str] = NAMES) -> set[tuple[str, tuple[str | int, ...]]]:
    return {(r.root, r.path) for r in Template(source, names).references}


def test_reference_path_includes_constant_attributes_and_subscripts() -> None:
    assert refs("{{ steps.a.output[0].text }}") == {("steps", ("a", "output", 0, "text"))}
    assert refs("{{ steps['a']['output'] }}") == {("steps", ("a", "output"))}
    (ref,) = Template("{{ steps.a.output[0].text }}", NAMES).references
    assert ref == Reference("steps", ("a", "output", 0, "text"), 1)


def test_references_in_every_construct() -> None:
    source = (
        "{% if steps.a.ran %}{{ steps.b.output | join(config.sep) }}{% endif %}"
        "{{ models.gen ~ input.q }}{{ input.xs | map(attribute='t') | list }}"
    )
    assert refs(source) == {
        ("steps", ("a", "ran")),
        ("steps", ("b", "output")),
        ("config", ("sep",)),
        ("models", ("gen",)),
        ("input", ("q",)),
        ("input", ("xs",)),
    }


def test_reference_lines_are_template_lines() -> None:
    template = Template("a\n{{ steps.x.output }}\n{{ steps.y.output }}", NAMES)
    lines = {r.path[0]: r.lineno for r in template.references}
    assert lines == {"x": 2, "y": 3}


def test_locals_from_for_and_set_are_not_references() -> None:
    source = (
        "{% set total = input.n %}"
        "{% for doc in steps.a.output %}{{ loop.index }}{{ doc.text }}{{ total }}{% endfor %}"
        "{% set block %}{{ input.s }}{% endset %}{{ block }}"
    )
    assert refs(source) == {("input", ("n",)), ("steps", ("a", "output")), ("input", ("s",))}


def test_dynamic_subscripts_stop_the_constant_path() -> None:
    # steps[name] cannot say which step: the reference is to `steps` alone, and the
    # subscript's own names are references too.
    assert refs("{{ steps[input.which].output }}") == {("steps", ()), ("input", ("which",))}
    assert refs("{{ steps.a.output[input.i].text }}") == {
        ("steps", ("a", "output")),
        ("input", ("i",)),
    }


def test_unknown_names_include_those_in_subscripts() -> None:
    with pytest.raises(TemplateCompileError, match="unknown name 'name'"):
        Template("{{ steps[name] }}", NAMES)


def test_globals_need_no_declaration() -> None:
    template = Template("{{ range(3) | list + [dict(a=1)] }}", frozenset())
    assert template.render({}) == [0, 1, 2, {"a": 1}]
