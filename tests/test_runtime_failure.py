"""Failure handling: retry, timeout_s, on_error, cancellation, and run-time parameter
validation."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import WAIT_S, Lab, compile_yaml, make_runner, run_yaml, statuses, trace

from engine.runtime.trace import COMPLETED, FAILED, PARTIAL

# -- retry ------------------------------------------------------------------------------


async def test_retry_succeeds_after_failures_and_counts_attempts() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: retrying
        steps:
          - step_id: shaky
            type: flaky
            key: shaky
            failures: 2
            retry: {attempts: 3, backoff_s: 0}
        """,
        lab=lab,
    )
    assert result.status == COMPLETED
    assert result.output == {"shaky": 3}
    record = trace(result)["shaky"]
    assert record.attempts == 3
    assert record.error is None
    assert lab.order("attempt") == ["1", "2", "3"]  # ctx.attempt counts up


async def test_retry_gives_up_after_the_last_attempt_with_its_error() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: exhausted
        steps:
          - step_id: shaky
            type: flaky
            key: shaky
            failures: 10
            retry: {attempts: 3, backoff_s: 0}
        """,
        lab=lab,
    )
    assert result.status == FAILED
    record = trace(result)["shaky"]
    assert record.status == FAILED
    assert record.attempts == 3
    assert record.error == "RuntimeError: flaky failure 3"
    assert lab.counts["shaky"] == 3
    assert result.error == "step 'shaky' failed: RuntimeError: flaky failure 3"
    assert result.output is None


async def test_without_retry_a_step_is_attempted_once() -> None:
    lab = Lab()
    result = await run_yaml(
        "id: once\nsteps:\n  - {step_id: b, type: boom, message: nope}\n", lab=lab
    )
    assert result.status == FAILED
    assert trace(result)["b"].attempts == 1
    assert lab.counts["boom:b"] == 1


async def test_a_request_error_from_a_step_is_not_retried() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: invalid
        steps:
          - step_id: b
            type: boom
            invalid: true
            message: bad parameters
            retry: {attempts: 5, backoff_s: 0}
        """,
        lab=lab,
    )
    assert lab.counts["boom:b"] == 1
    assert trace(result)["b"].error == "bad parameters"


# -- timeout_s ----------------------------------------------------------------------------


async def test_timeout_fails_a_hanging_attempt_and_cancels_it() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: hangs
        steps:
          - {step_id: stuck, type: hang, timeout_s: 0.02}
        """,
        lab=lab,
    )
    assert result.status == FAILED
    record = trace(result)["stuck"]
    assert record.status == FAILED
    assert record.error is not None
    assert "timed out" in record.error
    assert lab.cancelled == ["stuck"]  # the hanging coroutine's finally ran


async def test_each_attempt_gets_its_own_timeout() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: hangs_twice
        steps:
          - step_id: stuck
            type: hang
            timeout_s: 0.01
            retry: {attempts: 2, backoff_s: 0}
        """,
        lab=lab,
    )
    assert trace(result)["stuck"].attempts == 2
    assert lab.cancelled == ["stuck", "stuck"]


async def test_a_step_within_its_timeout_completes() -> None:
    result = await run_yaml(
        "id: quick\nsteps:\n  - {step_id: q, type: record, value: 7, timeout_s: 30}\n"
    )
    assert result.status == COMPLETED
    assert result.output == {"q": 7}


# -- on_error -------------------------------------------------------------------------------


async def test_on_error_continue_makes_the_run_partial_and_dependents_see_the_failure() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: tolerant
        steps:
          - step_id: broken
            type: boom
            message: the service is down
            on_error: continue
            default: {fallback: true}
          - step_id: uses_output
            type: record
            value: "{{ steps.broken.output }}"
          - step_id: inspects
            type: record
            value:
              status: "{{ steps.broken.status }}"
              ran: "{{ steps.broken.ran }}"
              error: "{{ steps.broken.error }}"
          - step_id: independent
            type: record
            value: fine
        output:
          uses_output: "{{ steps.uses_output.output }}"
          inspects: "{{ steps.inspects.output }}"
          broken: "{{ steps.broken.output }}"
        """,
        lab=lab,
    )
    assert result.status == PARTIAL
    assert result.error is None
    assert statuses(result) == {
        "broken": FAILED,
        "uses_output": COMPLETED,
        "inspects": COMPLETED,
        "independent": COMPLETED,
    }
    assert trace(result)["broken"].error == "RuntimeError: the service is down"
    assert result.output == {
        "uses_output": {"fallback": True},
        "inspects": {
            "status": "failed",
            "ran": True,
            "error": "RuntimeError: the service is down",
        },
        "broken": {"fallback": True},
    }


async def test_on_error_fail_cancels_running_siblings_and_steps_not_started() -> None:
    wf = compile_yaml(
        """
        id: fail_fast
        steps:
          - step_id: sibling
            type: hang
          - step_id: go
            type: gate
          - step_id: broken
            type: boom
            depends_on: [go]
            message: fatal
          - step_id: after_sibling
            type: record
            value: "{{ steps.sibling.output }}"
          - step_id: after_broken
            type: record
            depends_on: [broken]
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    await lab.wait("started:sibling")
    lab.set("release:go")
    result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == FAILED
    assert result.error == "step 'broken' failed: RuntimeError: fatal"
    assert result.output is None
    assert statuses(result) == {
        "sibling": "cancelled",
        "go": COMPLETED,
        "broken": FAILED,
        "after_sibling": "cancelled",
        "after_broken": "cancelled",
    }
    assert lab.cancelled == ["sibling"]
    assert lab.in_flight == 0
    assert trace(result)["sibling"].duration_ms is not None
    assert trace(result)["after_broken"].started_at is None  # never started


async def test_on_error_fail_cancels_for_each_items_still_running() -> None:
    wf = compile_yaml(
        """
        id: map_cancelled
        steps:
          - step_id: many
            type: hang
            for_each: [1, 2]
            name: "h{{ item }}"
          - step_id: go
            type: gate
          - step_id: broken
            type: boom
            depends_on: [go]
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    await lab.wait("started:h1")
    await lab.wait("started:h2")
    lab.set("release:go")
    result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == FAILED
    assert trace(result)["many"].status == "cancelled"
    assert sorted(lab.cancelled) == ["h1", "h2"]


# -- cancelling the run ------------------------------------------------------------------------


async def test_cancelling_the_run_cancels_its_running_steps() -> None:
    wf = compile_yaml(
        """
        id: cancellable
        steps:
          - {step_id: one, type: hang}
          - {step_id: two, type: hang}
          - {step_id: later, type: record, value: "{{ steps.one.output }}"}
        """
    )
    lab = Lab()
    events: list[dict] = []
    task = asyncio.create_task(make_runner(lab).run(wf, on_event=events.append))
    await lab.wait("started:one")
    await lab.wait("started:two")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert task.cancelled()
    assert sorted(lab.cancelled) == ["one", "two"]
    assert lab.in_flight == 0
    assert "later" not in lab.order("start")
    finished = {e["step_id"]: e["status"] for e in events if e["event"] == "step_finished"}
    assert finished == {"one": "cancelled", "two": "cancelled"}
    assert events[-1]["event"] == "run_cancelled"


async def test_cancelling_the_run_during_a_retry_backoff_stops_it() -> None:
    wf = compile_yaml(
        """
        id: backoff
        steps:
          - step_id: shaky
            type: flaky
            key: shaky
            failures: 10
            retry: {attempts: 5, backoff_s: 60}
        """
    )
    lab = Lab()
    events: list[dict] = []
    task = asyncio.create_task(make_runner(lab).run(wf, on_event=events.append))
    # The first attempt fails and the step goes straight into a 60 s backoff.
    await lab.wait("called:shaky")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert lab.counts["shaky"] == 1


# -- parameters rendered at run time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "input", "expected"),
    [
        ("n: \"{{ 'x' }}\"", {}, "parameter n: 'x' is not of type 'integer'"),
        ('n: "{{ input.n }}"', {"n": -1}, "parameter n: -1 is less than the minimum of 0"),
        ('n: 1\n    mode: "{{ input.mode }}"', {"mode": "warp"}, "parameter mode: 'warp' is not"),
    ],
)
async def test_rendered_parameters_are_validated_against_the_step_types_schema(
    params: str, input: dict, expected: str
) -> None:
    result = await run_yaml(
        f"id: typed\nsteps:\n  - step_id: t\n    type: typed\n    {params}\n", input
    )
    assert result.status == FAILED
    record = trace(result)["t"]
    assert record.status == FAILED
    assert record.error is not None
    assert record.error.startswith(expected)


async def test_valid_rendered_parameters_reach_the_plugin_with_their_native_type() -> None:
    result = await run_yaml(
        'id: typed\nsteps:\n  - {step_id: t, type: typed, n: "{{ input.n * 2 }}"}\n', {"n": 21}
    )
    assert result.status == COMPLETED
    assert result.output == {"t": {"n": 42, "mode": None}}


async def test_a_parameter_that_fails_to_render_fails_the_step_naming_the_template() -> None:
    result = await run_yaml(
        """
        id: undefined
        steps:
          - {step_id: t, type: template, value: "{{ input.nothing_here }}"}
        """
    )
    assert result.status == FAILED
    error = trace(result)["t"].error
    assert error is not None
    assert error.startswith("parameters:")
    assert "nothing_here" in error


async def test_a_sandbox_violation_at_run_time_fails_the_step_without_executing() -> None:
    result = await run_yaml(
        """
        id: sandbox
        steps:
          - {step_id: t, type: template, value: "{{ input.text * input.times }}"}
        """,
        {"text": "ab", "times": 10_000_000},
    )
    assert result.status == FAILED
    assert "refused" in (trace(result)["t"].error or "")
