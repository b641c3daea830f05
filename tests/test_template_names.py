"""Unknown filters and tests are load-time errors (issue #13), and a template that fails
while it renders fails its step cleanly: through the real compiler, `fusion validate` and
`fusion run` in a subprocess, and a real server's compose, orchestrate (plain and
streamed) and stored runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server, sse_payloads
from cli_helpers import fusion

from engine.dsl.compiler import compile_document
from engine.dsl.issues import WorkflowInvalid
from engine.dsl.source import load_text
from engine.steps.registry import default_registry


def workflow_yaml(value: str) -> str:
    # The value sits on line 8 and its scalar starts in column 12.
    return f"""id: names
input_schema:
  type: object
  properties:
    items: {{type: array}}
steps:
  - step_id: broken
    value: {json.dumps(value)}
    type: template
"""


def compile_issues(text: str) -> list[Any]:
    with pytest.raises(WorkflowInvalid) as info:
        compile_document(load_text(text, file="names.yaml"), default_registry())
    return info.value.issues


# -- load time ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{{ input.items | lenght }}", "unknown filter 'lenght' (did you mean 'length'?)"),
        (
            "{% if input.items is sequense %}y{% endif %}",
            "unknown test 'sequense' (did you mean 'sequence'?)",
        ),
        ("{% filter uper %}x{% endfilter %}", "unknown filter 'uper' (did you mean 'upper'?)"),
        ("{{ input.items | map('uper') | list }}", "unknown filter 'uper' (did you mean 'upper'?)"),
        ("{{ input.items | select('od') | list }}", "unknown test 'od' (did you mean 'odd'?)"),
        (
            "{{ input.items | rejectattr('a', 'nosuchtest') | list }}",
            "unknown test 'nosuchtest'",
        ),
        ("{{ input.items | odd }}", "unknown filter 'odd': 'odd' is a test ('value is odd')"),
        (
            "{{ input.items is length }}",
            "unknown test 'length': 'length' is a filter ('value | length')",
        ),
        # Jinja itself would only fail here when the branch runs.
        ("{% if false %}{{ 1 | nosuchfilter }}{% endif %}", "unknown filter 'nosuchfilter'"),
        ("line one\n{{ 1 | nosuchfilter }}", "unknown filter 'nosuchfilter' (template line 2)"),
    ],
)
def test_an_unknown_filter_or_test_is_a_compile_error_at_its_value(
    value: str, message: str
) -> None:
    [issue] = compile_issues(workflow_yaml(value))
    assert (issue.file, issue.line, issue.col) == ("names.yaml", 8, 12)
    assert issue.message == message
    assert issue.text() == f"names.yaml:8:12: steps[0].value: {message}"


@pytest.mark.parametrize(
    "value",
    [
        "{{ input.items | map(attribute='name') | list }}",  # no filter name to check
        "{{ input.items | select('==', 1) | list }}",
        "{{ input.items | selectattr('a', 'defined') | list }}",
        "{{ 'upper' is filter }}",
    ],
)
def test_known_names_still_compile(value: str) -> None:
    doc = load_text(workflow_yaml(value), file="names.yaml")
    assert compile_document(doc, default_registry()).steps["broken"]


def test_fusion_validate_reports_the_unknown_filter_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "names.yaml"
    path.write_text(workflow_yaml("{{ input.items | lenght }}"), encoding="utf-8")
    result = fusion("validate", path, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"{path}:8:12: steps[0].value: unknown filter 'lenght' (did you mean 'length'?)"
        in result.stdout
    )


# -- the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(tmp_path_factory.mktemp("template_names")) as c:
        yield c


def definition(value: str) -> dict[str, Any]:
    return {
        "id": "breaks",
        "version": 1,
        "input_schema": {
            "type": "object",
            "properties": {"items": {"type": "array"}},
            "required": ["items"],
        },
        "steps": [{"step_id": "broken", "type": "template", "value": value}],
        "output": "{{ steps.broken.output }}",
    }


def test_compose_refuses_an_unknown_test_with_the_envelope(client: httpx.Client) -> None:
    response = client.post(
        "/api/fusion/compose", json=definition("{% if input.items is sequense %}y{% endif %}")
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_workflow"
    assert error["param"] == "/steps/0/value"
    [detail] = error["details"]
    assert detail["message"] == "unknown test 'sequense' (did you mean 'sequence'?)"


def test_orchestrate_refuses_an_inline_unknown_filter_before_running(client: httpx.Client) -> None:
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "custom", "definition": definition("{{ 1 | nosuchfilter }}")},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_workflow", "/definition/steps/0/value")


# Templates that load clean and fail only on the data they get: an error inside a filter
# (rendered in the sandbox: `sort` is not in the in-process subset), and a result with no
# JSON form (rendered in-process), which once crashed the run into a 500.
RUN_TIME = [
    ("{{ input.items | sort }}", "TypeError: '<' not supported"),
    ("{{ {(input.items[0], 2): 'x'} }}", "a mapping key must be a string or a number, not tuple"),
]
MIXED = {"items": [3, "a"]}


@pytest.mark.parametrize(("value", "error"), RUN_TIME)
def test_a_run_time_template_error_fails_the_step_and_the_run_is_stored(
    client: httpx.Client, value: str, error: str
) -> None:
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "custom", "definition": definition(value), "input": MIXED},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["stored"], body["result"]) == ("failed", True, None)
    [step] = body["execution_trace"]
    assert step["status"] == "failed"
    assert step["error"].startswith("parameters: ")
    assert error in step["error"]
    assert body["error"] == f"step 'broken' failed: {step['error']}"

    stored = client.get(f"/api/fusion/runs/{body['workflow_id']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["status"] == "failed"
    assert stored.json()["execution_trace"][0]["error"] == step["error"]


@pytest.mark.parametrize(("value", "error"), RUN_TIME)
def test_a_streamed_run_ends_with_the_failed_step_and_the_result(
    client: httpx.Client, value: str, error: str
) -> None:
    request = {"workflow": "custom", "definition": definition(value), "input": MIXED}
    with client.stream("POST", "/api/fusion/orchestrate", json={**request, "stream": True}) as s:
        assert s.status_code == 200
        lines = list(s.iter_lines())
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names == ["step_started", "step_finished", "result"]
    _, finished, result = sse_payloads(iter(lines))
    assert (finished["step_id"], finished["status"]) == ("broken", "failed")
    assert error in finished["error"]
    assert (result["status"], result["stored"]) == ("failed", True)
    assert client.get(f"/api/fusion/runs/{result['workflow_id']}").status_code == 200


@pytest.mark.parametrize(("value", "error"), RUN_TIME)
def test_fusion_run_prints_the_failed_run_without_a_traceback(
    tmp_path: Path, value: str, error: str
) -> None:
    path = tmp_path / "breaks.json"
    path.write_text(json.dumps(definition(value)), encoding="utf-8")
    result = fusion("run", path, "--input-json", json.dumps(MIXED), cwd=tmp_path)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 1, result.stderr
    run = json.loads(result.stdout)
    assert run["status"] == "failed"
    assert error in run["execution_trace"][0]["error"]
