"""A run's per-step inputs and outputs (issue #14): `GET /api/fusion/runs/{id}?include=io`
adds each trace entry's rendered `input` and `output` (children too), from memory while
the run runs and from the database once it has ended; stored with the run's end (each
value bounded by runs_max_field_bytes, the whole by runs_max_stored_bytes), deleted with
the run.

Runs are held open deterministically with tests/test_runs_live.py's `test_gate` step type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import wait_for
from gates import GATES
from serverutil import RunningServer
from test_runs_live import Orchestrate, gated, serving

from engine.fusion.run_history import RunHistory
from engine.fusion.runs import TRUNCATED, RunRequest, RunStore, StoredRun
from engine.runtime.trace import RunResult, StepRecord
from engine.store import Store

FIELD_BYTES = 4096  # runs_max_field_bytes of the test server
RECORD_BYTES = 65_536  # runs_max_stored_bytes of the test server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(
        tmp_path_factory.mktemp("runs-io"),
        runs_max_field_bytes=FIELD_BYTES,
        runs_max_stored_bytes=RECORD_BYTES,
    ) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def orchestrate(client: httpx.Client, definition: dict[str, Any], **input: Any) -> dict[str, Any]:
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "custom", "definition": definition, "input": input},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["stored"] is True, body
    return body


def run_io(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/api/fusion/runs/{run_id}", params={"include": "io"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def entries(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["step"]: entry for entry in body["execution_trace"]}


def stored_io(server: RunningServer, run_id: str) -> Any:
    ((io,),) = server.app.state.engine.store.query("SELECT io FROM runs WHERE id = ?", (run_id,))
    return io


TWO_STEPS = {
    "input_schema": {"type": "object", "properties": {"name": {"type": "string"}}},
    "steps": [
        {"step_id": "greet", "type": "template", "value": "hello {{ input.name }}"},
        {"step_id": "shout", "type": "template", "value": "{{ steps.greet.output | upper }}"},
    ],
    "output": "{{ steps.shout.output }}",
}


def test_include_io_on_an_ended_run_gives_each_steps_rendered_input_and_output(
    client: httpx.Client,
) -> None:
    done = orchestrate(client, TWO_STEPS, name="ada")
    run_id = done["workflow_id"]
    # Orchestrate's answer and the plain GET are as they were: no IO.
    plain = client.get(f"/api/fusion/runs/{run_id}").json()
    for body in (done, plain):
        assert all("input" not in e and "output" not in e for e in body["execution_trace"])
    body = run_io(client, run_id)
    steps = entries(body)
    assert steps["greet"]["input"] == {"value": "hello ada"}
    assert steps["greet"]["output"] == "hello ada"
    assert steps["shout"]["input"] == {"value": "HELLO ADA"}
    assert steps["shout"]["output"] == "HELLO ADA"
    assert "io_omitted" not in body
    # The rest of the body is the plain one.
    for entry in body["execution_trace"]:
        del entry["input"], entry["output"]
    assert body == plain


def test_include_io_on_a_running_run_answers_from_memory(
    server: RunningServer, client: httpx.Client
) -> None:
    run = Orchestrate(server, gated("io-live"))

    def waiting() -> bool:
        return entries(run_io(client, run.run_id))["wait"]["status"] == "running"

    wait_for(waiting, what="the gated step to run")
    body = run_io(client, run.run_id)
    assert body["status"] == "running"
    steps = entries(body)
    assert steps["first"]["input"] == {"value": "one"}
    assert steps["first"]["output"] == "one"
    assert steps["wait"]["input"] == {"gate": "io-live"}  # rendered, its step still running
    assert steps["wait"]["output"] is None
    assert steps["last"]["input"] is None
    assert steps["last"]["output"] is None
    # The running row's updates carry no IO: it is written with the run's end only.
    assert stored_io(server, run.run_id) is None

    GATES.open("io-live")
    assert run.body()["status"] == "completed"
    steps = entries(run_io(client, run.run_id))
    assert steps["wait"]["output"] == "io-live"
    assert steps["last"]["input"] == {"value": "io-live done"}
    assert steps["last"]["output"] == "io-live done"


def test_for_each_items_carry_their_own_input_and_output(client: httpx.Client) -> None:
    definition = {
        "steps": [
            {
                "step_id": "each",
                "type": "template",
                "for_each": "{{ ['a', 'b', 'c'] }}",
                "value": "{{ item }}{{ index }}",
            }
        ],
        "output": "{{ steps.each.output }}",
    }
    done = orchestrate(client, definition)
    (each,) = run_io(client, done["workflow_id"])["execution_trace"]
    assert each["input"] is None  # the items have the rendered parameters
    assert each["output"] == ["a0", "b1", "c2"]
    children = each["children"]
    assert [c["index"] for c in children] == [0, 1, 2]
    assert [c["input"] for c in children] == [{"value": "a0"}, {"value": "b1"}, {"value": "c2"}]
    assert [c["output"] for c in children] == ["a0", "b1", "c2"]


def test_a_value_over_the_field_limit_is_stored_as_the_truncation_marker(
    client: httpx.Client,
) -> None:
    definition = {
        "steps": [
            {"step_id": "big", "type": "template", "value": "{{ 'x' * 10000 }}"},
            {"step_id": "size", "type": "template", "value": "{{ steps.big.output | length }}"},
        ],
        "output": "{{ steps.size.output }}",
    }
    done = orchestrate(client, definition)
    steps = entries(run_io(client, done["workflow_id"]))
    marker = steps["big"]["output"]
    assert marker[TRUNCATED] is True
    assert marker["bytes"] == 10_002  # the JSON string, quotes included
    assert marker["preview"].startswith('"xxxx')
    assert steps["big"]["input"][TRUNCATED] is True  # its rendered parameter is as big
    assert steps["size"]["output"] == 10_000  # small values stay whole


def test_a_run_whose_io_exceeds_the_record_bound_is_stored_without_it(
    server: RunningServer, client: httpx.Client
) -> None:
    # 30 items of 3,000 bytes: each under the field limit, together over the record's.
    definition = {
        "steps": [
            {
                "step_id": "each",
                "type": "template",
                "for_each": "{{ range(30) | list }}",
                "value": "{{ 'y' * 3000 }}",
            },
            {"step_id": "count", "type": "template", "value": "{{ steps.each.output | length }}"},
        ],
        "output": "{{ steps.count.output }}",
    }
    done = orchestrate(client, definition)
    assert done["result"] == 30
    body = run_io(client, done["workflow_id"])
    assert body["status"] == "completed"
    assert "runs_max_stored_bytes" in body["io_omitted"]
    assert all("input" not in e and "output" not in e for e in body["execution_trace"])
    assert len(body["execution_trace"][0]["children"]) == 30  # the trace is whole
    assert stored_io(server, done["workflow_id"]).startswith('{"omitted":')


def test_an_unknown_include_is_400(client: httpx.Client) -> None:
    done = orchestrate(client, TWO_STEPS, name="bo")
    for include in ("inputs", "io,everything"):
        response = client.get(
            f"/api/fusion/runs/{done['workflow_id']}", params={"include": include}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "include"
        assert "io" in error["message"]
    # Repeated or comma-separated, a known value is fine.
    response = client.get(f"/api/fusion/runs/{done['workflow_id']}?include=io&include=io")
    assert response.status_code == 200, response.text


def test_include_io_on_an_unknown_run_is_404(client: httpx.Client) -> None:
    response = client.get("/api/fusion/runs/wf-nosuchrun", params={"include": "io"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "run_not_found"


# -- the store: IO goes with its run ---------------------------------------------------------
def _run(run_id: str, created_at: str) -> StoredRun:
    step = StepRecord("s", "template", status="completed", started_at=created_at)
    step.input, step.output = {"value": f"in {run_id}"}, f"out {run_id}"
    result = RunResult(
        run_id=run_id,
        workflow_id="wf",
        workflow_version=1,
        status="completed",
        output="x",
        trace=[step],
        created_at=created_at,
        completed_at=created_at,
        total_latency_ms=1.0,
    )
    return StoredRun(result, "inline", {}, RunRequest({}, None))


def _io_rows(store: Store) -> list[str]:
    return [run_id for (run_id,) in store.query("SELECT id FROM runs WHERE io IS NOT NULL")]


def test_purge_and_the_count_bound_remove_a_runs_io(tmp_path: Path) -> None:
    store = Store(tmp_path / "fusion.db")
    try:
        runs = RunStore(store, max_runs=2)
        runs.save(_run("wf-old", "2020-01-01T00:00:00.000Z"))
        runs.save(_run("wf-mid", "2020-01-02T00:00:00.000Z"))
        stored = runs.get("wf-mid", io=True)
        assert stored.io_omitted is None
        assert stored.result.trace[0].input == {"value": "in wf-mid"}
        assert stored.result.trace[0].output == "out wf-mid"
        assert runs.get("wf-mid").result.trace[0].output is None  # read without io
        runs.save(_run("wf-new", "2099-01-01T00:00:00.000Z"))  # over max_runs: wf-old goes
        assert sorted(_io_rows(store)) == ["wf-mid", "wf-new"]
        assert RunHistory(store).purge(86_400) == 1  # wf-mid is older than a day
        assert _io_rows(store) == ["wf-new"]
    finally:
        store.close()
