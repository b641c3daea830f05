"""Check a run's input against the workflow's input_schema, filling in defaults, and its
output against output_schema.

Schemas whose validation is provably linear in the input validate in-process; any other
validates in the sandbox under the schema budget (engine.dsl.input_schema says why)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from typing import Any

import msgspec
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from engine.dsl.input_schema import NO_RETRIEVAL, SafeValidator, is_linear, short_message
from engine.dsl.issues import json_pointer
from engine.errors import ErrorCode, InvalidRequest
from engine.sandbox import Budget, SandboxError, SandboxTimeout, shared_sandbox


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
    SafeValidator, {"properties": _fill_defaults, "required": _required_after_defaults}
)


# Validators by schema identity: building one costs more than validating a small input,
# and a workflow's input_schema is the same object on every run. In a sandbox worker the
# schema arrives as a new object with each call, so there it is found by a digest of its
# content (`schema_key`) instead. Bounded, because inline workflows bring a new schema
# with each request.
_VALIDATORS: dict[tuple[int | str, bool], tuple[dict[str, Any], Any, bool]] = {}
_MAX_VALIDATORS = 256


def _validator(
    schema: dict[str, Any], *, fill: bool = True, key: str | None = None
) -> tuple[Any, bool]:
    """The schema's validator (``fill``: one that fills in defaults) and whether it
    validates in linear time; ``key``: the schema's content digest, when it has one."""
    cache_key = (id(schema) if key is None else key, fill)
    found = _VALIDATORS.get(cache_key)
    if found is not None and (key is not None or found[0] is schema):
        return found[1], found[2]
    if len(_VALIDATORS) >= _MAX_VALIDATORS:
        _VALIDATORS.clear()
    validator = (_Filling if fill else SafeValidator)(schema, registry=NO_RETRIEVAL)
    linear = is_linear(schema)
    # the schema kept alive: its id stays its own
    _VALIDATORS[cache_key] = (schema, validator, linear)
    return validator, linear


def _content_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(msgspec.json.encode(schema)).hexdigest()


def check_input(payload: dict[str, Any]) -> dict[str, Any]:
    """``{"instance": <copy with defaults>}`` or ``{"error": {"message", "param"}}`` for
    ``payload["instance"]`` against ``payload["schema"]``; runs in-process or in the sandbox."""
    schema, data = payload["schema"], payload["instance"]
    instance = copy.deepcopy(data) if data is not None else {}
    errors = list(_validator(schema, key=payload.get("schema_key"))[0].iter_errors(instance))
    if errors:
        error = best_match(errors)
        path = tuple(error.absolute_path)
        if error.validator == "required":
            missing = next((m for m in error.validator_value if m not in error.instance), None)
            path = (*path, missing) if missing is not None else path
        pointer = json_pointer(path)
        return {
            "error": {
                "message": f"input{pointer or ''}: {short_message(error)}",
                "param": f"input{pointer}" if pointer else "input",
            }
        }
    if not isinstance(instance, dict):
        return {"error": {"message": "input must be a JSON object", "param": "input"}}
    return {"instance": instance}


class SchemaUnchecked(Exception):
    """A value that could not be validated at all (over budget, not plain JSON)."""


async def _check(
    function: str, what: str, schema: dict[str, Any], data: Any, budget: Budget
) -> Any:
    """``function`` (check_input or check_output) on the value: in-process when the schema
    validates in linear time, else in the sandbox under ``budget``."""
    payload = {"schema": schema, "instance": data}
    if _validator(schema, fill=function == "check_input")[1]:
        return _CHECKS[function](payload)
    payload["schema_key"] = _content_key(schema)
    try:
        return await shared_sandbox().call(
            f"engine.runtime.inputs:{function}",
            payload,
            timeout_s=budget.timeout_s,
            memory_mb=budget.memory_mb,
        )
    except SandboxTimeout:
        raise SchemaUnchecked(
            f"{what} could not be validated within the schema budget of {budget.timeout_s:g} s "
            f"(setting schema_timeout_s): the workflow's {what}_schema is too costly for "
            f"this {what}"
        ) from None
    except SandboxError as exc:
        raise SchemaUnchecked(f"{what} could not be validated: {exc.message}") from None
    except (TypeError, OverflowError) as exc:
        raise SchemaUnchecked(f"{what} is not plain JSON data: {exc}") from None


async def prepare_input(schema: dict[str, Any], data: Any, budget: Budget) -> dict[str, Any]:
    """A validated copy of ``data`` with schema defaults applied; InvalidRequest naming the
    JSON pointer of the first problem otherwise."""
    try:
        outcome = await _check("check_input", "input", schema, data, budget)
    except SchemaUnchecked as exc:
        raise InvalidRequest(str(exc), param="input", code=ErrorCode.INVALID_INPUT) from None
    if "error" in outcome:
        raise InvalidRequest(
            outcome["error"]["message"],
            param=outcome["error"]["param"],
            code=ErrorCode.INVALID_INPUT,
        )
    instance: dict[str, Any] = outcome["instance"]
    return instance


def check_output(payload: dict[str, Any]) -> dict[str, Any]:
    """``{}``, or ``{"error": message}`` for ``payload["instance"]`` (a run's output) against
    ``payload["schema"]``; runs in-process or in the sandbox."""
    validator = _validator(payload["schema"], fill=False, key=payload.get("schema_key"))[0]
    errors = list(validator.iter_errors(payload["instance"]))
    if not errors:
        return {}
    error = best_match(errors)
    where = json_pointer(tuple(error.absolute_path)) or "/"
    return {"error": f"does not match output_schema at {where}: {short_message(error)}"}


_CHECKS = {"check_input": check_input, "check_output": check_output}


async def output_problem(schema: dict[str, Any], output: Any, budget: Budget) -> str | None:
    """What makes a run's output fail the workflow's output_schema (None: it matches)."""
    try:
        outcome = await _check("check_output", "output", schema, output, budget)
    except SchemaUnchecked as exc:
        return str(exc)
    problem: str | None = outcome.get("error")
    return problem
