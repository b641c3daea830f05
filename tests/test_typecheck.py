"""Compile-time types of template expressions (engine.dsl.typecheck): what each expression
is inferred to be, what is reported, what is never reported (no false positives), and that
what real runs output matches the types the step plugins declare."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2 import nodes
from jsonschema import Draft202012Validator

from engine.dsl.issues import WorkflowInvalid
from engine.dsl.schema import OUTPUT_KEYWORD, generate
from engine.dsl.templating import ENV, Template, TemplateCompileError
from engine.dsl.typecheck import Checker
from engine.dsl.types import (
    ANY,
    INTEGER,
    STRING,
    ArrayType,
    ObjectType,
    Type,
    from_schema,
    mismatches,
)
from engine.runtime.trace import COMPLETED
from engine.steps.model_call import OUTPUT_SCHEMAS
from engine.steps.registry import default_registry
from tests.engine_helpers import compile_yaml, run_yaml

CHAT = from_schema(OUTPUT_SCHEMAS["chat"])
NAMES: dict[str, Type] = {
    "answer": CHAT,
    "words": ArrayType(STRING),
    "n": INTEGER,
    "s": STRING,
    "free": ANY,
}


def infer(expression: str) -> tuple[Type, list[str]]:
    """The type of ``{{ expression }}`` with NAMES in scope, and what was reported."""
    reported: list[str] = []
    (output,) = ENV.parse(f"{{{{ {expression} }}}}").body
    assert isinstance(output, nodes.Output)
    return Checker(NAMES, reported.append).infer(output.nodes[0]), reported


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("answer.content", "string"),
        ("answer.usage.total_tokens", "integer"),
        ("words", "array<string>"),
        ("words[0]", "string"),
        ("words | length", "integer"),
        ("words | join(', ')", "string"),
        ("words | first", "string"),
        ("words | map('upper') | list", "array<string>"),
        ("[answer] | map(attribute='content') | list", "array<string>"),
        ("n * 2", "integer"),
        ("n / 2", "number"),
        ("s ~ n", "string"),
        ("n > 3", "boolean"),
        ("{'a': n, 'b': [s]}", "object{a: integer, b: array<string>}"),
        ("s if n else 'x'", "string"),
        ("s if n else n", "any"),
        ("free.anything[3].goes", "any"),
        ("s | default('x')", "string"),
        ("words[1:]", "array<string>"),
        ("dict(a=1)", "any"),
    ],
)
def test_inferred_types(expression: str, expected: str) -> None:
    found, reported = infer(expression)
    assert str(found) == expected
    assert reported == []


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("answer.contnet", "answer has no field 'contnet' (did you mean 'content'?)"),
        ("answer.usage.total", "answer.usage has no field 'total'; its type is object{"),
        ("words.content", "words is array<string>: it has no field 'content' (index an item"),
        ("n[0]", "n is integer: it cannot be indexed"),
        ("n.digits", "n is integer: it has no field 'digits'"),
        ("s.length", "s is string: it has no field 'length'"),
        ("s < n", "cannot compare s (string) with n (integer) using '<'"),
        ("answer >= 1", "cannot compare answer (object{"),
        ("'a' in n", "'in' needs a list, a string or an object, but n is integer"),
    ],
)
def test_reported_mistakes(expression: str, message: str) -> None:
    _, reported = infer(expression)
    assert len(reported) == 1, reported
    assert message in reported[0]


@pytest.mark.parametrize(
    "expression",
    [
        "answer.contnet | default('')",  # a probe: a missing field is expected
        "answer.contnet is defined",
        "answer.items()",  # dict, str and list methods are values to call
        "s.upper() ~ s.strip()",
        "words.index('a')",
        "n.real",
        "free.x < 3",  # any compares with anything
        "words < words",
        "n < 2.5 and true < n",  # booleans order with numbers in Python
        "s[0] ~ s[1:]",
        "answer[s]",  # a computed key: unknown
        "words[n]",
    ],
)
def test_never_reported(expression: str) -> None:
    assert infer(expression)[1] == []


def _messages(text: str) -> list[str]:
    with pytest.raises(WorkflowInvalid) as caught:
        compile_yaml(text)
    return [issue.message for issue in caught.value.issues]


def test_a_workflow_that_types_cleanly_compiles() -> None:
    """Typical reads of every kind of name: none is a false report."""
    compile_yaml(
        """
        id: clean
        models:
          gen: {type: lm}
          judge: {type: lm, optional: true}
        input_schema:
          type: object
          properties:
            query: {type: string}
            docs: {type: array, items: {type: object}}
          required: [query]
        config: {top_k: 3}
        steps:
          - step_id: hits
            type: vector_search
            collection: c
            query: "{{ input.query }}"
            top_k: "{{ config.top_k * 2 if models.judge else config.whatever }}"
          - step_id: ranked
            type: rerank
            when: "{{ models.judge }}"
            model_id: "{{ models.judge }}"
            query: "{{ input.query }}"
            documents: "{{ steps.hits.output }}"
          - step_id: best
            type: template
            value: "{{ (steps.ranked.output if steps.ranked.ran else steps.hits.output)[0].text }}"
          - step_id: per_doc
            type: template
            for_each: "{{ input.docs }}"
            value: "{{ item.title }} {{ index + 1 }} {{ input.tenant }}"
          - step_id: answer
            type: model_call
            model_id: "{{ models.gen }}"
            operation: chat
            input:
              prompt: "{% for h in steps.hits.output %}{{ h.text }} {{ h.metadata.p }}{% endfor %}"
          - step_id: tries
            type: template
            repeat: {max: 3, until: "{{ output | length > 2 or iteration >= 2 }}"}
            value: "{{ (previous or '') ~ 'x' }}"
          - step_id: meta
            type: template
            value: "{{ steps.answer.attempts > 1 and steps.tries.iterations < 3 }}"
        output:
          answer: "{{ steps.answer.output.content }}"
          tokens: "{{ steps.answer.output.usage.total_tokens }}"
          best: "{{ steps.best.output }}"
          ranked: "{{ steps.ranked.output[0].rerank_score if steps.ranked.ran else none }}"
        """
    )


def test_for_each_output_is_a_list_of_item_outputs() -> None:
    messages = _messages(
        """
        id: fe
        steps:
          - step_id: pairs
            type: template
            for_each: [1, 2]
            value: {name: "{{ item }}"}
          - step_id: use
            type: template
            value: "{{ steps.pairs.output[0].nmae }} {{ steps.pairs.output.name }}"
        """
    )
    assert messages == [
        "steps.pairs.output[0] has no field 'nmae' (did you mean 'name'?); its type is "
        "object{name: integer}",
        "steps.pairs.output is array<object{name: integer}>: it has no field 'name' (index an "
        "item first, e.g. [0], or iterate it)",
    ]


def test_an_inline_workflow_step_outputs_the_child_output_type() -> None:
    messages = _messages(
        """
        id: parent
        steps:
          - step_id: child
            type: workflow
            workflow:
              steps:
                - {step_id: s, type: template, value: "hi"}
              output: {summary: "{{ steps.s.output }}", pieces: 2}
          - step_id: use
            type: template
            value: "{{ steps.child.output.sumary }}"
        """
    )
    assert messages == [
        "steps.child.output has no field 'sumary' (did you mean 'summary'?); its type is "
        "object{summary: string, pieces: integer}"
    ]


def test_a_default_that_differs_in_type_makes_the_output_unknown() -> None:
    compile_yaml(
        """
        id: d
        steps:
          - step_id: a
            type: template
            on_error: continue
            default: "none"
            value: {x: 1}
          - step_id: b
            type: template
            value: "{{ steps.a.output.y }}"
        """
    )


def test_the_output_schema_types_a_workflow_and_is_checked() -> None:
    wf = compile_yaml(
        """
        id: typed
        steps:
          - {step_id: a, type: template, value: {x: 1}}
        output_schema:
          type: object
          properties: {x: {type: integer}}
          additionalProperties: false
        output: "{{ steps.a.output }}"
        """
    )
    assert wf.output_type == ObjectType({"x": INTEGER}, strict=True)
    messages = _messages(
        """
        id: typed
        steps:
          - {step_id: a, type: template, value: {x: "s", y: 2}}
        output_schema:
          type: object
          properties: {x: {type: integer}}
          additionalProperties: false
        output: "{{ steps.a.output }}"
        """
    )
    assert messages == [
        "output_schema is not met: x is string, where the schema wants integer",
        "output_schema is not met: the output has 'y', which the schema does not allow",
    ]


def test_mismatches_report_definite_conflicts_only() -> None:
    union = {"type": ["string", "integer"]}
    assert mismatches(STRING, union) == []
    assert mismatches(ANY, {"type": "integer"}) == []
    assert mismatches(INTEGER, {"type": "number"}) == []
    assert mismatches(from_schema({"type": "number"}), {"type": "integer"}) == []
    assert mismatches(ArrayType(STRING), {"type": "array", "items": {"type": "integer"}}) == [
        ((), "the value is string, where the schema wants integer")
    ]


def test_the_generated_schema_carries_each_step_types_output_schema() -> None:
    registry = default_registry()
    defs = generate(registry)["$defs"]
    for name in registry.names():
        plugin = registry.get(name)
        assert plugin is not None
        assert defs[f"step.{name}"][OUTPUT_KEYWORD] == plugin.output_schema
        Draft202012Validator.check_schema(plugin.output_schema)
    assert defs["step.chunk"][OUTPUT_KEYWORD] == {"type": "array", "items": {"type": "string"}}


def _assert_valid(schema: dict[str, Any], value: Any) -> None:
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(value)]
    assert errors == [], errors


async def test_real_outputs_match_the_declared_and_inferred_types() -> None:
    """template, chunk (counting words, no model) and workflow steps output what they are
    typed as: the run's output, every step's output, validates against the inferred type."""
    text = """
        id: real
        steps:
          - step_id: literal
            type: template
            value: {n: 1, words: [a, b], nested: {ok: true}}
          - step_id: pieces
            type: chunk
            text: "one two three. four five six. seven eight nine."
            chunk_size: 4
          - step_id: child
            type: workflow
            input: {text: "{{ steps.pieces.output | join(' ') }}"}
            workflow:
              input_schema:
                type: object
                properties: {text: {type: string}}
              steps:
                - step_id: upper
                  type: template
                  value: "{{ input.text | upper }}"
              output: {shout: "{{ steps.upper.output }}", size: "{{ input.text | length }}"}
          - step_id: each
            type: template
            for_each: "{{ steps.pieces.output }}"
            value: "{{ item | wordcount }}"
        output:
          literal: "{{ steps.literal.output }}"
          pieces: "{{ steps.pieces.output }}"
          child: "{{ steps.child.output }}"
          each: "{{ steps.each.output }}"
    """
    wf = compile_yaml(text)
    assert str(wf.output_type) == (
        "object{literal: object{n: integer, words: array<string>, nested: object{ok: boolean}}, "
        "pieces: array<string>, child: object{shout: string, size: integer}, "
        "each: array<integer>}"
    )
    result = await run_yaml(text)
    assert result.status == COMPLETED
    assert len(result.output["pieces"]) > 1
    _assert_valid(wf.output_type.to_schema(), result.output)
    # The chunk step's declared schema, not only the type read from it.
    _assert_valid(wf.steps["pieces"].plugin.output_schema, result.output["pieces"])


OUTPUT_CHECKED = """
    id: checked
    steps:
      - {step_id: echo, type: template, value: "{{ input.answer }}"}
    output_schema:
      type: object
      properties:
        answer: {type: integer, minimum: 0}
      required: [answer]
      %s
    output: {answer: "{{ steps.echo.output }}"}
"""


@pytest.mark.parametrize(
    "extra",
    # uniqueItems is outside the linear subset: that schema validates in the sandbox.
    ["", "uniqueItems: true"],
    ids=["in-process", "sandboxed"],
)
async def test_a_run_whose_output_breaks_output_schema_fails(extra: str) -> None:
    """What the checker cannot know (an input of any type) the run checks."""
    text = OUTPUT_CHECKED % extra
    ok = await run_yaml(text, {"answer": 3})
    assert ok.status == COMPLETED
    assert ok.output == {"answer": 3}
    bad = await run_yaml(text, {"answer": "three"})
    assert bad.status == "failed"
    assert bad.output is None
    assert bad.error == (
        "output: does not match output_schema at /answer: 'three' is not of type 'integer'"
    )
    assert {r.step_id: r.status for r in bad.trace} == {"echo": COMPLETED}


def test_a_template_nested_as_deep_as_jinja_allows_is_left_untyped() -> None:
    """The checker recurses per node: a chain Jinja still parses must not crash it."""
    longest = max(n for n in range(900, 1001, 10) if _parses("{{ x" + " | upper" * n + " }}"))
    compile_yaml(
        f"""
        id: deep
        steps:
          - step_id: a
            type: template
            value: "{{{{ input.x{" | upper" * longest} }}}}"
        """
    )


def _parses(source: str) -> bool:
    try:
        Template(source, frozenset({"x"}))
    except TemplateCompileError:
        return False
    return True


def _chain(steps: int, value: str, last: str) -> str:
    """A workflow whose step sN's params are ``value`` ({prev}: the step before it),
    then a step ``last`` reading the last of them ({prev} too)."""
    lines = ["id: chain", "steps:", "  - {step_id: s0, type: template, value: [1]}"]
    for i in range(1, steps):
        lines.append(f"  - {{step_id: s{i}, type: template, {value.format(prev=f's{i - 1}')}}}")
    tail = last.format(prev=f"s{steps - 1}")
    return "\n".join(lines) + f"\n  - {{step_id: last, type: template, {tail}}}\n"


def test_a_long_chain_of_steps_nesting_types_does_not_overflow_the_stack() -> None:
    """Each step's output holds the last one's: a type as deep as the workflow is long,
    displayed whole in the for_each message."""
    each = "for_each: [1], value: '{{{{ steps.{prev}.output }}}}'"
    with pytest.raises(WorkflowInvalid) as caught:
        compile_yaml(_chain(1500, each, "for_each: '{{{{ steps.{prev} }}}}', value: 1"))
    (issue,) = caught.value.issues
    assert issue.message.startswith("for_each must give a list, but {{ steps.s1499 }} is object")
    assert len(issue.message) < 2000


def test_steps_reading_the_last_step_twice_do_not_double_the_type_each_time() -> None:
    """Forty doublings would be a type of 2**40 nodes to display."""
    twice = "value: {{a: '{{{{ steps.{prev}.output }}}}', b: '{{{{ steps.{prev}.output }}}}'}}"
    with pytest.raises(WorkflowInvalid) as caught:
        compile_yaml(_chain(40, twice, "value: '{{{{ steps.{prev}.output.a.nope }}}}'"))
    (issue,) = caught.value.issues
    assert issue.message.startswith("steps.s39.output.a ")
    assert len(issue.message) < 20_000


def test_a_step_that_fails_to_compile_is_reported_when_a_later_step_reads_it() -> None:
    # The failed step stays in the graph for its edges but has no compiled form to type.
    text = """
    id: broken_reader
    steps:
      - step_id: first
        type: template
        nonsense: 1
      - step_id: second
        type: template
        template: "{{ steps.first.output }}"
    """
    with pytest.raises(WorkflowInvalid) as caught:
        compile_yaml(text)
    assert any("nonsense" in issue.message for issue in caught.value.issues)
