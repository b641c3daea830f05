"""Control keys at run time: `when` and skip propagation, `for_each`, `repeat`/`until`."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import WAIT_S, Lab, compile_yaml, make_runner, run_yaml, statuses, trace

from engine.dsl.issues import WorkflowInvalid
from engine.runtime.trace import COMPLETED, FAILED

# -- when / skip ------------------------------------------------------------------------

SKIP_WORKFLOW = """
id: skipping
input_schema:
  type: object
  properties: {flag: {type: boolean}}
steps:
  - step_id: maybe
    type: record
    when: "{{ input.flag }}"
    value: ran
    default: fallback
  - step_id: reads_output
    type: record
    value: "{{ steps.maybe.output }}"
    default: reads_output_default
  - step_id: reads_reader
    type: record
    value: "{{ steps.reads_output.output }}"
  - step_id: after_by_depends_on
    type: record
    depends_on: [maybe]
    value: 1
  - step_id: reads_ran
    type: record
    value: "{{ steps.maybe.ran }}"
  - step_id: reads_status
    type: record
    value: "{{ steps.maybe.status }}"
  - step_id: chooses
    type: record
    value: "{{ steps.maybe.output if steps.maybe.ran else 'chose fallback' }}"
output:
  maybe: "{{ steps.maybe.output }}"
  maybe_ran: "{{ steps.maybe.ran }}"
  reads_output: "{{ steps.reads_output.output }}"
  reads_ran: "{{ steps.reads_ran.output }}"
  reads_status: "{{ steps.reads_status.output }}"
  chooses: "{{ steps.chooses.output }}"
"""


async def test_when_false_skips_the_step_and_its_output_is_the_default() -> None:
    lab = Lab()
    result = await run_yaml(SKIP_WORKFLOW, {"flag": False}, lab=lab)
    assert result.status == COMPLETED  # a skip is not a failure
    assert "maybe" not in lab.order("start")  # the plugin never ran
    assert trace(result)["maybe"].status == "skipped"
    assert trace(result)["maybe"].attempts == 0
    assert result.output["maybe"] == "fallback"
    assert result.output["maybe_ran"] is False


async def test_a_skip_propagates_to_readers_of_the_output_but_not_to_guarded_readers() -> None:
    lab = Lab()
    result = await run_yaml(SKIP_WORKFLOW, {"flag": False}, lab=lab)
    assert statuses(result) == {
        "maybe": "skipped",
        "reads_output": "skipped",
        "reads_reader": "skipped",  # transitively
        "after_by_depends_on": "skipped",
        "reads_ran": COMPLETED,
        "reads_status": COMPLETED,
        "chooses": COMPLETED,
    }
    assert set(lab.order("start")) == {"reads_ran", "reads_status", "chooses"}
    assert result.output["reads_output"] == "reads_output_default"
    assert result.output["reads_ran"] is False
    assert result.output["reads_status"] == "skipped"
    assert result.output["chooses"] == "chose fallback"


async def test_when_true_runs_the_step_and_everything_after_it() -> None:
    result = await run_yaml(SKIP_WORKFLOW, {"flag": True})
    assert set(statuses(result).values()) == {COMPLETED}
    assert result.output == {
        "maybe": "ran",
        "maybe_ran": True,
        "reads_output": "ran",
        "reads_ran": True,
        "reads_status": COMPLETED,
        "chooses": "ran",
    }


async def test_when_accepts_a_literal_and_a_truthiness_test() -> None:
    result = await run_yaml(
        """
        id: literal_when
        steps:
          - {step_id: never, type: template, when: false, value: 1}
          - {step_id: empty, type: template, when: "{{ [] }}", value: 2}
          - {step_id: always, type: template, when: true, value: 3}
        """
    )
    assert statuses(result) == {"never": "skipped", "empty": "skipped", "always": COMPLETED}
    assert result.output == {"never": None, "empty": None, "always": 3}


async def test_a_when_that_fails_to_render_fails_the_step() -> None:
    result = await run_yaml(
        """
        id: bad_when
        steps:
          - {step_id: a, type: template, when: "{{ input.missing.deeper }}", value: 1}
        """
    )
    assert result.status == FAILED
    record = trace(result)["a"]
    assert record.status == FAILED
    assert record.error is not None
    assert record.error.startswith("when:")


# -- for_each ---------------------------------------------------------------------------


async def test_for_each_keeps_item_order_when_items_finish_out_of_order() -> None:
    wf = compile_yaml(
        """
        id: mapping
        steps:
          - step_id: each
            type: gate
            for_each: [a, b, c]
            concurrency: 3
            name: "{{ item }}"
            value: "{{ item | upper }}"
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    for name in "abc":
        await lab.wait(f"started:{name}")
    for name in "cba":  # finish in reverse
        lab.set(f"release:{name}")
        await lab.wait(f"finished:{name}")
    result = await asyncio.wait_for(task, WAIT_S)
    assert lab.order("end") == ["c", "b", "a"]
    assert result.output == {"each": ["A", "B", "C"]}
    assert trace(result)["each"].items == 3


async def test_for_each_runs_at_most_concurrency_items_at_once() -> None:
    wf = compile_yaml(
        """
        id: throttled
        steps:
          - step_id: each
            type: gate
            for_each: "{{ range(5) | list }}"
            concurrency: 2
            name: "i{{ index }}"
            value: "{{ item * 10 }}"
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    await lab.wait("started:i0")
    await lab.wait("started:i1")
    assert not lab.is_set("started:i2")
    assert lab.in_flight == 2
    lab.set("release:i1")
    await lab.wait("started:i2")
    assert lab.in_flight == 2
    assert not lab.is_set("started:i3")
    lab.set("release:i0")
    await lab.wait("started:i3")
    lab.set("release:all")
    result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == COMPLETED
    assert lab.max_in_flight == 2
    assert result.output == {"each": [0, 10, 20, 30, 40]}


async def test_for_each_has_item_and_index_in_scope_and_outputs_a_list() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: scope
        steps:
          - step_id: each
            type: template
            for_each: "{{ input.things }}"
            value: {i: "{{ index }}", name: "{{ item.name }}", label: "{{ index }}:{{ item.name }}"}
          - step_id: later
            type: record
            value: "{{ steps.each.output }}"
        output:
          count: "{{ steps.each.output | length }}"
          each: "{{ steps.each.output }}"
        """,
        {"things": [{"name": "x"}, {"name": "y"}]},
        lab=lab,
    )
    assert result.status == COMPLETED
    expected = [{"i": 0, "name": "x", "label": "0:x"}, {"i": 1, "name": "y", "label": "1:y"}]
    assert result.output == {"count": 2, "each": expected}
    assert lab.seen_params == [{"value": expected}]  # a later step receives the list itself


async def test_for_each_over_an_empty_list_outputs_an_empty_list() -> None:
    result = await run_yaml(
        """
        id: empty
        steps:
          - {step_id: each, type: template, for_each: "{{ input.xs }}", value: "{{ item }}"}
        """,
        {"xs": []},
    )
    assert result.status == COMPLETED
    assert result.output == {"each": []}


@pytest.mark.parametrize(("value", "kind"), [("abc", "str"), ({"a": 1}, "dict"), (3, "int")])
async def test_for_each_over_a_non_list_at_run_time_fails_the_step_clearly(
    value: object, kind: str
) -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: not_a_list
        steps:
          - {step_id: each, type: record, for_each: "{{ input.xs }}", value: "{{ item }}"}
        """,
        {"xs": value},
        lab=lab,
    )
    assert result.status == FAILED
    record = trace(result)["each"]
    assert record.status == FAILED
    assert record.error is not None
    assert "for_each" in record.error
    assert kind in record.error
    assert "list" in record.error
    assert lab.log == []  # no item ran


async def test_a_failing_item_fails_the_for_each_step_with_the_items_error() -> None:
    result = await run_yaml(
        """
        id: item_fails
        steps:
          - step_id: each
            type: flaky
            for_each: [1, 2, 3]
            key: shared
            failures: 1
        """
    )
    assert result.status == FAILED
    record = trace(result)["each"]
    assert record.status == FAILED
    assert record.error == "RuntimeError: flaky failure 1"
    assert result.error is not None
    assert "flaky failure 1" in result.error


async def test_a_failing_item_with_on_error_continue_gives_the_default() -> None:
    result = await run_yaml(
        """
        id: item_fails_continue
        steps:
          - step_id: each
            type: boom
            for_each: [1, 2]
            message: "item {{ item }} broke"
            on_error: continue
            default: []
          - step_id: after
            type: template
            value: "{{ steps.each.status }}: {{ steps.each.output | length }}"
        """
    )
    assert result.status == "partial"
    assert statuses(result) == {"each": FAILED, "after": COMPLETED}
    assert trace(result)["each"].error in (
        "RuntimeError: item 1 broke",
        "RuntimeError: item 2 broke",
    )
    assert result.output == {"after": "failed: 0"}


async def test_for_each_items_are_retried_individually() -> None:
    result = await run_yaml(
        """
        id: item_retry
        steps:
          - step_id: each
            type: flaky
            for_each: [a, b]
            concurrency: 1
            key: "{{ item }}"
            failures: 1
            retry: {attempts: 2, backoff_s: 0}
        """
    )
    assert result.status == COMPLETED
    assert result.output == {"each": [2, 2]}
    assert trace(result)["each"].attempts == 4


# -- repeat / until -----------------------------------------------------------------------


async def test_repeat_stops_as_soon_as_until_is_true() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: grow
        steps:
          - step_id: grow
            type: record
            value: "{{ (previous or '') ~ 'x' }}"
            repeat: {max: 10, until: "{{ output | length >= 3 }}"}
        """,
        lab=lab,
    )
    assert result.status == COMPLETED
    assert result.output == {"grow": "xxx"}
    record = trace(result)["grow"]
    assert record.iterations == 3
    assert record.until_met is True
    assert record.attempts == 3
    assert len(lab.order("start")) == 3


async def test_repeat_stops_at_max_with_the_last_output() -> None:
    result = await run_yaml(
        """
        id: bounded
        steps:
          - step_id: count
            type: template
            value: {iteration: "{{ iteration }}", previous: "{{ previous }}"}
            repeat: {max: 4, until: false}
        """
    )
    assert result.status == COMPLETED
    assert trace(result)["count"].iterations == 4
    assert trace(result)["count"].until_met is False  # stopped at max: visible in the run
    assert result.output == {
        "count": {
            "iteration": 3,
            "previous": {
                "iteration": 2,
                "previous": {"iteration": 1, "previous": {"iteration": 0, "previous": None}},
            },
        }
    }


async def test_repeat_sees_iteration_and_previous_and_dependents_see_the_final_output() -> None:
    result = await run_yaml(
        """
        id: halve
        input_schema:
          type: object
          properties: {n: {type: integer}}
        steps:
          - step_id: halve
            type: template
            value: "{{ (previous if previous is not none else input.n) // 2 }}"
            repeat: {max: 20, until: "{{ output <= 1 or iteration >= 9 }}"}
          - step_id: report
            type: template
            value: "{{ steps.halve.output }} after {{ steps.halve.attempts }} passes"
        """,
        {"n": 100},
    )
    # 100 -> 50 -> 25 -> 12 -> 6 -> 3 -> 1
    assert result.output == {"report": "1 after 6 passes"}
    assert trace(result)["halve"].iterations == 6


async def test_iterations_counts_passes_and_attempts_counts_retries_too() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: counted
        steps:
          - step_id: passes
            type: flaky
            key: passes
            failures: 1  # the first pass needs a second attempt
            retry: {attempts: 2, backoff_s: 0}
            repeat: {max: 3}
          - step_id: plain
            type: record
            value: 1
          - step_id: report
            type: record
            value:
              iterations: "{{ steps.passes.iterations }}"
              attempts: "{{ steps.passes.attempts }}"
              plain: "{{ steps.plain.iterations }}"
        """,
        lab=lab,
    )
    assert result.status == COMPLETED
    assert result.output == {"report": {"iterations": 3, "attempts": 4, "plain": None}}
    assert (trace(result)["passes"].iterations, trace(result)["passes"].attempts) == (3, 4)
    assert trace(result)["plain"].iterations is None


async def test_a_skipped_or_failed_repeat_step_reports_the_passes_it_made() -> None:
    result = await run_yaml(
        """
        id: unfinished
        steps:
          - step_id: off
            type: template
            when: false
            value: x
            repeat: {max: 3}
          - step_id: breaks
            type: template
            value: "{{ 1 // (1 - iteration) }}"  # the second pass divides by zero
            repeat: {max: 3}
            on_error: continue
          - step_id: report
            type: record
            # reading `status` guards the skip of `off`
            value:
              - "{{ steps.off.status }}"
              - "{{ steps.off.iterations }}"
              - "{{ steps.breaks.iterations }}"
        """
    )
    assert statuses(result) == {"off": "skipped", "breaks": FAILED, "report": COMPLETED}
    assert result.output == {"report": ["skipped", 0, 1]}
    assert trace(result)["off"].iterations == 0
    assert trace(result)["breaks"].iterations == 1


def test_a_misspelt_iterations_is_reported_with_a_suggestion() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        compile_yaml(
            """
            steps:
              - {step_id: a, type: template, value: 1, repeat: {max: 2}}
              - {step_id: b, type: template, value: "{{ steps.a.iteratons }}"}
            """
        )
    assert "has no attribute 'iteratons' (did you mean 'iterations'?)" in str(info.value)


async def test_a_step_can_tell_a_repeat_that_stopped_at_max() -> None:
    result = await run_yaml(
        """
        id: bounded
        steps:
          - step_id: search
            type: template
            value: "{{ iteration }}"
            repeat: {max: 2, until: "{{ output == 5 }}"}
          - step_id: verdict
            type: template
            value: "{{ 'found' if steps.search.until_met else 'gave up' }}"
        """
    )
    assert result.output == {"verdict": "gave up"}
    assert trace(result)["search"].to_dict()["until_met"] is False
    assert "until_met" not in trace(result)["verdict"].to_dict()
