"""Mocked steps: a step given an output does not run; the rest of the run uses that output."""

from __future__ import annotations

import pytest
from engine_helpers import Lab, make_runner, run_yaml, statuses, trace

from engine.errors import InvalidRequest
from engine.runtime.trace import COMPLETED, FAILED, STEP_SKIPPED

pytestmark = pytest.mark.unit

PIPELINE = """
id: pipeline
models:
  generation: {type: lm}
input_schema:
  type: object
  properties: {flag: {type: boolean, default: true}}
steps:
  - step_id: draft
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input: {prompt: hello}
  - step_id: count
    type: record
    value: "{{ steps.draft.output.content | length }}"
  - step_id: gated
    type: record
    when: "{{ input.flag }}"
    for_each: "{{ [1, 2, 3] }}"
    value: real
output:
  text: "{{ steps.draft.output.content }}"
  count: "{{ steps.count.output }}"
  gated: "{{ steps.gated.output }}"
"""


async def test_a_mocked_step_is_not_run_and_its_output_feeds_the_rest() -> None:
    lab = Lab()
    mocks = {"draft": {"content": "four", "finish_reason": "stop"}, "gated": ["mocked"]}
    result = await run_yaml(PIPELINE, {}, lab=lab, mocks=mocks)
    assert result.status == COMPLETED, result.error
    assert result.output == {"text": "four", "count": 4, "gated": ["mocked"]}
    records = trace(result)
    assert records["draft"].mocked is True
    assert records["gated"].mocked is True
    assert records["gated"].items is None  # for_each did not run
    assert records["count"].mocked is None
    assert lab.order("start") == ["count"]  # only the unmocked record step ran
    assert "mocked" in records["draft"].to_dict()
    assert "mocked" not in records["count"].to_dict()


async def test_a_mocked_step_still_obeys_its_when() -> None:
    result = await run_yaml(
        PIPELINE, {"flag": False}, mocks={"draft": {"content": "x"}, "gated": ["mocked"]}
    )
    assert statuses(result)["gated"] == STEP_SKIPPED
    assert result.output["gated"] is None


async def test_each_run_gets_its_own_copy_of_a_mock() -> None:
    mocks = {"draft": {"content": "abc"}, "gated": []}
    for _ in range(2):
        result = await run_yaml(PIPELINE, {}, mocks=mocks)
        assert result.output["count"] == 3
    assert mocks == {"draft": {"content": "abc"}, "gated": []}


async def test_a_mock_of_no_step_is_a_request_error_with_a_hint() -> None:
    with pytest.raises(InvalidRequest, match=r"no step 'drafts' to mock \(did you mean 'draft'"):
        await run_yaml(PIPELINE, {}, mocks={"drafts": {}})


async def test_an_unmocked_step_whose_role_has_no_model_fails_and_says_why() -> None:
    # With mocks a required role may stay unbound (the mocked steps may be its only users).
    runner = make_runner(None)
    result = await run_yaml(PIPELINE, {}, runner=runner, mocks={"gated": []})
    assert result.status == FAILED
    error = trace(result)["draft"].error or ""
    assert "model_id is null" in error
    assert "mock step 'draft'" in error
