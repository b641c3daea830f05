"""A step's `default` as a template: rendered when it is used (a skip, or a failure with
on_error: continue) against the run's scope at that moment; its step references are
dependencies that never propagate a skip; checked at compile time like any value."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from engine_helpers import WAIT_S, Lab, compile_yaml, make_runner, run_yaml, statuses, trace

from engine.dsl.issues import WorkflowInvalid
from engine.runtime.trace import COMPLETED, FAILED, PARTIAL

# -- what a default reads -----------------------------------------------------------------


async def test_a_failing_steps_default_reads_input_config_models_and_a_dependency() -> None:
    result = await run_yaml(
        """
        id: tolerant
        models:
          generation: {type: lm, optional: true}
        config: {suffix: "!"}
        steps:
          - step_id: first
            type: record
            value: [a, b]
          - step_id: broken
            type: boom
            on_error: continue
            default:
              joined: "{{ steps.first.output | join('+') ~ config.suffix }}"
              asked: "{{ input.q }}"
              model: "{{ models.generation }}"
              literal: 3
        output: "{{ steps.broken.output }}"
        """,
        {"q": "why"},
    )
    assert result.status == PARTIAL
    assert result.output == {"joined": "a+b!", "asked": "why", "model": None, "literal": 3}
    assert trace(result)["broken"].error == "RuntimeError: boom"


async def test_a_skipped_steps_default_is_rendered_when_it_is_skipped() -> None:
    result = await run_yaml(
        """
        id: skipping
        steps:
          - step_id: off
            type: record
            when: "{{ input.on }}"
            value: ran
            default: "skipped for {{ input.who }}"
          - step_id: reader
            type: record
            value: "{{ steps.off.output }}"
            default: "{{ steps.off.output | upper }}"
        """,
        {"on": False, "who": "ann"},
    )
    assert result.status == COMPLETED
    assert statuses(result) == {"off": "skipped", "reader": "skipped"}
    # `reader` was skipped because `off` was: its default read off's default.
    assert result.output == {"reader": "SKIPPED FOR ANN"}


async def test_a_default_that_needs_the_sandbox_renders_there() -> None:
    # A loop is not provably linear: it renders in the sandbox, under the run's budgets.
    result = await run_yaml(
        """
        id: sandboxed
        steps:
          - step_id: broken
            type: boom
            on_error: continue
            default: "{% for i in range(input.n) %}{{ i }}{% endfor %}"
        output: "{{ steps.broken.output }}"
        """,
        {"n": 4},
    )
    assert result.status == PARTIAL
    assert result.output == "0123"


# -- dependencies ---------------------------------------------------------------------------


def test_steps_read_by_a_default_are_dependencies() -> None:
    wf = compile_yaml(
        """
        steps:
          - {step_id: source, type: record, value: 1}
          - {step_id: reads, type: record, value: 2, default: "{{ steps.source.output }}"}
          - {step_id: other, type: record, value: "{{ steps.source.output }}", default: 0}
        """
    )
    assert wf.steps["reads"].deps == {"source"}
    assert wf.graph.has_edge("source", "reads")
    # read only by the default: a skip of `source` does not skip `reads`
    assert wf.steps["reads"].guarded == {"source"}
    assert wf.steps["other"].guarded == frozenset()


async def test_a_default_waits_for_the_step_it_reads() -> None:
    lab = Lab()
    wf = compile_yaml(
        """
        id: ordered
        steps:
          - step_id: late
            type: gate
            value: from late
          - step_id: off
            type: record
            when: false
            default: "{{ steps.late.output }}"
        output: "{{ steps.off.output }}"
        """
    )
    run = asyncio.create_task(make_runner(lab).run(wf, {}))
    await lab.wait("started:late")
    assert lab.log == [("start", "late")]  # `off` has not been decided yet
    lab.set("release:late")
    result = await asyncio.wait_for(run, WAIT_S)
    assert result.output == "from late"
    assert statuses(result) == {"late": COMPLETED, "off": "skipped"}


async def test_a_skip_read_only_by_a_default_does_not_propagate() -> None:
    result = await run_yaml(
        """
        id: guarded
        steps:
          - step_id: source
            type: record
            when: false
            value: real
          - step_id: runs
            type: record
            value: ran anyway
            on_error: continue
            default: "{{ steps.source.output }}"
          - step_id: reader
            type: record
            value: "{{ steps.source.output }}"
            default: "{{ 'fallback' if not steps.source.ran else steps.source.output }}"
        output:
          runs: "{{ steps.runs.output }}"
          reader: "{{ steps.reader.output }}"
        """
    )
    assert statuses(result) == {"source": "skipped", "runs": COMPLETED, "reader": "skipped"}
    assert result.output == {"runs": "ran anyway", "reader": "fallback"}


# -- a default that cannot be rendered ---------------------------------------------------------


async def test_a_skipped_step_whose_default_fails_fails_the_run() -> None:
    result = await run_yaml(
        """
        id: bad_default
        steps:
          - step_id: off
            type: record
            when: false
            default: "{{ input.missing }}"
          - step_id: after
            type: record
            value: "{{ steps.off.output }}"
        """
    )
    assert result.status == FAILED
    assert statuses(result) == {"off": FAILED, "after": "cancelled"}
    assert result.error == f"step 'off' failed: {trace(result)['off'].error}"
    assert trace(result)["off"].error.startswith("default: ")
    assert "missing" in trace(result)["off"].error


async def test_a_propagated_skip_whose_default_fails_with_on_error_continue() -> None:
    events: list[dict[str, Any]] = []
    result = await run_yaml(
        """
        id: bad_default
        steps:
          - {step_id: off, type: record, when: false}
          - step_id: reader
            type: record
            value: "{{ steps.off.output }}"
            on_error: continue
            default: "{{ 1 // input.zero }}"
          - step_id: inspects
            type: record
            value: ["{{ steps.reader.status }}", "{{ steps.reader.ran }}"]
        """,
        {"zero": 0},
        on_event=events.append,
    )
    assert result.status == PARTIAL
    assert statuses(result) == {"off": "skipped", "reader": FAILED, "inspects": COMPLETED}
    assert result.output == {"inspects": ["failed", False]}
    finished = [e for e in events if e["event"] == "step_finished" and e["step_id"] == "reader"]
    assert [e["status"] for e in finished] == [FAILED]
    assert "ZeroDivisionError" in finished[0]["error"]


async def test_a_failing_step_whose_default_fails_reports_both_errors() -> None:
    result = await run_yaml(
        """
        id: both
        steps:
          - step_id: broken
            type: boom
            message: down
            on_error: continue
            default: "{{ input.missing }}"
        """
    )
    assert result.status == PARTIAL
    error = trace(result)["broken"].error
    assert error.startswith("RuntimeError: down; default: ")
    assert result.output == {"broken": None}


# -- compile time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("default", "message"),
    [
        ("'{{ steps.nope.output }}'", "reference to unknown step 'nope'"),
        ("'{{ steps.source.outptu }}'", "has no attribute 'outptu' (did you mean 'output'?)"),
        ("'{{ models.gen }}'", "undeclared model role 'gen'"),
        ("'{{ item }}'", "'item' is only defined"),  # a default is the step's, not an item's
        ("'{{ steps.me.output }}'", "cannot read its own result"),
        ("{a: ['{{ input.x ) }}']}", "unexpected ')'"),
    ],
)
def test_a_defaults_templates_are_checked_at_compile_time(default: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        compile_yaml(
            f"""
            steps:
              - {{step_id: source, type: record, value: 1}}
              - step_id: me
                type: record
                for_each: [1, 2]
                value: "{{{{ item }}}}"
                default: {default}
            """
        )
    [issue] = info.value.issues
    assert issue.path[:3] == ("steps", 1, "default")
    assert message in issue.message
