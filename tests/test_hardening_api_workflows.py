"""Issue #8, findings 2, 3 and 4 through HTTP: a workflow a caller brings (custom,
compose) cannot make the server fetch a schema, backtrack on a regex or burn a template
on the event loop; the answer is a clear 4xx or a failed step, and /health answers
promptly while the work runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server

from engine.dsl.source import load_text

HEALTH_PROMPT_S = 2.0


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


def health_time(client: httpx.Client) -> float:
    started = time.monotonic()
    response = client.get("/health")
    assert response.status_code == 200
    return time.monotonic() - started


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


def test_redos_pattern_answers_at_once(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}}
    body = {**custom(ECHO, schema), "input": {"q": "a" * 28 + "!"}}
    started = time.monotonic()
    response = client.post("/api/fusion/orchestrate", json=body)
    assert time.monotonic() - started < 2.0  # Python's re needed 12 s for this
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input/q"


def test_health_answers_while_a_template_burns(client: httpx.Client) -> None:
    body = custom('  - {step_id: s, type: template, value: "{{ (10**256**256**256) > 1 }}"}\n')
    answer: dict[str, Any] = {}

    def orchestrate() -> None:
        answer["response"] = client.post("/api/fusion/orchestrate", json=body)

    worker = threading.Thread(target=orchestrate)
    worker.start()
    try:
        timings = [health_time(client) for _ in range(5)]
    finally:
        worker.join(30)
    assert max(timings) < HEALTH_PROMPT_S
    response = answer["response"]
    assert response.status_code == 200
    run = response.json()
    assert run["status"] == "failed"
    assert "time budget of 3 s" in run["error"]
    assert health_time(client) < HEALTH_PROMPT_S


def test_memory_bomb_fails_the_step_and_the_server_lives(client: httpx.Client) -> None:
    body = custom(
        "  - {step_id: s, type: template, value: \"{{ (['x' * 1000000] * 500) | join }}\"}\n"
    )
    response = client.post("/api/fusion/orchestrate", json=body)
    assert response.status_code == 200
    assert "memory budget of 128 MB" in response.json()["error"]
    assert health_time(client) < HEALTH_PROMPT_S


def test_validate_cli_reports_remote_refs(tmp_path: Path) -> None:
    from engine.cli import main

    path = tmp_path / "wf.yaml"
    path.write_text(
        "id: w\ninput_schema:\n  type: object\n  properties:\n    q: {$ref: 'http://127.0.0.1:9/x'}\n"
        "steps:\n  - {step_id: s, type: template, value: 1}\n"
    )
    assert main(["validate", str(path)]) != 0
