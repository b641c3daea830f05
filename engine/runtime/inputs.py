"""Check a run's input against the workflow's input_schema, filling in defaults."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from engine.dsl.issues import json_pointer
from engine.errors import InvalidRequest


def _apply_defaults(properties: Any, instance: Any) -> None:
    if isinstance(instance, dict) and isinstance(properties, dict):
        for name, sub in properties.items():
            if isinstance(sub, dict) and "default" in sub and name not in instance:
                instance[name] = copy.deepcopy(sub["default"])


def _fill_defaults(
    validator: Any, properties: dict[str, Any], instance: Any, schema: Any
) -> Iterator:
    _apply_defaults(properties, instance)
    yield from Draft202012Validator.VALIDATORS["properties"](
        validator, properties, instance, schema
    )


def _required_after_defaults(
    validator: Any, required: list[str], instance: Any, schema: Any
) -> Iterator:
    # Keywords run in the schema's key order: without this, a defaulted property counted
    # as present only when `properties` happened to be written before `required`.
    _apply_defaults(schema.get("properties"), instance)
    yield from Draft202012Validator.VALIDATORS["required"](validator, required, instance, schema)


_Filling = validators.extend(
    Draft202012Validator, {"properties": _fill_defaults, "required": _required_after_defaults}
)


# Validators by schema identity: building one costs more than validating a small input,
# and a workflow's input_schema is the same object on every run. Bounded, because inline
# workflows bring a new schema with each request.
_VALIDATORS: dict[int, tuple[dict[str, Any], Any]] = {}
_MAX_VALIDATORS = 256


def _validator(schema: dict[str, Any]) -> Any:
    found = _VALIDATORS.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    if len(_VALIDATORS) >= _MAX_VALIDATORS:
        _VALIDATORS.clear()
    validator = _Filling(schema)
    _VALIDATORS[id(schema)] = (schema, validator)  # the schema kept alive: its id stays its own
    return validator


def prepare_input(schema: dict[str, Any], data: Any) -> dict[str, Any]:
    """A validated copy of ``data`` with schema defaults applied; InvalidRequest naming the
    JSON pointer of the first problem otherwise."""
    instance = copy.deepcopy(data) if data is not None else {}
    errors = list(_validator(schema).iter_errors(instance))
    if errors:
        error = best_match(errors)
        path = tuple(error.absolute_path)
        if error.validator == "required":
            missing = next((m for m in error.validator_value if m not in error.instance), None)
            path = (*path, missing) if missing is not None else path
        pointer = json_pointer(path)
        raise InvalidRequest(
            f"input{pointer or ''}: {error.message}",
            param=f"input{pointer}" if pointer else "input",
            code="invalid_input",
        )
    if not isinstance(instance, dict):
        raise InvalidRequest("input must be a JSON object", param="input", code="invalid_input")
    return instance
