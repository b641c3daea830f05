"""The `workflow` step type: calling another workflow by id or inline, model inheritance,
the nesting bound and failures crossing the boundary."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from engine_helpers import WAIT_S, Lab, catalog_of, compile_yaml, make_runner, statuses, trace

from engine.dsl.catalog import WorkflowCatalog
from engine.runtime.trace import COMPLETED, FAILED, PARTIAL, RunResult

CHILD = """
id: shout
input_schema:
  type: object
  properties:
    text: {type: string}
    suffix: {type: string, default: "!"}
  required: [text]
steps:
  - {step_id: upper, type: template, value: "{{ input.text | upper }}{{ input.suffix }}"}
output:
  loud: "{{ steps.upper.output }}"
"""

PARENT = """
id: parent
input_schema:
  type: object
  properties: {text: {type: string}}
steps:
  - step_id: call
    type: workflow
    workflow: shout
    input: {text: "{{ input.text }}"}
  - step_id: use
    type: template
    value: "{{ steps.call.output.loud }} ({{ steps.call.output.loud | length }})"
"""


async def run(
    catalog: WorkflowCatalog,
    wf_id: str,
    input: Any = None,
    *,
    models: dict[str, str] | None = None,
    max_depth: int = 8,
) -> RunResult:
    runner = make_runner(catalog=catalog, max_depth=max_depth)
    return await asyncio.wait_for(runner.run(catalog.get(wf_id), input, models=models), WAIT_S)


async def test_a_workflow_step_calls_another_workflow_by_id() -> None:
    catalog = catalog_of(CHILD, PARENT)
    result = await run(catalog, "parent", {"text": "hi"})
    assert result.status == COMPLETED, result.error
    assert trace(result)["call"].status == COMPLETED
    # the child's defaults applied, its output mapping is the step's output
    assert result.output == {"use": "HI! (3)"}


async def test_a_workflow_step_runs_an_inline_workflow() -> None:
    wf = compile_yaml(
        """
        id: outer
        steps:
          - step_id: words
            type: template
            value: [a, b]
          - step_id: inner
            type: workflow
            workflow:
              input_schema:
                type: object
                properties: {xs: {type: array}}
              steps:
                - {step_id: each, type: template, for_each: "{{ input.xs }}", value: "<{{ item }}>"}
                - {step_id: joined, type: template, value: "{{ steps.each.output | join(',') }}"}
              output: "{{ steps.joined.output }}"
            input: {xs: "{{ steps.words.output }}"}
        """
    )
    result = await asyncio.wait_for(make_runner().run(wf), WAIT_S)
    assert result.status == COMPLETED, result.error
    assert result.output == {"inner": "<a>,<b>"}


MODEL_CHILD = """
id: model_child
models:
  gen: {type: lm}
  helper: {type: lm, optional: true}
steps:
  - {step_id: pick, type: template, value: {gen: "{{ models.gen }}", helper: "{{ models.helper }}"}}
output: "{{ steps.pick.output }}"
"""


async def test_models_are_inherited_for_roles_of_the_same_name() -> None:
    parent = """
    id: model_parent
    models:
      gen: {type: lm}
      other: {type: embeddings}
    steps:
      - {step_id: call, type: workflow, workflow: model_child}
    """
    catalog = catalog_of(MODEL_CHILD, parent)
    result = await run(catalog, "model_parent", models={"gen": "lm-1", "other": "emb-1"})
    assert result.status == COMPLETED, result.error
    assert result.output == {"call": {"gen": "lm-1", "helper": None}}


async def test_explicit_models_on_the_step_replace_the_inherited_ones() -> None:
    parent = """
    id: model_parent
    models:
      gen: {type: lm}
    steps:
      - step_id: call
        type: workflow
        workflow: model_child
        models: {gen: "{{ models.gen }}-child", helper: small}
    """
    catalog = catalog_of(MODEL_CHILD, parent)
    result = await run(catalog, "model_parent", models={"gen": "lm-1"})
    assert result.output == {"call": {"gen": "lm-1-child", "helper": "small"}}


async def test_a_role_of_another_name_is_not_inherited() -> None:
    parent = """
    id: model_parent
    models:
      writer: {type: lm}
    steps:
      - {step_id: call, type: workflow, workflow: model_child}
    """
    catalog = catalog_of(MODEL_CHILD, parent)
    result = await run(catalog, "model_parent", models={"writer": "lm-1"})
    assert result.status == FAILED
    error = trace(result)["call"].error or ""
    assert "no model bound to required role 'gen'" in error


async def test_a_workflow_that_calls_itself_stops_at_the_nesting_bound() -> None:
    catalog = catalog_of(
        """
        id: forever
        steps:
          - {step_id: again, type: workflow, workflow: forever}
        """
    )
    result = await run(catalog, "forever", max_depth=3)
    assert result.status == FAILED
    assert result.error is not None
    assert "nest deeper than 3 levels" in result.error
    assert "RecursionError" not in result.error


async def test_mutual_recursion_stops_at_the_nesting_bound() -> None:
    catalog = catalog_of(
        "id: ping\nsteps:\n  - {step_id: s, type: workflow, workflow: pong}\n",
        "id: pong\nsteps:\n  - {step_id: s, type: workflow, workflow: ping}\n",
    )
    result = await run(catalog, "ping")  # the default bound
    assert result.status == FAILED
    assert "nest deeper than" in (result.error or "")


async def test_nesting_up_to_the_bound_is_allowed() -> None:
    leaf = "id: leaf\nsteps:\n  - {step_id: v, type: template, value: leaf}\noutput: leaf\n"
    mid = "id: mid\nsteps:\n  - {step_id: s, type: workflow, workflow: leaf}\n"
    top = "id: top\nsteps:\n  - {step_id: s, type: workflow, workflow: mid}\n"
    catalog = catalog_of(leaf, mid, top)
    assert (await run(catalog, "top", max_depth=2)).output == {"s": {"s": "leaf"}}
    too_deep = await run(catalog, "top", max_depth=1)
    assert too_deep.status == FAILED
    assert "nest deeper than 1 levels" in (too_deep.error or "")


async def test_a_failing_child_fails_the_calling_step() -> None:
    child = """
    id: fragile
    steps:
      - {step_id: broken, type: boom, message: child exploded}
    """
    parent = """
    id: caller
    steps:
      - {step_id: call, type: workflow, workflow: fragile}
      - {step_id: after, type: template, value: "{{ steps.call.output }}"}
    """
    catalog = catalog_of(child, parent)
    result = await run(catalog, "caller")
    assert result.status == FAILED
    assert statuses(result) == {"call": FAILED, "after": "cancelled"}
    error = trace(result)["call"].error or ""
    assert "fragile" in error
    assert "child exploded" in error


async def test_a_partial_child_does_not_fail_the_calling_step() -> None:
    child = """
    id: tolerant
    steps:
      - {step_id: broken, type: boom, on_error: continue, default: fallback}
    output: "{{ steps.broken.output }}"
    """
    parent = "id: caller\nsteps:\n  - {step_id: call, type: workflow, workflow: tolerant}\n"
    result = await run(catalog_of(child, parent), "caller")
    assert result.status == COMPLETED
    assert result.status != PARTIAL
    assert result.output == {"call": "fallback"}


async def test_invalid_child_input_fails_the_step_naming_the_pointer() -> None:
    parent = """
    id: caller
    steps:
      - {step_id: call, type: workflow, workflow: shout, input: {text: 5}, retry: {attempts: 3}}
    """
    result = await run(catalog_of(CHILD, parent), "caller")
    assert result.status == FAILED
    record = trace(result)["call"]
    assert record.attempts == 1  # bad input is a request error: not retried
    assert (record.error or "").startswith("input/text:")


async def test_a_workflow_id_missing_at_run_time_fails_the_step() -> None:
    wf = compile_yaml("id: caller\nsteps:\n  - {step_id: call, type: workflow, workflow: ghost}\n")
    result = await asyncio.wait_for(make_runner(catalog=catalog_of(CHILD)).run(wf), WAIT_S)
    assert result.status == FAILED
    assert "workflow 'ghost' not found" in (trace(result)["call"].error or "")


async def test_the_child_gets_the_config_the_step_passes_over_its_own() -> None:
    child = """
    id: configured
    config: {greeting: hello, name: world}
    steps:
      - {step_id: say, type: template, value: "{{ config.greeting }} {{ config.name }}"}
    output: "{{ steps.say.output }}"
    """
    parent = """
    id: caller
    config: {name: parent}
    steps:
      - {step_id: call, type: workflow, workflow: configured, config: {name: "{{ config.name }}"}}
    """
    result = await run(catalog_of(child, parent), "caller")
    assert result.output == {"call": "hello parent"}


async def test_cancelling_the_parent_run_cancels_the_childs_running_steps() -> None:
    wf = compile_yaml(
        """
        id: parent_of_hang
        steps:
          - step_id: call
            type: workflow
            workflow:
              steps:
                - {step_id: stuck, type: hang, name: deep}
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    await lab.wait("started:deep")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert lab.cancelled == ["deep"]
