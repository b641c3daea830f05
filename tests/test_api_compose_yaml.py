"""POST /api/fusion/compose with a YAML body (issue #13), against a real server: the same
document as JSON composes the same workflow; syntax errors name line:column; the workflow
loader's limits (aliases, depth) hold; other media types are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import running_server

pytestmark = pytest.mark.e2e

# The text a workflow file holds, and the same document as JSON.
YAML_DOC = """\
name: hello
description: Says hello
input_schema:
  type: object
  properties:
    who: {type: string}
steps:
  - &first {step_id: greet, type: template, value: "Hello, {{ input.who }}"}
  - {<<: *first, step_id: say, value: "{{ steps.greet.output }}!"}
output: "{{ steps.say.output }}"
"""
JSON_DOC: dict[str, Any] = {
    "name": "hello",
    "description": "Says hello",
    "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}},
    "steps": [
        {"step_id": "greet", "type": "template", "value": "Hello, {{ input.who }}"},
        {"step_id": "say", "type": "template", "value": "{{ steps.greet.output }}!"},
    ],
    "output": "{{ steps.say.output }}",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(tmp_path_factory.mktemp("compose_yaml")) as served:
        yield served


def post_yaml(
    client: httpx.Client, text: str | bytes, media_type: str = "application/yaml"
) -> httpx.Response:
    body = text.encode() if isinstance(text, str) else text
    return client.post("/api/fusion/compose", content=body, headers={"content-type": media_type})


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert set(error) >= {"type", "message", "param", "code"}
    return error


def run(client: httpx.Client, wf_id: str) -> Any:
    response = client.post(
        "/api/fusion/orchestrate", json={"workflow": wf_id, "input": {"who": "Ada"}}
    )
    assert response.status_code == 200, response.text
    return response.json()["result"]


def test_a_yaml_body_composes_what_the_same_json_body_does(client: httpx.Client) -> None:
    first = client.post("/api/fusion/compose", json=JSON_DOC)
    assert first.status_code == 201, first.text
    json_definition = client.get("/api/fusion/workflows/hello").json()["definition"]
    assert run(client, "hello") == "Hello, Ada!"

    for media_type in ("application/yaml", "application/x-yaml", "text/yaml; charset=utf-8"):
        response = post_yaml(client, YAML_DOC, media_type)
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["workflow_id"], body["status"]) == ("hello", "created")
        detail = client.get("/api/fusion/workflows/hello").json()
        # Anchors and merge keys expanded: the stored document is the JSON one.
        assert detail["definition"] == {**json_definition, "version": body["version"]}
        assert detail["source"] == "custom"
        assert run(client, "hello") == "Hello, Ada!"


def test_an_invalid_yaml_document_gets_the_issues_a_json_one_does(client: httpx.Client) -> None:
    as_json = client.post(
        "/api/fusion/compose", json={**JSON_DOC, "name": "broken", "extra": 1, "steps": [{}]}
    )
    text = YAML_DOC.replace("name: hello", "name: broken\nextra: 1")
    steps = text[text.index("  - &first") : text.index("output: ")]
    as_yaml = post_yaml(client, text.replace(steps, "  - {}\n"))
    json_error = error_of(as_json, 400, "invalid_workflow")
    yaml_error = error_of(as_yaml, 400, "invalid_workflow")
    assert yaml_error == json_error


def test_a_yaml_syntax_error_is_a_400_naming_line_and_column(client: httpx.Client) -> None:
    error = error_of(
        post_yaml(client, "name: bad\nsteps:\n  - step_id: a\n  type: x\n"), 400, "invalid_workflow"
    )
    assert error["message"].startswith("body:4:3: YAML syntax error")
    (detail,) = error["details"]
    assert (detail["line"], detail["col"]) == (4, 3)

    error = error_of(post_yaml(client, "name: a: b\n"), 400, "invalid_workflow")
    assert error["message"].startswith("body:1:8: ")


def test_values_json_cannot_carry_are_converted_as_json_would_carry_them(
    client: httpx.Client,
) -> None:
    text = """\
name: dated
config: {when: 2024-05-01}
steps:
  - step_id: say
    type: template
    value: "{{ config.when }}"
output: "{{ steps.say.output }}"
"""
    assert post_yaml(client, text).status_code == 201
    definition = client.get("/api/fusion/workflows/dated").json()["definition"]
    assert definition["config"] == {"when": "2024-05-01"}
    assert run(client, "dated") == "2024-05-01"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(client: httpx.Client) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    bomb = "name: bomb\n" + "\n".join(lines) + "\nsteps: []\n"
    assert len(bomb) < 2_000
    error = error_of(post_yaml(client, bomb), 400, "invalid_workflow")
    assert "workflow_max_nodes" in error["message"]
    assert error["message"].startswith("body:")


def test_deep_nesting_and_oversized_yaml_are_refused(client: httpx.Client) -> None:
    deep = "name: deep\nsteps: []\nconfig: " + "[" * 100 + "]" * 100 + "\n"
    error = error_of(post_yaml(client, deep), 400, "invalid_workflow")
    assert "workflow_max_depth" in error["message"]
    big = "name: big\nsteps: []\ndescription: " + "x" * 1_100_000 + "\n"
    error = error_of(post_yaml(client, big), 400, "invalid_workflow")
    assert "workflow_max_bytes" in error["message"]


def test_yaml_that_is_not_a_workflow_document(client: httpx.Client) -> None:
    for text, what in (("- a\n- b\n", "not a list"), ("", "not empty"), ("hi\n", "not a str")):
        error = error_of(post_yaml(client, text), 400, "invalid_request")
        assert error["message"].endswith(what), error
    error = error_of(post_yaml(client, b"name: caf\xe9\n"), 400, "invalid_request")
    assert "UTF-8" in error["message"]


def test_json_bodies_behave_as_before_and_other_media_types_are_415(
    client: httpx.Client,
) -> None:
    error_of(client.post("/api/fusion/compose", json=[1]), 400, "invalid_request")
    malformed = client.post(
        "/api/fusion/compose", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    error_of(malformed, 400, "invalid_request")
    deep = json.dumps({"name": "deep", "steps": [], "config": json.loads("[" * 80 + "]" * 80)})
    too_deep = client.post(
        "/api/fusion/compose", content=deep, headers={"content-type": "application/json"}
    )
    error_of(too_deep, 400, "json_too_deep")
    for media_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = client.post(
            "/api/fusion/compose",
            content=YAML_DOC,
            headers={"content-type": media_type} if media_type else {},
        )
        error = error_of(response, 415, "unsupported_media_type")
        assert error["param"] == "Content-Type"


def test_openapi_shows_both_media_types(client: httpx.Client) -> None:
    schema = client.get("/schema/openapi.json").json()
    body = schema["paths"]["/api/fusion/compose"]["post"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"application/json", "application/yaml"}
