"""Each lint rule (engine/dsl/lint/) on real workflows compiled by the real compiler: a
document that triggers it, with the finding's position, and near misses that do not."""

from __future__ import annotations

import sys
import textwrap

import pytest

from engine.dsl.compiler import compile_document
from engine.dsl.lint import RULES, Finding, Severity, lint
from engine.dsl.source import load_text
from engine.steps.registry import default_registry

HEAD = """\
id: wf
input_schema:
  type: object
  properties:
    text: {type: string}
    mode: {type: string}
    enabled: {type: boolean}
"""


def check(rule_id: str, body: str) -> list[Finding]:
    text = HEAD + textwrap.dedent(body)
    doc = load_text(text, "wf.yaml")
    workflow = compile_document(doc, default_registry())
    (rule,) = [r for r in RULES if r.id == rule_id]
    return rule.check(workflow, doc)


def where(found: list[Finding]) -> list[tuple[int | None, int | None, str]]:
    return [(f.issue.line, f.issue.col, f.issue.pointer) for f in found]


def test_every_rule_has_an_id_severity_and_docstring() -> None:
    ids = [rule.id for rule in RULES]
    assert len(set(ids)) == len(ids) == 7
    for rule in RULES:
        assert rule.__doc__, rule.id
        assert len(rule.__doc__.split()) > 10, rule.id
        assert isinstance(rule.severity, Severity)
        module = sys.modules[type(rule).__module__]
        assert (module.__doc__ or "").startswith(f"{rule.id}: "), rule.id  # SARIF's summary


# -- when-constant ------------------------------------------------------------------------------
def test_when_with_text_around_the_template_is_always_true() -> None:
    found = check(
        "when-constant",
        """\
        steps:
          - step_id: slow
            type: template
            when: "{{ input.mode }} == 'slow'"
            value: x
        """,
    )
    assert where(found) == [(11, 11, "/steps/0/when")]
    assert found[0].severity is Severity.WARNING
    assert "always true" in found[0].issue.message
    assert "{{ input.mode == 'slow' }}" in found[0].issue.message


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ('"{{ 1 == 1 }}"', "always runs"),
        ('"{{ 2 < 1 }}"', "never runs"),
        ('"{{ range(3) | length > 5 }}"', "same value on every run"),  # not evaluated here
    ],
)
def test_constant_when(when: str, says: str) -> None:
    found = check(
        "when-constant",
        f"""\
        steps:
          - step_id: a
            type: template
            when: {when}
            value: x
        """,
    )
    assert len(found) == 1
    assert says in found[0].issue.message


@pytest.mark.parametrize(
    "when",
    [
        "\"{{ input.mode == 'slow' }}\"",
        "true",  # a literal boolean is meant: a step switched on or off by hand
        "false",
        '"{% if input.enabled %}yes{% endif %}"',  # empty when false: not constant
        '"\\n{{ input.enabled }}\\n"',  # whitespace around one expression: native
    ],
)
def test_when_that_depends_on_the_run(when: str) -> None:
    body = f"""\
        steps:
          - step_id: a
            type: template
            when: {when}
            value: x
        """
    assert check("when-constant", body) == []


# -- skipped-read -------------------------------------------------------------------------------
SKIPPABLE = """\
steps:
  - step_id: details
    type: template
    when: "{{ input.enabled }}"
    value: long
  - step_id: after
    type: template
    value: "{{ steps.details.output | upper }}"
"""


def test_output_reading_a_skippable_step_unguarded() -> None:
    found = check("skipped-read", SKIPPABLE + 'output:\n  text: "{{ steps.details.output }}"\n')
    assert where(found) == [(17, 9, "/output/text")]
    assert "'details' is skipped (it has 'when')" in found[0].issue.message


def test_output_reading_a_step_a_skip_propagates_to() -> None:
    found = check("skipped-read", SKIPPABLE + 'output: "{{ steps.after.output }}"\n')
    assert len(found) == 1
    assert "a step it reads may be skipped" in found[0].issue.message


def test_step_that_guards_elsewhere_but_reads_output_bare() -> None:
    found = check(
        "skipped-read",
        SKIPPABLE
        + """\
  - step_id: report
    type: template
    value:
      state: "{{ steps.details.status }}"
      text: "{{ steps.details.output | upper }}"
output: "{{ steps.report.output }}"
""",
    )
    assert where(found) == [(20, 13, "/steps/2/value/text")]


@pytest.mark.parametrize(
    "read",
    [
        "steps.details.output if steps.details.ran else 'none'",
        "steps.details.output | default('none', true)",
        "steps.details.output | d('none', boolean=true)",
        "steps.details.output if steps.details.output is not none else 'none'",
        "steps.details.output or 'none'",
        "steps.details.status",
    ],
)
def test_guarded_reads_are_fine(read: str) -> None:
    assert check("skipped-read", SKIPPABLE + f'output: "{{{{ {read} }}}}"\n') == []


@pytest.mark.parametrize(
    "read",
    [
        "steps.details.output if steps.details.output is defined else 'none'",
        "steps.details.output | default('none')",  # replaces undefined only, not null
    ],
)
def test_reads_that_look_guarded_but_keep_the_null(read: str) -> None:
    assert len(check("skipped-read", SKIPPABLE + f'output: "{{{{ {read} }}}}"\n')) == 1


def test_a_skippable_step_with_a_default_is_fine() -> None:
    body = SKIPPABLE.replace("    value: long\n", "    value: long\n    default: short\n")
    assert check("skipped-read", body + 'output: "{{ steps.details.output }}"\n') == []


def test_propagated_skip_inside_steps_is_fine() -> None:
    """`after` reads details unguarded and is skipped with it: the documented propagation."""
    assert check("skipped-read", SKIPPABLE) == []


# -- undeclared-input ---------------------------------------------------------------------------
def test_input_field_the_schema_does_not_declare() -> None:
    found = check(
        "undeclared-input",
        """\
        steps:
          - step_id: a
            type: template
            value: "{{ input.body }} {{ input.text }}"
        """,
    )
    assert where(found) == [(11, 12, "/steps/0/value")]
    assert found[0].severity is Severity.ERROR
    assert "does not declare input field 'body'" in found[0].issue.message
    assert "declared: text, mode, enabled" in found[0].issue.message


def test_input_read_in_when_and_output_are_checked_too() -> None:
    found = check(
        "undeclared-input",
        """\
        steps:
          - step_id: a
            type: template
            when: "{{ input.flag }}"
            value: x
        output: "{{ input.qqq }}"
        """,
    )
    assert [f.issue.pointer for f in found] == ["/steps/0/when", "/output"]


@pytest.mark.parametrize(
    "schema",
    [
        "input_schema: {type: object, additionalProperties: true}",
        "input_schema: {type: object}",
    ],
)
def test_schema_that_takes_other_fields(schema: str) -> None:
    text = textwrap.dedent(
        f"""\
        id: wf
        {schema}
        steps:
          - step_id: a
            type: template
            value: "{{{{ input.anything }}}}"
        """
    )
    doc = load_text(text, "wf.yaml")
    assert lint(compile_document(doc, default_registry()), doc) == []


# -- unused-config ------------------------------------------------------------------------------
def test_config_key_nothing_reads() -> None:
    found = check(
        "unused-config",
        """\
        config:
          used: 1
          unused: 2
        steps:
          - step_id: a
            type: template
            value: "{{ config.used }}"
        """,
    )
    assert where(found) == [(10, 3, "/config/unused")]
    assert found[0].severity is Severity.INFO


def test_config_read_whole_may_read_any_key() -> None:
    body = """\
        config:
          a: 1
          b: 2
        steps:
          - step_id: a
            type: template
            value: "{{ config | tojson }}"
        """
    assert check("unused-config", body) == []


# -- repeat-without-until -----------------------------------------------------------------------
def test_repeat_without_until() -> None:
    found = check(
        "repeat-without-until",
        """\
        steps:
          - step_id: loop
            type: template
            repeat: {max: 3}
            value: "{{ iteration }}"
        """,
    )
    assert where(found) == [(11, 5, "/steps/0/repeat")]
    assert "always runs max (3) passes" in found[0].issue.message


def test_repeat_with_constant_until() -> None:
    found = check(
        "repeat-without-until",
        """\
        steps:
          - step_id: loop
            type: template
            repeat: {max: 3, until: true}
            value: x
        """,
    )
    assert "always runs one pass" in found[0].issue.message


def test_repeat_with_until() -> None:
    body = """\
        steps:
          - step_id: loop
            type: template
            repeat: {max: 3, until: "{{ output > 1 }}"}
            value: "{{ iteration }}"
        """
    assert check("repeat-without-until", body) == []


# -- unused-step --------------------------------------------------------------------------------
def test_step_nothing_reads() -> None:
    found = check(
        "unused-step",
        """\
        steps:
          - step_id: used
            type: template
            value: a
          - step_id: forgotten
            type: template
            value: b
          - step_id: waited_for
            type: template
            value: c
          - step_id: last
            type: template
            depends_on: [waited_for]
            value: d
        output: "{{ steps.used.output }}{{ steps.last.output }}"
        """,
    )
    assert where(found) == [(12, 14, "/steps/1/step_id")]
    assert "'forgotten' is not used" in found[0].issue.message


def test_without_output_every_sink_is_the_result() -> None:
    body = """\
        steps:
          - step_id: a
            type: template
            value: a
          - step_id: b
            type: template
            value: b
        """
    assert check("unused-step", body) == []


# -- for-each-not-list --------------------------------------------------------------------------
def test_for_each_over_a_config_scalar() -> None:
    found = check(
        "for-each-not-list",
        """\
        config:
          top_k: 5
        steps:
          - step_id: each
            type: template
            for_each: "{{ config.top_k }}"
            value: "{{ item }}"
        """,
    )
    assert where(found) == [(13, 15, "/steps/0/for_each")]
    assert "config.top_k, whose value in 'config' is a number (5), not a list" in (
        found[0].issue.message
    )


def test_for_each_over_an_untyped_input_with_a_mapping_default() -> None:
    text = textwrap.dedent(
        """\
        id: wf
        input_schema:
          type: object
          properties:
            items: {default: {a: 1}}
        steps:
          - step_id: each
            type: template
            for_each: "{{ input['items'] }}"
            value: "{{ item }}"
        """
    )
    doc = load_text(text, "wf.yaml")
    found = lint(compile_document(doc, default_registry()), doc)
    assert [f.rule for f in found] == ["for-each-not-list"]
    assert "is a mapping" in found[0].issue.message


@pytest.mark.parametrize(
    "each", ['"{{ config.names }}"', '"{{ config.names | reverse }}"', "[1, 2]"]
)
def test_for_each_over_lists(each: str) -> None:
    body = f"""\
        config:
          names: [a, b]
        steps:
          - step_id: each
            type: template
            for_each: {each}
            value: "{{{{ item }}}}"
        """
    assert check("for-each-not-list", body) == []


# -- silencing ----------------------------------------------------------------------------------
SILENCED = """\
id: wf
config:
  kept: 1  # lint: ignore[unused-config]
  # lint: ignore[unused-config, unused-step]
  also_kept: 2
  other_rule: 3  # lint: ignore[unused-step]
  everything: 4  # lint: ignore
  reported: 5
steps:
  - step_id: a
    type: template
    value: x
"""


def test_ignore_comments_silence_the_rules_they_name() -> None:
    doc = load_text(SILENCED, "wf.yaml")
    found = lint(compile_document(doc, default_registry()), doc, SILENCED)
    assert [f.issue.pointer for f in found] == ["/config/other_rule", "/config/reported"]
    assert len(lint(compile_document(doc, default_registry()), doc)) == 5  # no text: all
