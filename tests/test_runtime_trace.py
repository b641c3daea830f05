"""What a run reports: the trace entry of each step, the result object and the events."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from engine_helpers import WAIT_S, compile_yaml, make_runner, run_yaml, trace

from engine.runtime.trace import COMPLETED, PARTIAL

TRACED = """
id: traced
version: 3
steps:
  - {step_id: first, type: record, value: 1, model: "{{ input.model }}"}
  - {step_id: second, type: template, value: "{{ steps.first.output + 1 }}"}
  - {step_id: skipped, type: template, when: false, value: 0}
  - step_id: failing
    type: boom
    message: expected failure
    on_error: continue
    retry: {attempts: 2, backoff_s: 0}
  - {step_id: mapped, type: template, for_each: [a, b, c], value: "{{ item }}"}
"""


def _iso(value: str) -> datetime:
    assert value.endswith("Z")
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_every_step_has_a_trace_entry_with_its_facts() -> None:
    result = await run_yaml(TRACED, {"model": "tiny-lm"})
    assert [r.step_id for r in result.trace] == ["first", "second", "skipped", "failing", "mapped"]
    records = trace(result)

    first = records["first"]
    assert (first.type, first.status, first.attempts, first.error) == ("record", COMPLETED, 1, None)
    assert first.model == "tiny-lm"  # the step type's model parameter, rendered
    assert first.duration_ms is not None
    assert first.duration_ms >= 0
    started = _iso(first.started_at or "")
    assert _iso(result.created_at) <= started <= _iso(result.completed_at)

    assert records["second"].type == "template"
    assert records["second"].model is None
    assert _iso(records["second"].started_at or "") >= started  # it waited for first

    assert records["skipped"].status == "skipped"
    assert records["skipped"].attempts == 0

    failing = records["failing"]
    assert (failing.status, failing.attempts) == ("failed", 2)
    assert failing.error == "RuntimeError: expected failure"

    assert records["mapped"].items == 3
    assert records["mapped"].attempts == 3


async def test_the_result_serialises_to_json_with_the_run_facts() -> None:
    result = await run_yaml(TRACED, {"model": "tiny-lm"})
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == PARTIAL
    assert data["workflow_id"] == "traced"
    assert data["workflow_version"] == 3
    assert data["run_id"].startswith("wf-")
    assert data["error"] is None
    assert data["total_latency_ms"] >= 0
    entries = {e["step_id"]: e for e in data["trace"]}
    assert set(entries["first"]) >= {
        "step_id",
        "type",
        "status",
        "model",
        "attempts",
        "started_at",
        "duration_ms",
        "error",
    }
    assert entries["failing"]["error"] == "RuntimeError: expected failure"
    assert entries["first"]["error"] is None
    assert "model" not in entries["second"]  # absent rather than null when there is none


async def test_events_arrive_in_order_for_each_step() -> None:
    wf = compile_yaml(TRACED)
    events: list[dict] = []
    result = await asyncio.wait_for(
        make_runner().run(wf, {"model": "m"}, on_event=events.append, run_id="wf-fixed"),
        WAIT_S,
    )
    assert result.run_id == "wf-fixed"
    assert all(e["run_id"] == "wf-fixed" for e in events)
    names = [e["event"] for e in events]
    assert names[0] == "run_started"
    assert events[0]["workflow_id"] == "traced"
    assert names[-1] == "run_finished"
    assert events[-1]["status"] == PARTIAL
    assert names.count("run_started") == names.count("run_finished") == 1

    def position(event: str, step_id: str) -> int:
        # the top run's own steps: a for_each item's events carry a path (test_trace_children)
        found = [
            i
            for i, e in enumerate(events)
            if e["event"] == event and e.get("step_id") == step_id and "path" not in e
        ]
        assert len(found) == 1, (event, step_id, events)
        return found[0]

    for sid in ("first", "second", "failing", "mapped"):
        assert position("step_started", sid) < position("step_finished", sid)
    # a dependent starts only after its dependency finished
    assert position("step_finished", "first") < position("step_started", "second")
    finished = {
        e["step_id"]: e for e in events if e["event"] == "step_finished" and "path" not in e
    }
    assert finished["failing"]["status"] == "failed"
    assert finished["failing"]["error"] == "RuntimeError: expected failure"
    assert finished["skipped"]["status"] == "skipped"
    assert finished["second"]["status"] == COMPLETED
    assert set(finished) == {"first", "second", "skipped", "failing", "mapped"}


async def test_a_skip_by_propagation_is_reported_with_its_reason() -> None:
    events: list[dict] = []
    await run_yaml(
        """
        id: propagated
        steps:
          - {step_id: off, type: template, when: false, value: 1}
          - {step_id: reader, type: template, value: "{{ steps.off.output }}"}
        """,
        on_event=events.append,
    )
    reasons = {e["step_id"]: e.get("reason") for e in events if e["event"] == "step_finished"}
    assert reasons == {"off": "'when' was false", "reader": "a dependency was skipped"}
    assert not any(e["event"] == "step_started" and e["step_id"] == "reader" for e in events)
