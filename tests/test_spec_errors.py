"""Spec §7 as a black box: one real server (no model loaded, a job queue that takes no job),
and for each row of §7's table of error types a request to a real route that answers with
it, in the §7 envelope. The codes are §7's own where one fits (model_not_found, job_not_found,
collection_not_found, invalid_workflow, queue_full).

Elsewhere, in the topic's own module: 401 (test_auth.py), 429 rate_limit_exceeded
(test_ratelimit.py), 409 model_already_loaded, 429 queue_full of a model and 503
insufficient_vram (test_api_models.py), 413 of an upload (test_api_rag.py, test_api_audio.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
PREDEFINED = "sequential_summarization"
# A workflow that needs no model: a job of it is refused by the full queue and nothing else.
ECHO = {
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
    "steps": [{"step_id": "echo", "type": "template", "value": "{{ input.text }}"}],
    "output": {"echo": "{{ steps.echo.output }}"},
}
# Litestar's default cap on a JSON body (bytes).
JSON_BODY_LIMIT = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(
        tmp_path_factory.mktemp("spec_errors"), workflows_dir=WORKFLOWS, jobs_max_queued=0
    ) as client:
        yield client


def envelope(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"type", "message", "param", "code"} <= set(error), error
    assert (error["type"], error["code"]) == (type_, code), error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    return error


def test_the_spec_example_unknown_model(client: httpx.Client) -> None:
    """§7's example, with the type §7's table gives a 404 (the example says
    invalid_request_error; docs/api.md "Errors")."""
    response = client.get("/v1/models/nonexistent-model/info")
    error = envelope(response, 404, "not_found_error", "model_not_found")
    assert error["message"].lower() == "model 'nonexistent-model' not found"
    assert error["param"] == "model_id"


def test_400_invalid_request_error_names_the_field(client: httpx.Client) -> None:
    response = client.post("/v1/models/load", json={"model_type": "lm"})
    error = envelope(response, 400, "invalid_request_error", "invalid_request")
    assert error["param"] == "model_path"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/mcp/jobs/no-such-job", "job_not_found"),
        ("/api/rag/collections/no-such-collection", "collection_not_found"),
        ("/api/fusion/workflows/no-such-workflow", "invalid_workflow"),
    ],
)
def test_404_not_found_error_with_the_spec_code(client: httpx.Client, path: str, code: str) -> None:
    envelope(client.get(path), 404, "not_found_error", code)


def test_404_unknown_workflow_to_run_is_invalid_workflow(client: httpx.Client) -> None:
    response = client.post("/api/fusion/orchestrate", json={"workflow": "nope", "input": {}})
    error = envelope(response, 404, "not_found_error", "invalid_workflow")
    assert error["param"] == "workflow"


def test_409_conflict_error(client: httpx.Client) -> None:
    name = PREDEFINED
    response = client.delete(f"/api/fusion/workflows/{name}")
    envelope(response, 409, "conflict_error", "workflow_predefined")


def test_413_payload_too_large_error(client: httpx.Client) -> None:
    body = b'{"model": "m", "input": "' + b"x" * JSON_BODY_LIMIT + b'"}'
    response = client.post(
        "/v1/embeddings", content=body, headers={"Content-Type": "application/json"}
    )
    envelope(response, 413, "payload_too_large_error", "payload_too_large")


def test_429_rate_limit_error_queue_full(client: httpx.Client) -> None:
    response = client.post(
        "/api/mcp/jobs",
        json={
            "operation": "workflow",
            "input": {"workflow": "custom", "definition": ECHO, "input": {"text": "hi"}},
        },
    )
    envelope(response, 429, "rate_limit_error", "queue_full")
    assert int(response.headers["retry-after"]) >= 1


def test_503_service_unavailable_error(client: httpx.Client) -> None:
    response = client.post(
        "/api/rag/ingest",
        data={"collection": "notes"},
        files=[("files", ("notes.txt", b"Lighthouses guide ships.", "text/plain"))],
    )
    error = envelope(response, 503, "service_unavailable_error", "model_not_loaded")
    assert error["param"] == "embedding_model"
