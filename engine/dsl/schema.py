"""JSON Schemas of the DSL: the keys every step has, the workflow document, and the full
editor schema generated from the step-type registry (``fusion schema``)."""

from __future__ import annotations

import copy
from typing import Any

from engine.models.types import ModelType
from engine.steps.registry import StepRegistry

SCHEMA_ID = "https://fusion.local/schemas/workflow.schema.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
IDENTIFIER = "^[A-Za-z_][A-Za-z0-9_]*$"
OUTPUT_KEYWORD = "x-output-schema"
TEMPLATE: dict[str, Any] = {
    "type": "string",
    "pattern": r"\{\{|\{%",
    "description": "A Jinja template; exactly one {{ expression }} keeps its native type.",
}

STEP_KEYS: dict[str, Any] = {
    "step_id": {
        "type": "string",
        "pattern": IDENTIFIER,
        "description": "Unique id; other steps read this step as steps.<step_id>.",
    },
    "type": {"type": "string", "description": "The step type (a registered plugin)."},
    "description": {"type": "string"},
    "depends_on": {
        "type": "array",
        "items": {"type": "string"},
        "uniqueItems": True,
        "description": "Extra dependencies besides those found in the step's templates.",
    },
    "when": {
        "anyOf": [{"type": "boolean"}, TEMPLATE],
        "description": "Run the step only when this is truthy; otherwise it is skipped.",
    },
    "for_each": {
        "anyOf": [{"type": "array"}, TEMPLATE],
        "description": "Run the step once per item (a list, or one {{ expression }} giving a "
        "list); `item` and `index` are in scope; the output is the list of results in order.",
    },
    "concurrency": {
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "description": "How many for_each items run at once (default 4).",
    },
    "repeat": {
        "type": "object",
        "properties": {
            "max": {"type": "integer", "minimum": 1, "maximum": 100},
            "until": {"anyOf": [{"type": "boolean"}, TEMPLATE]},
        },
        "required": ["max"],
        "additionalProperties": False,
        "description": "Run the step again, at most `max` times, until `until` is truthy. "
        "`iteration` and `previous` (the last output) are in scope; `until` also sees `output`.",
    },
    "retry": {
        "type": "object",
        "properties": {
            "attempts": {"type": "integer", "minimum": 1, "maximum": 20},
            "backoff_s": {"type": "number", "minimum": 0},
            "max_backoff_s": {"type": "number", "minimum": 0},
        },
        "additionalProperties": False,
        "description": "Attempts in all (default 1) with exponential backoff between them.",
    },
    "timeout_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": "Time limit of one attempt, in seconds.",
    },
    "on_error": {
        "enum": ["fail", "continue"],
        "description": "`fail` (default) fails the run; `continue` records the error, sets the "
        "output to `default` and goes on: the run ends `partial`.",
    },
    "default": {
        "description": "Output when the step is skipped or fails with on_error: continue; "
        "templates in it are rendered then (input, config, models, steps)."
    },
}

MODEL_ROLE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"enum": [t.value for t in ModelType]},
        "optional": {"type": "boolean"},
        "description": {"type": "string"},
    },
    "required": ["type"],
    "additionalProperties": False,
}

WORKFLOW_KEYS: dict[str, Any] = {
    "$schema": {"type": "string"},
    "id": {
        "type": "string",
        "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        "description": "Workflow id (default: the file name without extension).",
    },
    "name": {"type": "string"},
    "description": {"type": "string"},
    "version": {"type": ["integer", "string"]},
    "models": {
        "type": "object",
        "propertyNames": {"pattern": IDENTIFIER},
        "additionalProperties": MODEL_ROLE,
        "description": "Model roles; templates read the bound model id as models.<role>.",
    },
    "input_schema": {"type": "object", "description": "JSON Schema of the run's input."},
    "config": {"type": "object", "description": "Defaults the caller's config overrides."},
    "steps": {"type": "array", "minItems": 1, "items": {"type": "object"}},
    "output": {"description": "The run's result, rendered after the steps (templates allowed)."},
    "output_schema": {
        "type": "object",
        "description": "JSON Schema of the run's result: `fusion validate` checks the "
        "types `output` gives against it, and a run whose result does not match fails.",
    },
}

WORKFLOW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": WORKFLOW_KEYS,
    "required": ["steps"],
}


def templatable(schema: Any) -> Any:
    """The schema with a template string accepted in place of any value, at every depth:
    what the author writes before rendering."""
    if not isinstance(schema, dict):
        return schema
    out = copy.deepcopy(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: templatable(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = templatable(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = templatable(out["additionalProperties"])
    if out.get("type") == "string" and "pattern" not in out and "enum" not in out:
        return out  # any string already admits a template
    return {"anyOf": [out, TEMPLATE]}


def step_schema(params_schema: dict[str, Any], type_name: str) -> dict[str, Any]:
    """Schema of a whole step of one type, as written: common keys plus its parameters."""
    params = params_schema.get("properties", {})
    props = {k: templatable(v) for k, v in params.items()}
    props.update(STEP_KEYS)
    props["type"] = {"const": type_name}
    return {
        "type": "object",
        "properties": props,
        "required": ["step_id", "type", *params_schema.get("required", [])],
        "additionalProperties": False,
    }


def generate(registry: StepRegistry) -> dict[str, Any]:
    names = registry.names()
    defs: dict[str, Any] = {}
    branches = []
    for name in names:
        plugin = registry.get(name)
        assert plugin is not None
        defs[f"step.{name}"] = {
            **step_schema(plugin.params_schema, name),
            "description": plugin.description,
            # An annotation (unknown keywords validate nothing): what steps.<id>.output
            # holds, for editors and tools; {} is any JSON value.
            OUTPUT_KEYWORD: plugin.output_schema,
        }
        branches.append(
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {"$ref": f"#/$defs/step.{name}"},
            }
        )
    step = {
        "type": "object",
        "properties": {"step_id": STEP_KEYS["step_id"], "type": {"enum": names}},
        "required": ["step_id", "type"],
        "allOf": branches,
    }
    properties = copy.deepcopy(WORKFLOW_KEYS)
    properties["steps"]["items"] = {"$ref": "#/$defs/step"}
    return {
        "$schema": DIALECT,
        "$id": SCHEMA_ID,
        "title": "Fusion workflow",
        "description": "A Fusion workflow: steps forming a DAG, with Jinja templates.",
        "type": "object",
        "properties": properties,
        "required": ["steps"],
        "additionalProperties": False,
        "$defs": {"step": step, **defs},
    }
