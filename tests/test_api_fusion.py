"""Fusion Orchestration API (spec §3) end to end: a real server (uvicorn on loopback) with
tiny MLX models loaded at start-up and test workflows made of `template` steps, called
over HTTP."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from serverutil import RunningServer, serve_app
from spec_examples import COMPOSE_EXAMPLE

from engine.config import Settings
from engine.steps.base import StepContext, StepPlugin
from engine.store import Store
from server.app import create_app

LM, LM_LONG, EMBED = "tiny-lm", "tiny-lm-long", "tiny-embed"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
RESPONSE_KEYS = {
    "workflow_id",
    "status",
    "result",
    "execution_trace",
    "total_latency_ms",
    "created_at",
    "completed_at",
}
TRACE_KEYS = {"step", "model", "status", "duration_ms", "attempts", "error"}

GREET = """
id: greet
name: Greeting
description: Greet someone, several times
models:
  generation: {type: lm}
  retrieval: {type: embeddings, optional: true}
input_schema:
  type: object
  properties:
    name: {type: string, minLength: 1}
    times: {type: integer, minimum: 1, default: 1}
    options:
      type: object
      properties:
        lang: {type: string, enum: [en, fr]}
  required: [name]
config: {greeting: Hello}
steps:
  - step_id: greet
    type: template
    value: "{{ config.greeting }}, {{ input.name }}!"
  - step_id: repeated
    type: template
    value: "{{ [steps.greet.output] * input.times }}"
output:
  text: "{{ steps.greet.output }}"
  all: "{{ steps.repeated.output }}"
  generation: "{{ models.generation }}"
  retrieval: "{{ models.retrieval }}"
"""

NEEDS_VISION = """
id: describe_image
name: Describe an image
models:
  vision: {type: multimodal}
steps:
  - step_id: describe
    type: template
    value: "{{ models.vision }}"
"""

SOMETIMES_FAILS = """
id: sometimes_fails
description: "`ok` always works; `risky` reads input.data.value, which may be missing"
input_schema:
  type: object
  properties:
    data: {type: object}
    tolerate: {type: boolean, default: true}
steps:
  - step_id: ok
    type: template
    value: fine
  - step_id: risky
    type: template
    value: "{{ input.data.value }}"
    on_error: continue
    default: fallback
    when: "{{ input.tolerate }}"
  - step_id: strict
    type: template
    value: "{{ input.data.value }}"
    when: "{{ not input.tolerate }}"
"""


def template_workflow(name: str, value: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}},
        "steps": [{"step_id": "say", "type": "template", "value": value}],
        **extra,
    }


class EmitTokens(StepPlugin):
    """Test-only: emits `token` events the way model_call's chat does, then outputs the text."""

    type_name = "test_emit_tokens"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"pieces": {"type": "array", "items": {"type": "string"}}},
        "required": ["pieces"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        for piece in params["pieces"]:
            ctx.emit("token", {"delta": piece})
        return "".join(params["pieces"])


class _StubModelCall(StepPlugin):
    """Stand-in used only while the real `model_call` plugin is not installed."""

    type_name = "model_call"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "model_id": {"type": "string"},
            "operation": {"enum": ["chat", "embed", "vision"]},
            "input": {},
        },
        "required": ["model_id", "operation", "input"],
    }


class _StubVectorSearch(StepPlugin):
    """Stand-in used only while the real `vector_search` plugin is not installed."""

    type_name = "vector_search"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "collection": {"type": "string"},
            "query_embedding": {"type": "array", "items": {"type": "number"}},
            "top_k": {"type": "integer", "minimum": 1},
        },
        "required": ["collection"],
    }


def write_workflows(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "greet.yaml").write_text(GREET)
    (directory / "describe_image.yaml").write_text(NEEDS_VISION)
    (directory / "sometimes_fails.yaml").write_text(SOMETIMES_FAILS)
    return directory


def settings(data_dir: Path, startup_models: list[dict[str, Any]]) -> Settings:
    return Settings(
        data_dir=data_dir,
        workflows_dir=write_workflows(data_dir / "workflows"),
        startup_models=startup_models,
        log_level="warning",
        # The module makes more requests than one client may in a minute.
        rate_limit_enabled=False,
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> Iterator[RunningServer]:
    models = [
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM},
        {
            "model_path": str(tiny_lm_dir),
            "model_type": "lm",
            "model_id": LM_LONG,
            "context_length": 32768,
        },
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED},
    ]
    app = create_app(settings(tmp_path_factory.mktemp("fusion-api"), models))
    with serve_app(app) as running:
        running.app.state.engine.steps.register(EmitTokens)
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, error
    return error


def orchestrate(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/api/fusion/orchestrate", json=body)


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    """(event, JSON data) pairs of a server-sent event stream."""
    events: list[tuple[str, Any]] = []
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name or "message", json.loads(line[len("data: ") :])))
            name = None
    return events


# -- orchestrate -------------------------------------------------------------------------------
def test_orchestrate_returns_the_spec_body(client: httpx.Client) -> None:
    response = orchestrate(client, workflow="greet", input={"name": "Ada", "times": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= RESPONSE_KEYS
    assert re.fullmatch(r"wf-[0-9a-f]{12}", body["workflow_id"])
    assert body["status"] == "completed"
    assert body["error"] is None
    assert body["workflow"] == "greet"
    assert body["workflow_source"] == "predefined"
    # A required role not given is filled with a loaded model of its type; an optional
    # one stays off unless the caller names a model (docs/decisions.md).
    assert body["models"]["generation"] in (LM, LM_LONG)
    assert body["models"]["retrieval"] is None
    assert body["result"] == {
        "text": "Hello, Ada!",
        "all": ["Hello, Ada!", "Hello, Ada!"],
        "generation": body["models"]["generation"],
        "retrieval": None,
    }
    trace = body["execution_trace"]
    assert [t["step"] for t in trace] == ["greet", "repeated"]
    for entry in trace:
        assert set(entry) >= TRACE_KEYS
        assert entry["status"] == "completed"
        assert entry["attempts"] == 1
        assert entry["error"] is None
        assert entry["model"] is None  # template steps call no model
        assert entry["duration_ms"] >= 0
    assert body["total_latency_ms"] >= 0
    assert ISO.match(body["created_at"])
    assert ISO.match(body["completed_at"])
    assert body["created_at"] <= body["completed_at"]


def test_config_overrides_the_workflows_defaults(client: httpx.Client) -> None:
    body = orchestrate(
        client, workflow="greet", input={"name": "Ada"}, config={"greeting": "Hi"}
    ).json()
    assert body["result"]["text"] == "Hi, Ada!"
    assert body["result"]["all"] == ["Hi, Ada!"]  # times defaulted to 1


@pytest.mark.parametrize(
    ("input_", "param"),
    [
        ({}, "input/name"),
        ({"name": ""}, "input/name"),
        ({"name": "Ada", "times": 0}, "input/times"),
        ({"name": "Ada", "options": {"lang": "de"}}, "input/options/lang"),
    ],
)
def test_invalid_input_is_a_400_naming_the_pointer(
    client: httpx.Client, input_: dict[str, Any], param: str
) -> None:
    error = error_of(orchestrate(client, workflow="greet", input=input_), 400, "invalid_input")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(param)


def test_bad_request_shapes_are_400(client: httpx.Client) -> None:
    error = error_of(orchestrate(client, workflow="greet", input=3), 400, "invalid_request")
    assert error["param"] == "input"
    error = error_of(client.post("/api/fusion/orchestrate", json={}), 400, "invalid_request")
    assert error["param"] == "workflow"
    error = error_of(
        orchestrate(client, workflow="greet", input={"name": "A"}, inputs={}),
        400,
        "invalid_request",
    )


def test_unknown_workflow_is_404_invalid_workflow(client: httpx.Client) -> None:
    error = error_of(orchestrate(client, workflow="nope", input={}), 404, "invalid_workflow")
    assert error["type"] == "not_found_error"
    assert "nope" in error["message"]


def test_required_role_without_a_loaded_model_is_503(client: httpx.Client) -> None:
    error = error_of(
        orchestrate(client, workflow="describe_image", input={}), 503, "model_not_loaded"
    )
    assert error["type"] == "service_unavailable_error"
    assert "'vision'" in error["message"]
    assert "'multimodal'" in error["message"]
    assert error["param"] == "models.vision"


def test_explicit_models_override_the_automatic_choice(client: httpx.Client) -> None:
    for chosen in (LM, LM_LONG):
        body = orchestrate(
            client, workflow="greet", input={"name": "Ada"}, models={"generation": chosen}
        ).json()
        assert body["models"]["generation"] == chosen
        assert body["result"]["generation"] == chosen
    # an optional role is on only when named; null leaves it off
    body = orchestrate(
        client, workflow="greet", input={"name": "Ada"}, models={"retrieval": EMBED}
    ).json()
    assert body["models"]["retrieval"] == EMBED
    assert body["result"]["retrieval"] == EMBED
    body = orchestrate(
        client, workflow="greet", input={"name": "Ada"}, models={"retrieval": None}
    ).json()
    assert body["models"]["retrieval"] is None


def test_explicit_model_errors(client: httpx.Client) -> None:
    error = error_of(
        orchestrate(client, workflow="greet", input={"name": "A"}, models={"generation": "ghost"}),
        404,
        "model_not_found",
    )
    assert error["type"] == "not_found_error"
    assert "ghost" in error["message"]
    assert "'generation'" in error["message"]
    assert error["param"] == "models.generation"
    error = error_of(
        orchestrate(client, workflow="greet", input={"name": "A"}, models={"generation": EMBED}),
        400,
        "wrong_model_type",
    )
    assert error["param"] == "models.generation"
    error = error_of(
        orchestrate(client, workflow="greet", input={"name": "A"}, models={"rerank": LM}),
        400,
        "invalid_request",
    )
    assert error["param"] == "models.rerank"
    assert "generation, retrieval" in error["message"]


def test_failed_and_partial_runs_are_200_with_their_status(client: httpx.Client) -> None:
    body = orchestrate(client, workflow="sometimes_fails", input={}).json()
    assert body["status"] == "partial"
    steps = {t["step"]: t for t in body["execution_trace"]}
    assert steps["ok"]["status"] == "completed"
    assert steps["risky"]["status"] == "failed"
    assert "data" in steps["risky"]["error"]
    assert steps["strict"]["status"] == "skipped"
    assert body["result"] == {"ok": "fine", "risky": "fallback", "strict": None}

    response = orchestrate(client, workflow="sometimes_fails", input={"tolerate": False})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed"
    assert body["result"] is None
    assert "strict" in body["error"]
    stored = client.get(f"/api/fusion/runs/{body['workflow_id']}").json()
    assert stored["status"] == "failed"
    assert stored["error"] == body["error"]


# -- custom (inline) workflows -----------------------------------------------------------------
def test_custom_workflow_runs_the_definition_in_the_request(client: httpx.Client) -> None:
    definition = {
        "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "steps": [
            {"step_id": "double", "type": "template", "value": "{{ input.n * 2 }}"},
            {
                "step_id": "greet",
                "type": "workflow",
                "workflow": "greet",
                "input": {"name": "n={{ steps.double.output }}"},
            },
        ],
        "models": {"generation": {"type": "lm"}},
    }
    response = orchestrate(client, workflow="custom", definition=definition, input={"n": 21})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert body["workflow"] == "custom"
    assert body["workflow_source"] == "inline"
    assert body["result"]["greet"]["text"] == "Hello, n=42!"
    stored = client.get(f"/api/fusion/runs/{body['workflow_id']}").json()
    assert stored["definition"] == definition
    assert stored["input"] == {"n": 21}

    error = error_of(
        orchestrate(client, workflow="custom", definition=definition, input={"n": "x"}),
        400,
        "invalid_input",
    )
    assert error["param"] == "input/n"


def test_custom_workflow_errors(client: httpx.Client) -> None:
    error = error_of(orchestrate(client, workflow="custom", input={}), 400, "invalid_workflow")
    assert error["param"] == "definition"
    bad = {
        "steps": [
            {"step_id": "a", "type": "nonesuch"},
            {"step_id": "b", "type": "template", "value": "{{ steps.zzz.output }}"},
        ]
    }
    error = error_of(
        orchestrate(client, workflow="custom", definition=bad, input={}), 400, "invalid_workflow"
    )
    pointers = [d["path"] for d in error["details"]]
    assert "/definition/steps/0/type" in pointers
    assert "/definition/steps/1/value" in pointers
    error = error_of(
        orchestrate(client, workflow="greet", definition=bad, input={}), 400, "invalid_request"
    )
    assert error["param"] == "definition"


# -- runs ----------------------------------------------------------------------------------
def test_runs_are_stored_and_fetched(client: httpx.Client) -> None:
    body = orchestrate(
        client, workflow="greet", input={"name": "Bo"}, config={"greeting": "Hey"}
    ).json()
    response = client.get(f"/api/fusion/runs/{body['workflow_id']}")
    assert response.status_code == 200, response.text
    stored = response.json()
    for key in (*RESPONSE_KEYS, "workflow", "workflow_version", "models", "error"):
        assert stored[key] == body[key], key
    assert stored["input"] == {"name": "Bo"}  # as sent; defaults are filled at run time
    assert stored["config"] == {"greeting": "Hey"}
    error = error_of(client.get("/api/fusion/runs/wf-000000000000"), 404, "run_not_found")
    assert error["type"] == "not_found_error"


def test_a_run_waits_for_a_locked_database_without_blocking_the_server(
    server: RunningServer, client: httpx.Client
) -> None:
    # Another connection (as a RAG ingest would) holds SQLite's write lock.
    other = Store(server.app.state.engine.store.path)
    conn = other.connection()
    conn.execute("BEGIN IMMEDIATE")
    answered: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: answered.append(
            orchestrate(client, workflow="greet", input={"name": "Locked"})
        )
    )
    try:
        request.start()
        time.sleep(0.5)
        assert not answered  # the run is done, its row waits for the lock...
        assert client.get("/health").status_code == 200  # ...off the event loop
    finally:
        conn.execute("COMMIT")
        other.close()
    request.join(30)
    body = answered[0].json()
    assert body["result"]["text"] == "Hello, Locked!"
    assert client.get(f"/api/fusion/runs/{body['workflow_id']}").status_code == 200


# -- streaming -------------------------------------------------------------------------------
def test_stream_sends_step_events_then_the_result(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/api/fusion/orchestrate",
        json={"workflow": "greet", "input": {"name": "Ada", "times": 3}, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names == [
        "step_started",
        "step_finished",
        "step_started",
        "step_finished",
        "result",
    ]
    assert [data["step_id"] for _, data in events[:4]] == ["greet", "greet", "repeated", "repeated"]
    assert events[1][1]["status"] == "completed"
    result = events[-1][1]
    assert set(result) >= RESPONSE_KEYS
    assert result["result"]["all"] == ["Hello, Ada!"] * 3
    assert all(data["run_id"] == result["workflow_id"] for _, data in events[:4])
    stored = client.get(f"/api/fusion/runs/{result['workflow_id']}").json()
    assert stored["execution_trace"] == result["execution_trace"]


def test_stream_forwards_token_deltas(client: httpx.Client) -> None:
    definition = {
        "steps": [
            {"step_id": "chat", "type": "test_emit_tokens", "pieces": ["Hel", "lo", "!"]},
            {"step_id": "after", "type": "template", "value": "{{ steps.chat.output }}"},
        ]
    }
    with client.stream(
        "POST",
        "/api/fusion/orchestrate",
        json={"workflow": "custom", "definition": definition, "input": {}},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names == [
        "step_started",
        "token",
        "token",
        "token",
        "step_finished",
        "step_started",
        "step_finished",
        "result",
    ]
    deltas = [data["delta"] for name, data in events if name == "token"]
    assert deltas == ["Hel", "lo", "!"]
    assert all(data["step_id"] == "chat" for name, data in events if name == "token")
    assert events[-1][1]["result"] == {"after": "Hello!"}


def test_stream_forwards_model_call_chat_tokens(
    server: RunningServer, client: httpx.Client
) -> None:
    if server.app.state.engine.steps.get("model_call") is None:
        pytest.skip("the model_call step plugin is not installed")
    definition = {
        "models": {"generation": {"type": "lm"}},
        "input_schema": {"type": "object", "properties": {"seed": {"type": "integer"}}},
        "steps": [
            {
                "step_id": "answer",
                "type": "model_call",
                "model_id": "{{ models.generation }}",
                "operation": "chat",
                "input": {
                    "prompt": "Tell me a story.",
                    "max_tokens": 12,
                    "temperature": 1.0,
                    "seed": "{{ input.seed }}",
                },
            }
        ],
        "output": "{{ steps.answer.output.content }}",
    }
    # Random weights may end at once: try seeds until one generates text.
    for seed in range(10):
        with client.stream(
            "POST",
            "/api/fusion/orchestrate",
            json={
                "workflow": "custom",
                "definition": definition,
                "input": {"seed": seed},
                "models": {"generation": LM},
                "stream": True,
            },
        ) as response:
            assert response.status_code == 200
            events = sse_events(response)
        result = events[-1][1]
        assert events[-1][0] == "result"
        assert result["status"] == "completed", result
        deltas = [data["delta"] for name, data in events if name == "token"]
        assert "".join(deltas) == result["result"]
        assert result["execution_trace"][0]["model"] == LM
        if deltas:
            names = [name for name, _ in events]
            assert names[0] == "step_started"
            assert names[-2:] == ["step_finished", "result"]
            assert set(names[1:-2]) == {"token"}
            return
    pytest.fail("no seed made the tiny model generate text")


def test_stream_request_errors_keep_their_status(client: httpx.Client) -> None:
    error_of(orchestrate(client, workflow="nope", input={}, stream=True), 404, "invalid_workflow")
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "greet", "input": {}},
        headers={"Accept": "text/event-stream"},
    )
    assert error_of(response, 400, "invalid_input")["param"] == "input/name"
    # "stream": false wins over the Accept header
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "greet", "input": {"name": "A"}, "stream": False},
        headers={"Accept": "text/event-stream"},
    )
    assert response.headers["content-type"].startswith("application/json")


# -- workflows -------------------------------------------------------------------------------
def test_list_and_get_workflows(client: httpx.Client) -> None:
    response = client.get("/api/fusion/workflows")
    assert response.status_code == 200
    listed = {w["id"]: w for w in response.json()["workflows"]}
    greet = listed["greet"]
    assert greet == {
        "id": "greet",
        "name": "Greeting",
        "description": "Greet someone, several times",
        "required_models": ["lm"],
        "optional_models": ["retrieval"],
        "input_schema": greet["input_schema"],
        "source": "predefined",
        "version": None,
    }
    assert greet["input_schema"]["required"] == ["name"]
    assert listed["describe_image"]["required_models"] == ["multimodal"]

    detail = client.get("/api/fusion/workflows/greet").json()
    assert detail["source"] == "predefined"
    assert detail["definition"]["steps"][0]["step_id"] == "greet"
    assert detail["models"] == {
        "generation": {"type": "lm", "optional": False},
        "retrieval": {"type": "embeddings", "optional": True},
    }
    error_of(client.get("/api/fusion/workflows/nope"), 404, "invalid_workflow")


# -- compose ---------------------------------------------------------------------------------
def test_compose_the_spec_example_as_is(server: RunningServer, client: httpx.Client) -> None:
    steps = server.app.state.engine.steps
    # The real plugins when installed; otherwise stand-ins with the same parameters.
    for stub in (_StubModelCall, _StubVectorSearch):
        if steps.get(stub.type_name) is None:
            steps.register(stub)
    response = client.post("/api/fusion/compose", json=COMPOSE_EXAMPLE)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["workflow_id"] == "custom_rag_workflow"
    assert body["name"] == "custom_rag_workflow"
    assert body["status"] == "created"
    assert body["version"] == 1
    assert ISO.match(body["created_at"])

    listed = {w["id"]: w for w in client.get("/api/fusion/workflows").json()["workflows"]}
    entry = listed["custom_rag_workflow"]
    assert entry["source"] == "custom"
    assert entry["version"] == 1
    assert entry["description"] == "Custom RAG workflow with specific models"
    detail = client.get("/api/fusion/workflows/custom_rag_workflow").json()
    assert detail["definition"]["steps"] == COMPOSE_EXAMPLE["steps"]
    assert detail["created_at"] == body["created_at"]


def test_compose_reports_every_error_with_its_pointer(client: httpx.Client) -> None:
    body = {
        "name": "has errors",
        "colour": "blue",
        "steps": [
            {"step_id": "a", "type": "templat", "value": 1},
            {"step_id": "b", "type": "template", "value": "{{ steps.missing.output }}"},
            {"step_id": "b", "type": "template", "value": "{{ models.gen }}"},
            {"step_id": "c", "type": "template"},
            {"step_id": "d", "type": "template", "value": "{{ oops( }}"},
        ],
    }
    response = client.post("/api/fusion/compose", json=body)
    error = error_of(response, 400, "invalid_workflow")
    pointers = {d["path"] for d in error["details"]}
    assert pointers >= {
        "/name",
        "/colour",
        "/steps/0/type",
        "/steps/1/value",
        "/steps/2/step_id",
        "/steps/2/value",
        "/steps/3",
        "/steps/4/value",
    }, error["details"]
    assert "(and " in error["message"]
    # Nothing was stored.
    error_of(client.get("/api/fusion/workflows/has errors"), 404, "invalid_workflow")


def test_compose_refuses_reserved_and_missing_names(client: httpx.Client) -> None:
    error = error_of(
        client.post("/api/fusion/compose", json=template_workflow("custom", "x")),
        400,
        "invalid_workflow",
    )
    assert error["param"] == "/name"
    body = template_workflow("unnamed", "x")
    del body["name"]
    error = error_of(client.post("/api/fusion/compose", json=body), 400, "invalid_workflow")
    assert "name" in error["message"]
    error_of(client.post("/api/fusion/compose", json=[1]), 400, "invalid_request")


def test_compose_with_a_predefined_name_is_409(client: httpx.Client) -> None:
    response = client.post("/api/fusion/compose", json=template_workflow("greet", "x"))
    error = error_of(response, 409, "workflow_exists")
    assert error["type"] == "conflict_error"
    # The predefined workflow is untouched.
    assert client.get("/api/fusion/workflows/greet").json()["source"] == "predefined"


def test_composing_again_stores_a_new_version_and_runs_record_it(client: httpx.Client) -> None:
    first = client.post(
        "/api/fusion/compose", json=template_workflow("versioned", "v1 {{ input.who }}")
    )
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1
    run1 = orchestrate(client, workflow="versioned", input={"who": "Ada"}).json()
    assert run1["result"] == {"say": "v1 Ada"}
    assert run1["workflow_version"] == 1
    assert run1["workflow_source"] == "custom"

    second = client.post(
        "/api/fusion/compose", json=template_workflow("versioned", "v2 {{ input.who }}")
    )
    assert second.status_code == 201
    assert second.json()["version"] == 2
    run2 = orchestrate(client, workflow="versioned", input={"who": "Ada"}).json()
    assert run2["result"] == {"say": "v2 Ada"}
    assert run2["workflow_version"] == 2
    assert client.get(f"/api/fusion/runs/{run1['workflow_id']}").json()["workflow_version"] == 1
    assert client.get(f"/api/fusion/runs/{run2['workflow_id']}").json()["workflow_version"] == 2
    detail = client.get("/api/fusion/workflows/versioned").json()
    assert detail["version"] == 2
    assert detail["definition"]["version"] == 2


def test_delete_a_composed_workflow(client: httpx.Client) -> None:
    assert (
        client.post("/api/fusion/compose", json=template_workflow("doomed", "x")).status_code == 201
    )
    caller = {
        "name": "doomed_caller",
        "steps": [{"step_id": "call", "type": "workflow", "workflow": "doomed", "input": {}}],
    }
    assert client.post("/api/fusion/compose", json=caller).status_code == 201
    assert orchestrate(client, workflow="doomed_caller", input={}).json()["result"] == {
        "call": {"say": "x"}
    }
    error = error_of(client.delete("/api/fusion/workflows/doomed"), 409, "workflow_in_use")
    assert "doomed_caller" in error["message"]

    response = client.delete("/api/fusion/workflows/doomed_caller")
    assert response.status_code == 200, response.text
    assert response.json() == {"workflow_id": "doomed_caller", "status": "deleted", "version": 1}
    response = client.delete("/api/fusion/workflows/doomed")
    assert response.status_code == 200
    error_of(client.get("/api/fusion/workflows/doomed"), 404, "invalid_workflow")
    error_of(orchestrate(client, workflow="doomed", input={}), 404, "invalid_workflow")
    ids = {w["id"] for w in client.get("/api/fusion/workflows").json()["workflows"]}
    assert "doomed" not in ids
    error_of(client.delete("/api/fusion/workflows/doomed"), 404, "invalid_workflow")
    error_of(client.delete("/api/fusion/workflows/greet"), 409, "workflow_predefined")
    # A name composed again after a delete continues its numbering: versions are not reused.
    again = client.post("/api/fusion/compose", json=template_workflow("doomed", "y"))
    assert again.json()["version"] == 2


def test_composed_workflows_survive_a_restart(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, []))
    with serve_app(app) as running, httpx.Client(base_url=running.base_url, timeout=60) as c:
        for value in ("one", "two"):
            response = c.post("/api/fusion/compose", json=template_workflow("kept", value))
            assert response.status_code == 201
        c.post("/api/fusion/compose", json=template_workflow("removed", "gone"))
        assert c.delete("/api/fusion/workflows/removed").status_code == 200
        run = orchestrate(c, workflow="kept", input={}).json()
        assert run["result"] == {"say": "two"}
    app = create_app(settings(tmp_path, []))
    with serve_app(app) as running, httpx.Client(base_url=running.base_url, timeout=60) as c:
        listed = {w["id"]: w for w in c.get("/api/fusion/workflows").json()["workflows"]}
        assert listed["kept"]["version"] == 2
        assert listed["kept"]["source"] == "custom"
        assert "removed" not in listed
        again = orchestrate(c, workflow="kept", input={}).json()
        assert again["result"] == {"say": "two"}
        assert again["workflow_version"] == 2
        stored = c.get(f"/api/fusion/runs/{run['workflow_id']}").json()
        assert stored["result"] == {"say": "two"}
        assert stored["workflow_version"] == 2
        third = c.post("/api/fusion/compose", json=template_workflow("kept", "three"))
        assert third.json()["version"] == 3


# -- capabilities -----------------------------------------------------------------------------
def test_capabilities_of_the_loaded_models(client: httpx.Client) -> None:
    response = client.get("/api/fusion/capabilities")
    assert response.status_code == 200
    body = response.json()
    caps = body["capabilities"]
    assert caps["chat"] == [LM, LM_LONG]
    assert caps["tool_calling"] == [LM, LM_LONG]  # the tiny LM's chat template handles tools
    assert caps["long_context"] == [LM_LONG]
    assert caps["embeddings"] == [EMBED]
    assert caps["vision"] == []
    assert caps["image_generation"] == []
    models = {m["id"]: m for m in body["models"]}
    assert models[EMBED]["capabilities"] == ["embeddings"]
    assert models[EMBED]["context_length"] == 128
    assert models[LM]["capabilities"] == ["chat", "tool_calling"]
    assert models[LM_LONG]["context_length"] == 32768
    for model in models.values():
        assert model["status"] == "loaded"
        assert model["vram_usage_gb"] >= 0


def test_capabilities_filter(client: httpx.Client) -> None:
    body = client.get("/api/fusion/capabilities", params={"capability": "embeddings"}).json()
    assert body["capabilities"] == {"embeddings": [EMBED]}
    assert [m["id"] for m in body["models"]] == [EMBED]
    body = client.get("/api/fusion/capabilities", params={"capability": "long_context"}).json()
    assert [m["id"] for m in body["models"]] == [LM_LONG]
    body = client.get("/api/fusion/capabilities", params={"capability": "image-generation"}).json()
    assert body == {"capabilities": {"image_generation": []}, "models": []}
    error = error_of(
        client.get("/api/fusion/capabilities", params={"capability": "telepathy"}),
        400,
        "invalid_capability",
    )
    assert error["param"] == "capability"
    assert "chat" in error["message"]
    assert "long_context" in error["message"]


def test_health_reports_fusion_enabled(client: httpx.Client) -> None:
    assert client.get("/health").json()["services"]["fusion_enabled"] is True
