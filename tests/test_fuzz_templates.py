"""Property-based fuzzing of the template compiler and renderer (issue #8).

Templates are generated from a grammar of Jinja expressions, filters and statements over
the names a workflow reads, plus raw text. Whatever the template:
- compiling raises nothing but TemplateCompileError;
- rendering through the engine (in-process for the linear subset, in the sandbox for the
  rest) raises nothing but TemplateRenderError and returns plain data; a sandboxed render
  leaves the event loop free (a ticker turns before it ends), a bomb is ended by the budget;
- a template the compiler calls linear renders the same in-process and in the sandbox.

Deterministic (derandomized, no example database) and bounded, so it runs in `make test`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine.dsl.rendering import render
from engine.dsl.templating import Template, TemplateCompileError, TemplateRenderError
from engine.dsl.values import TemplateValue
from engine.sandbox import Budget, SandboxError, shared_sandbox

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow],
)
BUDGET = Budget(timeout_s=1.0, memory_mb=64)
WAIT_S = 60.0  # a hang guard only: far past the budget and a worker's restart after a kill
NAMES = frozenset({"input", "config", "steps", "models"})
CONTEXT: dict[str, Any] = {
    "input": {"a": "hello world", "n": 7, "xs": [3, 1, 2], "d": {"k": "v"}, "f": 2.5},
    "config": {"top_k": 5, "flag": True},
    "models": {"generation": "demo-chat", "rerank": None},
    "steps": {"s": {"output": {"content": "text", "items": ["a", "b"]}, "ran": True}},
}

ATOMS = st.sampled_from(
    [
        "input.a",
        "input.n",
        "input.xs",
        "input.d",
        "input.f",
        "input.missing",
        "config.top_k",
        "config.flag",
        "models.rerank",
        "steps.s.output.content",
        "steps.s.output.items",
        "steps.s.ran",
        "'x'",
        "''",
        "0",
        "1",
        "-3",
        "2.5",
        "999999",
        "256",
        "none",
        "true",
        "[1, 2]",
        "{'k': 1}",
        "range(5)",
        "dict(a=1)",
    ]
)
BINARY = st.sampled_from(
    ["+", "-", "*", "/", "//", "%", "**", "~", "and", "or", "==", "<", "in", "not in"]
)
FILTERS = st.sampled_from(
    [
        "length",
        "upper",
        "default('d')",
        "join(',')",
        "join",
        "list",
        "string",
        "int",
        "first",
        "last",
        "tojson",
        "sum",
        "sort",
        "unique",
        "reverse",
        "center(40)",
        "center(999999)",
        "indent(4)",
        "batch(2)",
        "slice(2)",
        "map('string')",
        "select",
        "replace('l', 'LL')",
        "format(1)",
        "wordcount",
        "trim",
        "round",
        "abs",
        "attr('__class__')",
        "dictsort",
        "items",
    ]
)


def expressions() -> st.SearchStrategy[str]:
    return st.recursive(
        ATOMS,
        lambda inner: st.one_of(
            st.tuples(inner, BINARY, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(inner, FILTERS).map(lambda t: f"({t[0]} | {t[1]})"),
            st.tuples(inner, inner, inner).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
            inner.map(lambda e: f"(not {e})"),
            st.tuples(inner, ATOMS).map(lambda t: f"{t[0]}[{t[1]}]"),
            st.tuples(inner, st.sampled_from(["upper()", "split()", "items()", "keys()"])).map(
                lambda t: f"{t[0]}.{t[1]}"
            ),
        ),
        max_leaves=8,
    )


def templates() -> st.SearchStrategy[str]:
    expr = expressions()
    native = expr.map(lambda e: f"{{{{ {e} }}}}")
    mixed = st.tuples(st.text(max_size=10), expr, st.text(max_size=10)).map(
        lambda t: f"{t[0]}{{{{ {t[1]} }}}}{t[2]}"
    )
    loop = st.tuples(expr, expr).map(
        lambda t: f"{{% for v in {t[0]} %}}{{{{ {t[1]} }}}}{{% endfor %}}"
    )
    branch = st.tuples(expr, expr).map(lambda t: f"{{% if {t[0]} %}}{{{{ {t[1]} }}}}{{% endif %}}")
    assign = st.tuples(expr, expr).map(lambda t: f"{{% set v = {t[0]} %}}{{{{ {t[1]} }}}}")
    raw = st.text(
        alphabet=st.sampled_from(list("{}%#-+ ()[]'\".|~*_abcxyz0123456789")), max_size=40
    )
    return st.one_of(native, mixed, loop, branch, assign, raw.map(lambda r: "{{" + r))


def is_plain(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and is_plain(v) for k, v in value.items())
    return False


async def render_bounded(template: Template) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    refusal = None
    try:
        result = await asyncio.wait_for(render(TemplateValue(template), CONTEXT, BUDGET), WAIT_S)
    except TemplateRenderError as exc:
        refusal = str(exc)
    finally:
        tick_task.cancel()
    if refusal is None:
        assert is_plain(result), repr(result)[:200]
    else:
        assert refusal
    # Ordering, not speed: a template outside the linear subset renders in the sandbox, so
    # the ticker turns before its render ends; rendered on the loop, it could not. A linear
    # one renders in-process without yielding (cheap by construction).
    assert template.linear or ticks >= 1


@FUZZ
@example(source="{{ (not (input.a if 'x'['x'] else input.a)) }}")  # folded at code generation
@given(source=templates())
def test_any_template_compiles_or_is_refused_and_renders_within_budget(source: str) -> None:
    try:
        template = Template(source, NAMES)
    except TemplateCompileError:
        event("refused at compile time")
        return
    event("linear" if template.linear else "sandboxed")
    asyncio.run(render_bounded(template))


TARGET = "engine.dsl.rendering:render_batch"


@FUZZ
@example(source="{{ (input.a | tojson) }}")  # Markup, a str subclass msgpack refused
@given(source=templates())
def test_linear_templates_render_alike_in_process_and_in_the_sandbox(source: str) -> None:
    try:
        template = Template(source, NAMES)
    except TemplateCompileError:
        return
    if not template.linear:
        return
    sandbox = shared_sandbox()

    def outcome(action: Any) -> tuple[str, Any]:
        try:
            return "ok", action()
        except (TemplateRenderError, SandboxError) as exc:
            return "error", str(exc)

    local = outcome(lambda: template.render(CONTEXT))
    remote = outcome(
        lambda: sandbox.call_sync(
            TARGET, {"templates": [source], "context": CONTEXT}, timeout_s=5.0, memory_mb=512
        )[0]
    )
    if remote[0] == "error" and local[0] == "error":
        return  # both refused; the worker words it as a SandboxError
    assert local == remote
