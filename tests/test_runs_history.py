"""The run history (`GET /api/fusion/runs`), retention by age and truncated inputs and
outputs, end to end: a real server on a real SQLite file, runs made through orchestrate
with template-only workflows (no model)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server, wait_for
from manual_clock import Clock

from engine.clock import utc_iso
from engine.fusion.run_history import RunHistory
from engine.store import Store

ALPHA = """
id: alpha
steps:
  - step_id: one
    type: template
    value: "1"
  - step_id: two
    type: template
    value: "{{ steps.one.output }}2"
"""

# `boom` reads input.data.value: it fails when asked to run (input.fail) without data.
BETA = """
id: beta
input_schema:
  type: object
  properties:
    fail: {type: boolean, default: false}
steps:
  - step_id: ok
    type: template
    value: fine
  - step_id: boom
    type: template
    value: "{{ input.data.value }}"
    when: "{{ input.fail }}"
"""

FIELD_BYTES = 2000  # runs_max_field_bytes of the module's server
SUMMARY_KEYS = {
    "workflow_id",
    "workflow",
    "workflow_version",
    "status",
    "created_at",
    "completed_at",
    "total_latency_ms",
    "error",
    "steps",
}


def write_workflows(data_dir: Path) -> None:
    directory = data_dir / "wf"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "alpha.yaml").write_text(ALPHA)
    (directory / "beta.yaml").write_text(BETA)


def run(client: httpx.Client, workflow: str, **body: Any) -> dict[str, Any]:
    response = client.post("/api/fusion/orchestrate", json={"workflow": workflow, **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["stored"] is True, answer
    return answer


def listing(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/api/fusion/runs", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ids(body: dict[str, Any]) -> list[str]:
    return [summary["workflow_id"] for summary in body["runs"]]


def error_param(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    param: str = error["param"]
    return param


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("runs-history")
    write_workflows(directory)
    return directory


@pytest.fixture(scope="module")
def client(data_dir: Path) -> Iterator[httpx.Client]:
    with running_server(data_dir, runs_max_field_bytes=FIELD_BYTES) as c:
        yield c


@pytest.fixture(scope="module")
def made(client: httpx.Client) -> list[dict[str, Any]]:
    """The module's runs, oldest first: alpha, beta, alpha, beta (failed), alpha."""
    return [
        run(client, "alpha"),
        run(client, "beta"),
        run(client, "alpha"),
        run(client, "beta", input={"fail": True}),
        run(client, "alpha"),
    ]


def test_lists_runs_newest_first_with_their_summaries(
    client: httpx.Client, made: list[dict[str, Any]]
) -> None:
    body = listing(client)
    assert body["total"] == len(made)
    assert (body["limit"], body["offset"]) == (100, 0)
    assert ids(body) == [r["workflow_id"] for r in reversed(made)]
    by_id = {s["workflow_id"]: s for s in body["runs"]}
    for answer in made:
        summary = by_id[answer["workflow_id"]]
        assert set(summary) == SUMMARY_KEYS
        for key in SUMMARY_KEYS - {"steps"}:
            assert summary[key] == answer[key], key
    assert by_id[made[0]["workflow_id"]]["steps"] == {
        "total": 2,
        "completed": 2,
        "failed": 0,
        "skipped": 0,
        "running": 0,
    }
    assert by_id[made[1]["workflow_id"]]["steps"] == {
        "total": 2,
        "completed": 1,
        "failed": 0,
        "skipped": 1,
        "running": 0,
    }
    failed = by_id[made[3]["workflow_id"]]
    assert failed["status"] == "failed"
    assert failed["error"]
    assert failed["steps"] == {"total": 2, "completed": 1, "failed": 1, "skipped": 0, "running": 0}


def test_filters_by_workflow_status_and_time(
    client: httpx.Client, made: list[dict[str, Any]]
) -> None:
    newest_first = [r["workflow_id"] for r in reversed(made)]
    alphas = [r["workflow_id"] for r in reversed(made) if r["workflow"] == "alpha"]
    assert ids(listing(client, workflow="alpha")) == alphas
    assert listing(client, workflow="alpha")["total"] == 3
    assert listing(client, workflow="nonesuch") == {
        "runs": [],
        "total": 0,
        "limit": 100,
        "offset": 0,
    }

    assert ids(listing(client, status="failed")) == [made[3]["workflow_id"]]
    both = ids(listing(client, status="completed,failed"))
    assert both == newest_first
    assert ids(listing(client, status=["completed", "failed"])) == both
    assert listing(client, status="running,cancelled,partial")["total"] == 0
    assert ids(listing(client, workflow="beta", status="completed")) == [made[1]["workflow_id"]]

    # created_after is inclusive, created_before exclusive: a time splits the runs in two.
    pivot = made[2]["created_at"]
    after = ids(listing(client, created_after=pivot))
    before = ids(listing(client, created_before=pivot))
    assert sorted(after + before) == sorted(newest_first)
    assert made[2]["workflow_id"] in after
    expected_after = [r["workflow_id"] for r in reversed(made) if r["created_at"] >= pivot]
    assert after == expected_after
    # The same instant written with an offset, or without one (UTC), selects the same runs.
    as_offset = pivot.replace("Z", "+00:00")
    assert ids(listing(client, created_after=as_offset)) == after
    assert ids(listing(client, created_after=pivot.removesuffix("Z"))) == after
    assert listing(client, created_after=pivot, created_before=pivot)["total"] == 0
    assert listing(client, created_before="2000-01-01")["total"] == 0


def test_pages_cover_the_listing_once(client: httpx.Client, made: list[dict[str, Any]]) -> None:
    everything = ids(listing(client))
    pages = [listing(client, limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [p["total"] for p in pages] == [len(made)] * 3
    assert [p["limit"] for p in pages] == [2, 2, 2]
    assert [p["offset"] for p in pages] == [0, 2, 4]
    assert [run_id for page in pages for run_id in ids(page)] == everything
    beyond = listing(client, offset=50)
    assert beyond["runs"] == []
    assert beyond["total"] == len(made)
    assert ids(listing(client, limit=1000)) == everything


def test_sorts_by_each_column_both_ways(client: httpx.Client, made: list[dict[str, Any]]) -> None:
    newest_first = ids(listing(client))
    assert ids(listing(client, order="asc")) == newest_first[::-1]
    assert ids(listing(client, sort_by="created_at", order="desc")) == newest_first
    for column in ("completed_at", "total_latency_ms"):
        ascending = listing(client, sort_by=column, order="asc")["runs"]
        values = [s[column] for s in ascending]
        assert values == sorted(values), column
        descending = listing(client, sort_by=column, order="desc")["runs"]
        # Ties are broken by insertion order, in the same direction: desc is asc reversed.
        assert ids({"runs": descending}) == ids({"runs": ascending})[::-1], column


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"status": "done"}, "status"),
        ({"status": "completed,bogus"}, "status"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-13-01"}, "created_before"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"sort_by": "workflow"}, "sort_by"),
        ({"order": "up"}, "order"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    client: httpx.Client, params: dict[str, Any], param: str
) -> None:
    assert error_param(client.get("/api/fusion/runs", params=params)) == param


def test_openapi_describes_the_listing(client: httpx.Client) -> None:
    operation = client.get("/schema/openapi.json").json()["paths"]["/api/fusion/runs"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert names == {
        "workflow",
        "status",
        "created_after",
        "created_before",
        "limit",
        "offset",
        "sort_by",
        "order",
    }
    assert {"200", "400"} <= set(operation["responses"])


def test_large_input_and_output_are_stored_truncated(client: httpx.Client) -> None:
    definition = {
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "steps": [{"step_id": "echo", "type": "template", "value": "{{ input.text * 2 }}"}],
    }
    text = "€" * FIELD_BYTES  # 3 bytes each: the limit is in bytes
    answer = run(client, "custom", definition=definition, input={"text": text})
    assert answer["result"] == {"echo": text * 2}  # the caller gets the whole output

    stored = client.get(f"/api/fusion/runs/{answer['workflow_id']}").json()
    output_json = json.dumps({"echo": text * 2}, ensure_ascii=False, separators=(",", ":"))
    assert stored["result"] == {
        "$truncated": True,
        "bytes": len(output_json.encode()),
        "preview": output_json[:1000],
    }
    input_json = json.dumps({"text": text}, ensure_ascii=False, separators=(",", ":"))
    assert stored["input"] == {
        "$truncated": True,
        "bytes": len(input_json.encode()),
        "preview": input_json[:1000],
    }
    assert stored["status"] == "completed"
    assert stored["execution_trace"] == answer["execution_trace"]

    # Under the limit, both are stored as they are.
    small = run(client, "custom", definition=definition, input={"text": "ab"})
    stored = client.get(f"/api/fusion/runs/{small['workflow_id']}").json()
    assert (stored["input"], stored["result"]) == ({"text": "ab"}, {"echo": "abab"})


# -- retention ---------------------------------------------------------------------------------
def age(db_path: Path, run_id: str, days: float) -> None:
    """Make a stored run look `days` old, through the store (as a run stored then would)."""
    with Store(db_path) as store:
        store.query(
            "UPDATE runs SET created_at = ? WHERE id = ?",
            (utc_iso(time.time() - days * 86_400), run_id),
        )


def status_of(client: httpx.Client, run_id: str) -> int:
    return client.get(f"/api/fusion/runs/{run_id}").status_code


def test_old_runs_are_purged_at_start_and_periodically(tmp_path: Path) -> None:
    write_workflows(tmp_path)
    db_path = tmp_path / "fusion.sqlite3"
    with running_server(tmp_path) as client:  # the defaults: 30 days, hourly
        old, kept = run(client, "alpha")["workflow_id"], run(client, "alpha")["workflow_id"]
    age(db_path, old, days=2)
    age(db_path, kept, days=0.5)

    settings = {"runs_max_age_days": 1, "runs_purge_interval_s": 0.05}
    with running_server(tmp_path, **settings) as client:
        wait_for(lambda: status_of(client, old) == 404, what="the start-up purge")
        assert status_of(client, kept) == 200
        later = run(client, "beta")["workflow_id"]
        age(db_path, later, days=3)
        wait_for(lambda: status_of(client, later) == 404, what="a periodic purge")
        assert ids(listing(client)) == [kept]


def test_purge_deletes_in_batches_by_creation_time(tmp_path: Path) -> None:
    clock = Clock()
    write_workflows(tmp_path)
    with running_server(tmp_path) as client:
        made = [run(client, "alpha")["workflow_id"] for _ in range(7)]
    with Store(tmp_path / "fusion.sqlite3") as store:
        for i, run_id in enumerate(made):
            # Runs 0-4 are 10 days old by the test's clock, 5 and 6 one day old.
            days = 10 if i < 5 else 1
            store.query(
                "UPDATE runs SET created_at = ? WHERE id = ?",
                (utc_iso(clock.now - days * 86_400), run_id),
            )
        history = RunHistory(store, clock=clock)
        assert history.purge(5 * 86_400, batch=2) == 5
        assert history.purge(5 * 86_400, batch=2) == 0
        left = [row[0] for row in store.query("SELECT id FROM runs ORDER BY rowid")]
        assert left == made[5:]
        clock.advance(86_400)
        assert history.purge(86_400) == 2
