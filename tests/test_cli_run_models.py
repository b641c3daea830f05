"""`fusion run` of workflows with model steps, in-process: the models a run uses are loaded
(a model directory, the fake `echo`, or a start-up model of fusion.yaml), only those, with
progress on stderr; the run prints the body POST /api/fusion/orchestrate answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from api_helpers import running_server
from cli_helpers import fusion

from engine.cli.common import resolve
from engine.config import Settings
from engine.runtime.local_models import calls_models, plan_models

WORKFLOW = """
id: drafting
models:
  generation: {type: lm}
  helper: {type: lm, optional: true}
input_schema:
  type: object
  properties: {topic: {type: string}}
  required: [topic]
steps:
  - step_id: draft
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input: {prompt: "{{ input.topic }}", max_tokens: 6}
  - step_id: size
    type: template
    value: "{{ steps.draft.output.content | length }}"
output:
  text: "{{ steps.draft.output.content }}"
  size: "{{ steps.size.output }}"
"""

# Calls `drafting` by id: the run needs an lm although this workflow declares no role.
CALLER = """
id: caller
steps:
  - step_id: inner
    type: workflow
    workflow: drafting
    input: {topic: "{{ input.topic }}"}
output: "{{ steps.inner.output }}"
"""


def _setup(tmp_path: Path, startup: list[dict[str, Any]] | None) -> Path:
    flows = tmp_path / "workflows"
    flows.mkdir(exist_ok=True)
    (flows / "drafting.yaml").write_text(WORKFLOW, encoding="utf-8")
    (flows / "caller.yaml").write_text(CALLER, encoding="utf-8")
    config = {"startup_models": startup, "data_dir": str(tmp_path / "data")}
    (tmp_path / "fusion.yaml").write_text(json.dumps(config), encoding="utf-8")
    return flows / "drafting.yaml"


def _body(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    body: dict[str, Any] = json.loads(proc.stdout)
    return body


def test_a_model_directory_is_loaded_as_its_role_type_and_runs_the_step(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    flow = _setup(tmp_path, [])
    proc = fusion(
        "run", flow, "--input", "topic=hi", "--model", f"generation={tiny_lm_dir}", cwd=tmp_path
    )
    body = _body(proc)
    assert body["status"] == "completed"
    model_id = tiny_lm_dir.name  # a directory's model id is its name
    assert body["models"] == {"generation": model_id, "helper": None}
    draft = body["execution_trace"][0]
    assert (draft["step"], draft["model"], draft["status"]) == ("draft", model_id, "completed")
    # Random weights: the text is noise, but the plumbing holds.
    assert isinstance(body["result"]["text"], str)
    assert body["result"]["size"] == len(body["result"]["text"])
    assert f"loaded '{model_id}' (lm)" in proc.stderr


def test_roles_not_given_are_filled_from_startup_models_of_the_types_needed_only(
    tmp_path: Path, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> None:
    flow = _setup(
        tmp_path,
        [
            {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": "emb"},
            {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": "tiny-chat"},
        ],
    )
    by_type = _body(fusion("run", flow, "--input", "topic=hi", cwd=tmp_path))
    assert by_type["models"]["generation"] == "tiny-chat"
    by_id = fusion(
        "run", flow, "--input", "topic=hi", "--model", "generation=tiny-chat", cwd=tmp_path
    )
    assert _body(by_id)["execution_trace"][0]["model"] == "tiny-chat"
    assert "loaded 'tiny-chat' (lm)" in by_id.stderr
    assert "emb" not in by_id.stderr  # no role needs embeddings: not loaded


def test_a_called_workflow_s_roles_are_planned_too(tmp_path: Path) -> None:
    lm = {"model_path": "/models/chat", "model_type": "lm", "model_id": "chat"}
    embedder = {"model_path": "/models/emb", "model_type": "embeddings", "model_id": "emb"}
    _setup(tmp_path, None)
    caller, catalog = resolve("caller", str(tmp_path / "workflows"))
    settings = Settings(data_dir=tmp_path, startup_models=[embedder, lm])
    plan = plan_models(caller, {}, catalog, {}, settings)
    assert [s.model_id for s in plan.specs()] == ["chat"]
    assert calls_models(caller, {}, catalog)
    assert not calls_models(caller, {"inner": "x"}, catalog)


def test_echo_runs_a_model_workflow_without_weights_deterministically(tmp_path: Path) -> None:
    flow = _setup(tmp_path, [])
    runs = [
        _body(
            fusion(
                "run",
                flow,
                "--input",
                "topic=one two three",
                "--model",
                "generation=echo",
                cwd=tmp_path,
            )
        )
        for _ in range(2)
    ]
    assert runs[0]["result"] == runs[1]["result"] == {"text": "one two three", "size": 13}
    assert runs[0]["models"]["generation"] == "echo"


def test_the_cli_prints_the_body_the_api_answers(tmp_path: Path) -> None:
    flow = _setup(tmp_path, [])
    cli = _body(
        fusion("run", flow, "--input", "topic=a b", "--model", "generation=echo", cwd=tmp_path)
    )
    echo = {"model_path": "echo", "model_type": "echo", "model_id": "echo"}
    with running_server(tmp_path / "server", startup_models=[echo]) as client:
        from engine.dsl.source import load_text

        response = client.post(
            "/api/fusion/orchestrate",
            json={
                "workflow": "custom",
                "definition": load_text(WORKFLOW).data,
                "input": {"topic": "a b"},
                "models": {"generation": "echo"},
            },
        )
    assert response.status_code == 200, response.text
    api = response.json()
    assert list(cli) == list(api)
    assert [list(e) for e in cli["execution_trace"]] == [list(e) for e in api["execution_trace"]]
    for field in ("status", "result", "workflow", "models", "error"):
        assert cli[field] == api[field], field


@pytest.mark.parametrize("value", ["echo", "nosuch"])
def test_a_role_the_workflow_lacks_is_refused_before_loading(tmp_path: Path, value: str) -> None:
    flow = _setup(tmp_path, [])
    proc = fusion("run", flow, "--input", "topic=x", "--model", f"generaton={value}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "(did you mean 'generation'?)" in proc.stderr
    assert "loading" not in proc.stderr
