"""Child steps in traces and events: a `workflow` step's sub-run steps, `for_each` items and
`repeat` passes are children of their step's trace entry, each with its path from the top
run, its own status and timing; their events reach the top run's sink with that path; the
bound trace_max_children; the run body and stored runs over HTTP."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from engine_helpers import WAIT_S, Lab, compile_yaml, make_registry, make_runner, trace
from serverutil import serve_app
from test_api_fusion import sse_events

from engine.cli.progress import Progress
from engine.config import Settings
from engine.runtime.executor import RunLimits
from engine.runtime.trace import COMPLETED, FAILED, RunResult, StepRecord
from engine.steps.base import StepContext, StepPlugin
from server.app import create_app

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


class SpeakStep(StepPlugin):
    """Emit each word of `text` as a token event, return the text."""

    type_name = "speak"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        for word in params["text"].split():
            ctx.emit("token", {"delta": word})
        return params["text"]


def registry() -> Any:
    found = make_registry()
    found.register(SpeakStep())
    return found


async def run(
    text: str, input: Any = None, *, events: list[dict[str, Any]] | None = None, **runner: Any
) -> RunResult:
    wf = compile_yaml(text, registry=registry())
    sink = events.append if events is not None else None
    return await asyncio.wait_for(
        make_runner(Lab(), **runner).run(wf, input, on_event=sink, run_id="wf-top"), WAIT_S
    )


def kids(record: StepRecord) -> list[StepRecord]:
    assert record.children is not None, record
    return record.children


# The summariser's shape: passes of a sub-workflow that maps its pieces.
PASSES = """
id: passes_of_pieces
steps:
  - step_id: passes
    type: workflow
    repeat: {max: 2, until: "{{ false }}"}
    input: {pieces: ["a b", "c"]}
    workflow:
      input_schema:
        type: object
        properties: {pieces: {type: array}}
      steps:
        - {step_id: split, type: template, value: "{{ input.pieces }}"}
        - step_id: summarise
          type: speak
          for_each: "{{ steps.split.output }}"
          concurrency: 1
          text: "{{ item }}"
      output: "{{ steps.summarise.output }}"
"""


async def test_a_workflow_steps_children_are_its_sub_run_steps() -> None:
    result = await run(
        """
        id: outer
        steps:
          - step_id: call
            type: workflow
            workflow:
              steps:
                - {step_id: first, type: template, value: 1}
                - {step_id: second, type: template, value: "{{ steps.first.output + 1 }}"}
              output: "{{ steps.second.output }}"
          - {step_id: after, type: template, value: "{{ steps.call.output }}"}
        """
    )
    assert result.status == COMPLETED, result.error
    call = trace(result)["call"]
    assert [(c.step_id, c.path, c.status) for c in kids(call)] == [
        ("first", ["call", "first"], COMPLETED),
        ("second", ["call", "second"], COMPLETED),
    ]
    for child in kids(call):
        assert child.duration_ms is not None
        assert child.started_at is not None
        assert child.attempts == 1
        assert child.index is None
        assert child.children is None
    # the top run's own steps carry no path, and a step without children none either
    assert call.path is None
    after = trace(result)["after"]
    assert after.path is None
    assert after.children is None
    assert "children" not in after.to_dict()
    assert "path" not in after.to_dict()
    assert result.to_dict()["trace"][0]["children"][1]["path"] == ["call", "second"]


async def test_for_each_items_are_children_with_their_index_attempts_and_error() -> None:
    result = await run(
        """
        id: mapped
        steps:
          - step_id: each
            type: flaky
            for_each: [a, b, c]
            key: "{{ item }}"
            failures: 1
            retry: {attempts: 2, backoff_s: 0}
          - step_id: divide
            type: template
            for_each: [1, 0]
            concurrency: 1
            on_error: continue
            value: "{{ 1 // item }}"
        """
    )
    each = trace(result)["each"]
    assert each.status == COMPLETED
    assert each.items == 3
    assert each.attempts == 6
    assert [(c.index, c.path, c.status, c.attempts) for c in kids(each)] == [
        (0, ["each", 0], COMPLETED, 2),
        (1, ["each", 1], COMPLETED, 2),
        (2, ["each", 2], COMPLETED, 2),
    ]
    assert all(c.step_id == "each" and c.type == "flaky" for c in kids(each))
    assert all(c.duration_ms is not None for c in kids(each))
    divide = trace(result)["divide"]
    assert divide.status == FAILED
    ok, bad = kids(divide)
    assert (ok.index, ok.status, ok.error) == (0, COMPLETED, None)
    assert (bad.index, bad.status) == (1, FAILED)
    assert bad.error is not None
    assert bad.error == divide.error


async def test_repeat_passes_are_children() -> None:
    result = await run(
        """
        id: repeated
        steps:
          - step_id: count
            type: template
            repeat: {max: 5, until: "{{ output >= 2 }}"}
            value: "{{ iteration }}"
        """
    )
    count = trace(result)["count"]
    assert count.iterations == 3
    assert count.until_met is True
    assert [(c.index, c.path, c.status, c.attempts) for c in kids(count)] == [
        (0, ["count", 0], COMPLETED, 1),
        (1, ["count", 1], COMPLETED, 1),
        (2, ["count", 2], COMPLETED, 1),
    ]


async def test_nested_children_carry_their_path_from_the_top() -> None:
    result = await run(PASSES)
    assert result.status == COMPLETED, result.error
    passes = trace(result)["passes"]
    assert [c.path for c in kids(passes)] == [["passes", 0], ["passes", 1]]
    for number, one_pass in enumerate(kids(passes)):
        split, summarise = kids(one_pass)
        assert split.path == ["passes", number, "split"]
        assert summarise.path == ["passes", number, "summarise"]
        assert summarise.items == 2
        assert [c.path for c in kids(summarise)] == [
            ["passes", number, "summarise", 0],
            ["passes", number, "summarise", 1],
        ]
        assert all(c.status == COMPLETED for c in kids(summarise))


async def test_child_events_reach_the_top_sink_in_order_with_their_path() -> None:
    events: list[dict[str, Any]] = []
    await run(PASSES, events=events)
    assert all(e["run_id"] == "wf-top" for e in events)
    names = [e["event"] for e in events]
    # the sub-runs' own run events are not forwarded
    assert names.count("run_started") == names.count("run_finished") == 1

    def at(name: str, *path: str | int) -> int:
        found = [
            i
            for i, e in enumerate(events)
            if e["event"] == name and e.get("path", [e.get("step_id")]) == list(path)
        ]
        assert len(found) == 1, (name, path, events)
        return found[0]

    order = [
        at("step_started", "passes"),
        at("step_started", "passes", 0),
        at("step_started", "passes", 0, "split"),
        at("step_finished", "passes", 0, "split"),
        at("step_started", "passes", 0, "summarise"),
        at("step_started", "passes", 0, "summarise", 0),
        at("step_finished", "passes", 0, "summarise", 0),
        at("step_started", "passes", 0, "summarise", 1),
        at("step_finished", "passes", 0, "summarise", 1),
        at("step_finished", "passes", 0, "summarise"),
        at("step_finished", "passes", 0),
        at("step_started", "passes", 1),
        at("step_finished", "passes", 1),
        at("step_finished", "passes"),
    ]
    assert order == sorted(order)
    # step_id stays the innermost step's id
    assert events[at("step_started", "passes", 1, "summarise", 0)]["step_id"] == "summarise"
    assert events[at("step_started", "passes", 1, "summarise", 0)]["index"] == 0
    finished = events[at("step_finished", "passes", 0, "summarise", 1)]
    assert finished["status"] == COMPLETED
    assert finished["duration_ms"] is not None
    tokens = [(e["delta"], e["path"]) for e in events if e["event"] == "token"]
    assert tokens == [
        (word, ["passes", number, "summarise", index])
        for number in (0, 1)
        for index, word in ((0, "a"), (0, "b"), (1, "c"))
    ]


async def test_children_beyond_the_bound_are_counted_not_recorded() -> None:
    events: list[dict[str, Any]] = []
    result = await run(
        """
        id: bounded
        steps:
          - {step_id: each, type: template, for_each: [a, b, c, d, e], value: "{{ item }}"}
          - step_id: again
            type: template
            repeat: {max: 4, until: "{{ false }}"}
            value: "{{ iteration }}"
          - step_id: call
            type: workflow
            workflow:
              steps:
                - {step_id: one, type: template, value: 1}
                - {step_id: two, type: template, value: 2}
                - {step_id: three, type: template, value: 3}
        """,
        events=events,
        limits=RunLimits(max_trace_children=2),
    )
    assert result.status == COMPLETED, result.error
    each, again, call = (trace(result)[sid] for sid in ("each", "again", "call"))
    assert each.items == 5
    assert [c.index for c in kids(each)] == [0, 1]
    assert each.children_omitted == 3
    assert again.iterations == 4
    assert [c.index for c in kids(again)] == [0, 1]
    assert again.children_omitted == 2
    assert [c.step_id for c in kids(call)] == ["one", "two"]
    assert call.children_omitted == 1
    assert result.output["each"] == ["a", "b", "c", "d", "e"]  # every item ran
    # the omitted items send no step events: events describe the children recorded
    item_paths = [e["path"] for e in events if e["event"] == "step_started" and "path" in e]
    assert ["each", 2] not in item_paths
    assert ["each", 1] in item_paths
    assert result.to_dict()["trace"][0]["children_omitted"] == 3


def test_cli_progress_indents_child_steps_by_depth() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress("step_started", {"step_id": "passes", "type": "workflow"})
    progress("step_started", {"step_id": "passes", "type": "workflow", "path": ["passes", 0]})
    progress(
        "step_started",
        {"step_id": "split", "type": "chunk", "path": ["passes", 0, "split"]},
    )
    progress(
        "step_finished",
        {"step_id": "piece", "status": "completed", "path": ["passes", 0, "piece", 2]},
    )
    assert out.getvalue().splitlines() == [
        "> passes (workflow)",
        "  > passes[0] (workflow)",
        "    > split (chunk)",
        "      < piece[2] completed",
    ]


# -- over HTTP: the summariser on the echo model --------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        workflows_dir=WORKFLOWS,
        startup_models=[{"model_path": "echo", "model_type": "echo"}],
        log_level="warning",
        rate_limit_enabled=False,
    )
    with (
        serve_app(create_app(settings)) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as http,
    ):
        yield http


def entry(body: dict[str, Any], step: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in body["execution_trace"] if e["step"] == step)
    return found


def test_the_summarisers_passes_and_pieces_are_in_the_stored_run(client: httpx.Client) -> None:
    document = " ".join(f"word{i}" for i in range(60))
    response = client.post(
        "/api/fusion/orchestrate",
        json={
            "workflow": "sequential_summarization",
            "input": {"document": document, "max_summary_length": 16},
            "config": {"piece_tokens": 20},
            "models": {"generation": "echo"},
        },
    )
    assert response.status_code == 200, response.text
    answered = response.json()
    assert answered["status"] == COMPLETED, answered
    fetched = client.get(f"/api/fusion/runs/{answered['workflow_id']}")
    assert fetched.status_code == 200, fetched.text
    stored = fetched.json()
    assert stored["execution_trace"] == answered["execution_trace"]
    passes = entry(stored, "passes")
    assert "path" not in passes  # a top-level step's entry is as before
    assert len(passes["children"]) == passes["iterations"] == stored["result"]["passes"]
    first = passes["children"][0]
    assert (first["step"], first["type"], first["path"], first["index"]) == (
        "passes",
        "workflow",
        ["passes", 0],
        0,
    )
    assert first["status"] == COMPLETED
    assert first["duration_ms"] is not None
    steps = {child["step"]: child for child in first["children"]}
    assert list(steps) == ["split", "summarize_piece", "joined", "length"]
    assert steps["split"]["path"] == ["passes", 0, "split"]
    pieces = steps["summarize_piece"]
    assert pieces["items"] == 3  # 60 words in pieces of 20 tokens
    assert [p["path"] for p in pieces["children"]] == [
        ["passes", 0, "summarize_piece", i] for i in range(3)
    ]
    assert all(p["model"] == "echo" and p["status"] == COMPLETED for p in pieces["children"])
    assert "children" not in steps["joined"]


def test_the_stream_sends_child_events_with_their_path(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/api/fusion/orchestrate",
        json={
            "workflow": "sequential_summarization",
            "input": {"document": "one two three four five", "max_summary_length": 16},
            "models": {"generation": "echo"},
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1][0] == "result"
    run_id = events[-1][1]["workflow_id"]
    assert all(data["run_id"] == run_id for _, data in events[:-1])
    started = [data.get("path") for name, data in events if name == "step_started"]
    assert started[:3] == [None, ["passes", 0], ["passes", 0, "split"]]
    assert ["passes", 0, "summarize_piece", 0] in started
    tokens = [data for name, data in events if name == "token"]
    assert tokens
    assert all(t["path"] == ["passes", 0, "summarize_piece", 0] for t in tokens)
    assert "".join(t["delta"] for t in tokens).split() == ["one", "two", "three", "four", "five"]


async def test_children_of_a_stopped_step_end_cancelled_not_running() -> None:
    result = await run(
        """
        id: stopped
        steps:
          - step_id: each
            type: workflow
            for_each: [0, 1]
            concurrency: 1
            timeout_s: 0.05
            workflow:
              steps:
                - {step_id: wait, type: hang}
                - {step_id: after, type: template, value: "{{ steps.wait.output }}"}
        """
    )
    each = trace(result)["each"]
    assert each.status == FAILED
    first, second = kids(each)
    assert (first.status, first.error) == (FAILED, "timed out after 0.05s")
    assert [(c.path, c.status) for c in kids(first)] == [
        (["each", 0, "wait"], "cancelled"),
        (["each", 0, "after"], "cancelled"),
    ]
    assert second.status == "cancelled"  # never started: its sibling failed the step
