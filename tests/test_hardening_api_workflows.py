"""Issue #8, findings 2, 3 and 4 through HTTP: a workflow a caller brings (custom,
compose) cannot make the server fetch a schema, backtrack on a regex or burn a template
on the event loop; the answer is a clear 4xx or a failed step, and /health answers
while the work runs: it overtakes the bad request, whatever the machine's speed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server

from engine.dsl.input_schema import is_linear
from engine.dsl.source import load_text

WAIT_S = 60.0  # upper bound of any wait; only reached when something is wrong


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(
        tmp_path_factory.mktemp("hardening"), template_timeout_s=3.0, template_memory_mb=128
    ) as c:
        yield c


def custom(steps_yaml: str, input_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    definition = load_text(f"steps:\n{steps_yaml}").data
    if input_schema is not None:
        definition["input_schema"] = input_schema
    return {"workflow": "custom", "definition": definition}


ECHO = '  - {step_id: s, type: template, value: "{{ input }}"}\n'


def assert_healthy(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200


class RunStream:
    """POST a streaming orchestrate on a thread and collect its (event, data) pairs as they
    arrive, so the test can act while the run is known to be in progress."""

    def __init__(self, client: httpx.Client, body: dict[str, Any]) -> None:
        self.client = client
        self.body = {**body, "stream": True}
        self.events: list[tuple[str, Any]] = []
        self.step_started = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.client.stream("POST", "/api/fusion/orchestrate", json=self.body) as response:
                assert response.status_code == 200
                name = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: "):
                        self.events.append((name, json.loads(line[len("data: ") :])))
                        if name == "step_started":
                            self.step_started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished.set()

    def result(self) -> Any:
        self._thread.join(WAIT_S)
        assert self.finished.is_set(), "the run did not end"
        assert self.error is None, self.error
        return next(data for name, data in self.events if name == "result")


def test_remote_ref_is_refused_without_contacting_it(client: httpx.Client) -> None:
    body = custom(ECHO, {"type": "object", "$ref": "http://127.0.0.1:9/schema.json"})
    response = client.post("/api/fusion/orchestrate", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_workflow"
    assert "only local references" in error["message"]
    assert error["param"] == "/definition/input_schema/$ref"


def test_file_refs_answer_alike_whether_the_file_exists_or_not(client: httpx.Client) -> None:
    """No existence oracle: /etc/passwd and a missing file give the same answer."""
    answers = []
    for ref in ("file:///etc/passwd", "file:///no/such/file.json"):
        body = custom(ECHO, {"type": "object", "properties": {"q": {"$ref": ref}}})
        response = client.post("/api/fusion/orchestrate", json=body)
        error = response.json()["error"]
        answers.append((response.status_code, error["code"], error["param"]))
    assert (
        answers[0]
        == answers[1]
        == (
            400,
            "invalid_workflow",
            "/definition/input_schema/properties/q/$ref",
        )
    )


def test_compose_refuses_remote_refs(client: httpx.Client) -> None:
    definition = custom(ECHO, {"type": "object", "$ref": "https://example.com/s.json"})[
        "definition"
    ]
    response = client.post(
        "/api/fusion/compose", json={"name": "remote_ref", "description": "", **definition}
    )
    assert response.status_code == 400
    assert "only local references" in response.json()["error"]["message"]


def test_redos_pattern_answers_through_re2(client: httpx.Client) -> None:
    """Python's re needed 12 s for 28 a's and would need centuries for 5,000: it would hang
    the request (in-process) or end it by the schema budget with another message."""
    schema = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}}
    assert is_linear(schema)  # RE2 patterns validate in-process, with no budget needed
    body = {**custom(ECHO, schema), "input": {"q": "a" * 5000 + "!"}}
    response = client.post("/api/fusion/orchestrate", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input/q"
    assert "does not match" in error["message"]


def test_health_answers_while_a_template_burns(client: httpx.Client) -> None:
    """Ordering, not speed: /health answers between the bomb's step_started and the end of
    its run. A bomb on the event loop never ends by itself, so no /health could answer."""
    body = custom('  - {step_id: s, type: template, value: "{{ (10**256**256**256) > 1 }}"}\n')
    run = RunStream(client, body)
    assert run.step_started.wait(WAIT_S), run.error
    assert_healthy(client)
    assert not run.finished.is_set()  # /health overtook the burning run
    result = run.result()
    assert result["status"] == "failed"
    assert "time budget of 3 s" in result["error"]
    assert_healthy(client)


def test_memory_bomb_fails_the_step_and_the_server_lives(client: httpx.Client) -> None:
    body = custom(
        "  - {step_id: s, type: template, value: \"{{ (['x' * 1000000] * 500) | join }}\"}\n"
    )
    response = client.post("/api/fusion/orchestrate", json=body)
    assert response.status_code == 200
    assert "memory budget of 128 MB" in response.json()["error"]
    assert_healthy(client)


def test_validate_cli_reports_remote_refs(tmp_path: Path) -> None:
    from engine.cli import main

    path = tmp_path / "wf.yaml"
    path.write_text(
        "id: w\ninput_schema:\n  type: object\n  properties:\n    q: {$ref: 'http://127.0.0.1:9/x'}\n"
        "steps:\n  - {step_id: s, type: template, value: 1}\n"
    )
    assert main(["validate", str(path)]) != 0
