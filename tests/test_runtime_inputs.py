"""What a run is given: input validated against input_schema (defaults applied), model roles
bound, config merged, and parameters that a step mutates not leaking into later runs."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from engine_helpers import WAIT_S, Lab, compile_yaml, make_runner, run_yaml, statuses

from engine.dsl.compiled import RoleSpec
from engine.errors import InvalidRequest, ServiceUnavailable
from engine.runtime import inputs
from engine.runtime.trace import COMPLETED

SEARCH = """
id: search
input_schema:
  type: object
  properties:
    query: {type: string, minLength: 1}
    collection: {type: string, default: default}
    n: {type: integer}
    options:
      type: object
      properties:
        depth: {type: integer, default: 2}
        mode: {enum: [fast, exact]}
      default: {}
  required: [query]
steps:
  - step_id: echo
    type: record
    value: "{{ input }}"
"""


# -- input ------------------------------------------------------------------------------


async def test_input_defaults_are_applied_including_nested_ones() -> None:
    given = {"query": "q"}
    result = await run_yaml(SEARCH, given)
    assert result.status == COMPLETED
    assert result.output == {
        "echo": {"query": "q", "collection": "default", "options": {"depth": 2}}
    }
    assert given == {"query": "q"}  # the caller's object is not modified


async def test_given_input_values_win_over_defaults() -> None:
    result = await run_yaml(SEARCH, {"query": "q", "collection": "docs", "options": {"depth": 5}})
    assert result.output == {"echo": {"query": "q", "collection": "docs", "options": {"depth": 5}}}


@pytest.mark.parametrize("required_first", [False, True])
async def test_a_default_satisfies_required_whatever_the_key_order(required_first: bool) -> None:
    # JSON object keys have no order: `required` before `properties` must mean the same.
    schema = "required: [mode]\n  properties: {mode: {type: string, default: x}}"
    if not required_first:
        schema = "properties: {mode: {type: string, default: x}}\n  required: [mode]"
    text = (
        f"id: ordered\ninput_schema:\n  type: object\n  {schema}\n"
        "steps:\n  - {step_id: e, type: template, value: '{{ input.mode }}'}\n"
    )
    assert (await run_yaml(text)).output == {"e": "x"}


@pytest.mark.parametrize(
    ("given", "param"),
    [
        ({}, "input/query"),
        (None, "input/query"),
        ({"collection": "x"}, "input/query"),
        ({"query": "q", "n": "three"}, "input/n"),
        ({"query": ""}, "input/query"),
        ({"query": "q", "options": {"mode": "slow"}}, "input/options/mode"),
        ({"query": "q", "options": {"depth": "deep"}}, "input/options/depth"),
        (["query"], "input"),
        ("query", "input"),
    ],
)
async def test_invalid_input_is_a_request_error_naming_the_json_pointer(
    given: Any, param: str
) -> None:
    lab = Lab()
    events: list[dict] = []
    with pytest.raises(InvalidRequest) as caught:
        await run_yaml(SEARCH, given, lab=lab, on_event=events.append)
    assert caught.value.param == param
    assert caught.value.status == 400
    assert caught.value.message.startswith(param)
    assert events == []  # refused before anything ran
    assert lab.log == []


async def test_a_workflow_without_input_schema_accepts_any_object_but_not_a_list() -> None:
    text = "id: free\nsteps:\n  - {step_id: e, type: template, value: '{{ input }}'}\n"
    assert (await run_yaml(text, {"anything": [1]})).output == {"e": {"anything": [1]}}
    assert (await run_yaml(text)).output == {"e": {}}
    with pytest.raises(InvalidRequest) as caught:
        await run_yaml(text, [1, 2])
    assert caught.value.param == "input"


# -- models -------------------------------------------------------------------------------

MODELS = """
id: roles
models:
  gen: {type: lm}
  rerank: {type: lm, optional: true}
steps:
  - step_id: rerank
    type: record
    when: "{{ models.rerank }}"
    value: "reranked with {{ models.rerank }}"
  - step_id: generate
    type: record
    model: "{{ models.gen }}"
    value: "generated with {{ models.gen }}"
output:
  gen: "{{ models.gen }}"
  rerank_is_none: "{{ models.rerank is none }}"
  reranked: "{{ steps.rerank.ran }}"
  generated: "{{ steps.generate.output }}"
"""


async def test_models_are_bound_and_an_optional_role_without_a_model_is_none() -> None:
    result = await run_yaml(MODELS, models={"gen": "tiny-lm"})
    assert result.status == COMPLETED
    assert result.output == {
        "gen": "tiny-lm",
        "rerank_is_none": True,
        "reranked": False,
        "generated": "generated with tiny-lm",
    }
    assert statuses(result)["rerank"] == "skipped"


async def test_an_optional_role_with_a_model_is_used() -> None:
    result = await run_yaml(MODELS, models={"gen": "tiny-lm", "rerank": "tiny-rr"})
    assert result.output["reranked"] is True
    assert result.output["rerank_is_none"] is False


async def test_an_unknown_model_role_is_a_request_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        await run_yaml(MODELS, models={"gen": "tiny-lm", "vision": "v"})
    assert "vision" in caught.value.message
    assert caught.value.param == "models.vision"


async def test_a_required_role_without_a_model_is_model_not_loaded() -> None:
    events: list[dict] = []
    with pytest.raises(ServiceUnavailable) as caught:
        await run_yaml(MODELS, models={"rerank": "tiny-rr"}, on_event=events.append)
    assert caught.value.code == "model_not_loaded"
    assert caught.value.status == 503
    assert caught.value.param == "models.gen"
    assert events == []


async def test_the_model_selector_fills_required_roles_the_caller_left_out() -> None:
    asked: list[tuple[str, str]] = []

    def select(role: str, spec: RoleSpec) -> str | None:
        asked.append((role, spec.type))
        return "auto-lm"

    wf = compile_yaml(MODELS)
    runner = make_runner(select_model=select)
    result = await asyncio.wait_for(runner.run(wf, models={}), WAIT_S)
    assert result.output["gen"] == "auto-lm"
    # an optional role stays off unless the caller names a model, even if one is loaded
    assert result.output["rerank_is_none"] is True
    assert asked == [("gen", "lm")]
    # the caller's choice wins over the selector
    result = await asyncio.wait_for(runner.run(wf, models={"gen": "mine"}), WAIT_S)
    assert result.output["gen"] == "mine"


# -- config -----------------------------------------------------------------------------

CONFIG = """
id: configured
config: {top_k: 5, temperature: 0.7, nested: {a: 1}}
steps:
  - {step_id: show, type: template, value: "{{ config }}"}
"""


async def test_run_config_overrides_the_workflow_config_key_by_key() -> None:
    result = await run_yaml(CONFIG, config={"top_k": 2, "extra": True})
    assert result.output == {
        "show": {"top_k": 2, "temperature": 0.7, "nested": {"a": 1}, "extra": True}
    }
    result = await run_yaml(CONFIG)
    assert result.output == {"show": {"top_k": 5, "temperature": 0.7, "nested": {"a": 1}}}


async def test_config_that_is_not_an_object_is_a_request_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        await run_yaml(CONFIG, config=[1])  # type: ignore[arg-type]
    assert caught.value.param == "config"


# -- no state leaks between runs ----------------------------------------------------------


async def test_a_step_mutating_literal_parameters_does_not_change_the_next_run() -> None:
    wf = compile_yaml(
        """
        id: mutating
        steps:
          - {step_id: m, type: mutate, items: [1, 2], extra: {k: v}}
        """
    )
    runner = make_runner()
    first = await asyncio.wait_for(runner.run(wf), WAIT_S)
    second = await asyncio.wait_for(runner.run(wf), WAIT_S)
    assert first.output == second.output == {"m": {"items": [1, 2], "extra": {"k": "v"}}}


async def test_a_step_mutating_templated_parameters_does_not_change_the_next_run() -> None:
    wf = compile_yaml(
        """
        id: mutating
        config: {tags: [a]}
        steps:
          - step_id: from_config
            type: mutate
            items: "{{ config.tags }}"
            extra: {static: [1], from_input: "{{ input.x }}"}
          - step_id: from_input
            type: mutate
            items: "{{ input.tags }}"
        """
    )
    runner = make_runner()
    given = {"tags": ["t"], "x": 1}
    outputs = []
    for _ in range(2):
        result = await asyncio.wait_for(runner.run(wf, given), WAIT_S)
        assert result.status == COMPLETED, result.error
        outputs.append(result.output)
    assert outputs[0] == outputs[1]
    assert outputs[1]["from_config"]["items"] == ["a"]
    assert outputs[1]["from_input"]["items"] == ["t"]
    assert given == {"tags": ["t"], "x": 1}
    assert wf.config == {"tags": ["a"]}


async def test_a_step_mutating_a_default_output_does_not_change_the_next_run() -> None:
    wf = compile_yaml(
        """
        id: mutating_default
        steps:
          - {step_id: skipped, type: template, when: false, value: 1, default: [d]}
          - step_id: uses_default
            type: mutate
            items: "{{ steps.skipped.output }}"
            extra: {guard: "{{ steps.skipped.ran }}"}
          - {step_id: broken, type: boom, on_error: continue, default: [e]}
          - step_id: uses_failed_default
            type: mutate
            items: "{{ steps.broken.output }}"
        """
    )
    runner = make_runner()
    first = await asyncio.wait_for(runner.run(wf), WAIT_S)
    second = await asyncio.wait_for(runner.run(wf), WAIT_S)
    assert first.output == second.output
    assert second.output["uses_default"]["items"] == ["d"]
    assert second.output["uses_failed_default"]["items"] == ["e"]


def test_a_schema_sent_to_the_sandbox_finds_its_validator_again_by_content() -> None:
    """In a sandbox worker each call brings a new copy of the schema: the validator is found
    by the content digest the caller sends, not rebuilt for every call."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    key = inputs._content_key(schema)
    first, _ = inputs._validator(copy.deepcopy(schema), key=key)
    again, _ = inputs._validator(copy.deepcopy(schema), key=key)
    assert again is first
    other = {**schema, "required": []}
    assert inputs._validator(copy.deepcopy(other), key=inputs._content_key(other))[0] is not first
