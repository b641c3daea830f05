"""The editor schema (schemas/workflow.schema.json) and the compose API's example body."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from spec_examples import COMPOSE_EXAMPLE

from engine.dsl.compiler import compile_document
from engine.dsl.discovery import files_to_check
from engine.dsl.issues import WorkflowInvalid
from engine.dsl.schema import STEP_KEYS, WORKFLOW_KEYS
from engine.dsl.source import from_object, load_file, load_text
from engine.steps.registry import StepRegistry, default_registry

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "workflow.schema.json"
TESTS = Path(__file__).parent / "workflows"
# workflows/ holds the shipped workflows (it may not exist yet in a fresh checkout).
EXAMPLES = files_to_check([d for d in (ROOT / "workflows", TESTS / "valid") if d.is_dir()])


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema)


def test_checked_in_schema_is_current(schema: dict[str, Any]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "schema"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert json.loads(out.stdout) == schema, (
        "schemas/workflow.schema.json is stale: run `make schema` and commit the result"
    )


def test_schema_is_valid_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    # Every installed step type has its branch, so editors complete its parameters.
    assert set(schema["$defs"]["step"]["properties"]["type"]["enum"]) == set(
        default_registry().names()
    )


def test_there_are_examples_to_check() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"kitchen_sink.yaml", "child_echo.yaml", "fan_out_fan_in.json"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_schema_accepts_example(path: Path, validator: Draft202012Validator) -> None:
    errors = [e.message for e in validator.iter_errors(load_file(path).data)]
    assert errors == []


def test_kitchen_sink_uses_every_dsl_key() -> None:
    """The valid examples are only a proof of the schema if they exercise every key."""
    data = load_file(TESTS / "valid" / "kitchen_sink.yaml").data
    assert set(WORKFLOW_KEYS) - {"$schema"} <= set(data)
    used = {key for step in data["steps"] for key in step}
    assert set(STEP_KEYS) <= used
    workflows = [s["workflow"] for s in data["steps"] if s["type"] == "workflow"]
    assert any(isinstance(w, str) for w in workflows)  # by id
    assert any(isinstance(w, dict) for w in workflows)  # inline


def _example() -> dict[str, Any]:
    return copy.deepcopy(load_file(TESTS / "valid" / "kitchen_sink.yaml").data)


def _messages(validator: Draft202012Validator, data: Any) -> str:
    return "\n".join(e.message for e in validator.iter_errors(data))


def test_schema_rejects_unknown_step_parameter(validator: Draft202012Validator) -> None:
    data = _example()
    data["steps"][0]["valeu"] = 1
    assert "'valeu' was unexpected" in _messages(validator, data)


def test_schema_rejects_unknown_step_type(validator: Draft202012Validator) -> None:
    data = _example()
    data["steps"][0]["type"] = "templat"
    assert "'templat' is not one of" in _messages(validator, data)


def test_schema_rejects_missing_required_parameter(validator: Draft202012Validator) -> None:
    data = _example()
    del data["steps"][0]["value"]
    assert "'value' is a required property" in _messages(validator, data)


@pytest.mark.parametrize(
    "name",
    [
        "schema_on_error_enum.yaml",
        "schema_timeout_type.yaml",
        "schema_nested_objects.yaml",
        "schema_header_keys.yaml",
        "steps_not_a_list.yaml",
        "empty_steps.yaml",
        "missing_steps.yaml",
        "unknown_top_level_key.yaml",
        "unknown_step_type.yaml",
        "unknown_parameter.yaml",
        "missing_required_parameter.yaml",
        "missing_step_id_and_type.yaml",
        "for_each_number.yaml",
    ],
)
def test_schema_rejects_what_the_validator_calls_a_schema_error(
    name: str, validator: Draft202012Validator
) -> None:
    """An editor flags these files too, before `fusion validate` runs."""
    data = load_file(TESTS / "invalid" / name).data
    assert list(validator.iter_errors(data)), f"the editor schema accepts {name}"


# -- the compose API's example body (spec §3.4) must load unchanged -------------------------


@pytest.fixture
def compose_registry() -> StepRegistry:
    """The installed step types: the built-in model_call and vector_search."""
    return default_registry()


def test_compose_example_compiles_as_is(compose_registry: StepRegistry) -> None:
    body = copy.deepcopy(COMPOSE_EXAMPLE)
    workflow = compile_document(from_object(body), compose_registry)
    assert body == COMPOSE_EXAMPLE  # compiling does not touch the caller's object
    assert workflow.id == "custom_rag_workflow"
    assert list(workflow.steps) == ["embed_query", "retrieve_docs", "generate_answer"]
    assert set(workflow.graph.edges) == {
        ("embed_query", "retrieve_docs"),
        ("retrieve_docs", "generate_answer"),
    }
    assert workflow.steps["embed_query"].deps == frozenset()
    assert workflow.steps["retrieve_docs"].deps == {"embed_query"}
    assert workflow.steps["generate_answer"].deps == {"retrieve_docs"}
    assert workflow.steps["retrieve_docs"].raw_params["top_k"] == 5


def test_compose_example_as_json_text_compiles(compose_registry: StepRegistry) -> None:
    doc = load_text(json.dumps(COMPOSE_EXAMPLE, indent=2), "compose.json")
    workflow = compile_document(doc, compose_registry)
    assert workflow.sinks() == ["generate_answer"]


def test_compose_example_not_registered_is_reported_by_pointer() -> None:
    """Without the step types, the body fails with issues located by JSON pointer."""
    registry = StepRegistry()
    with pytest.raises(WorkflowInvalid) as info:
        compile_document(from_object(COMPOSE_EXAMPLE), registry)
    pointers = [i.pointer for i in info.value.issues]
    assert pointers == ["/steps/0/type", "/steps/1/type", "/steps/2/type"]
    assert all(i.line is None for i in info.value.issues)


def test_compose_body_with_a_typo_names_the_pointer(compose_registry: StepRegistry) -> None:
    body = copy.deepcopy(COMPOSE_EXAMPLE)
    body["steps"][1]["top_kk"] = body["steps"][1].pop("top_k")
    body["steps"][2]["input"]["messages"][0]["content"] = "{{ steps.retrieve.output }}"
    with pytest.raises(WorkflowInvalid) as info:
        compile_document(from_object(body), compose_registry)
    got = {(i.pointer, i.message.split(" (")[0]) for i in info.value.issues}
    assert got == {
        ("/steps/1/top_kk", "unknown key 'top_kk' for step type 'vector_search'"),
        ("/steps/2/input/messages/0/content", "reference to unknown step 'retrieve'"),
    }
    assert info.value.param == "/steps/1/top_kk"


def test_editor_schema_accepts_the_compose_example(validator: Draft202012Validator) -> None:
    assert _messages(validator, COMPOSE_EXAMPLE) == ""
    body = copy.deepcopy(COMPOSE_EXAMPLE)
    body["steps"][1]["top_k"] = "five"
    assert "'five' is not valid under any of the given schemas" in _messages(validator, body)
