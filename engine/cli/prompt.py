"""`fusion run --interactive`: ask for each input field the workflow's `input_schema`
declares, on a terminal or from piped text.

Each property not given on the command line is asked once, with its type, description,
default and whether it is required. An answer is typed by the property's type: integer,
number, boolean, array and object answers are JSON, strings are taken as typed, anything
untyped is JSON when it parses. An empty answer takes the default (or leaves the field
out); a bad answer is asked again with the reason, a bounded number of times.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TextIO

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from engine.cli.common import parse_value
from engine.dsl.input_schema import short_message
from engine.errors import InvalidRequest

ATTEMPTS = 3
_BOOLEANS = {"true": True, "yes": True, "y": True, "false": False, "no": False, "n": False}
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
}


class BadAnswer(ValueError):
    """An answer that cannot be the field's value; the message says why."""


def ask_inputs(
    schema: Mapping[str, Any],
    given: Mapping[str, Any],
    answers: TextIO,
    prompts: TextIO,
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """`given` with an answer for each property of `schema` it lacks, read from `answers`
    (a line each), questions written to `prompts`."""
    values = dict(given)
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return values
    required = set(schema.get("required") or ())
    validator = Draft202012Validator(dict(schema))
    for name, prop in properties.items():
        if name in values or not isinstance(prop, Mapping):
            continue
        prompts.write(describe(name, prop, name in required) + "\n")
        for attempt in range(1, attempts + 1):
            prompts.write(f"{name}> ")
            prompts.flush()
            line = answers.readline()
            if not line:  # end of input: no more answers will come
                prompts.write("\n")
                if name in required and "default" not in prop:
                    raise InvalidRequest(
                        f"--interactive: input ended before a value for required '{name}'",
                        param=f"input.{name}",
                    )
                break
            text = line.rstrip("\r\n")
            if not text:
                if name in required and "default" not in prop:
                    reason = "a value is required"
                else:
                    break  # the default, or the field left out
            else:
                try:
                    values[name] = answer_value(text, prop)
                    check_field(validator, values, name)
                    break
                except BadAnswer as exc:
                    values.pop(name, None)
                    reason = str(exc)
            if attempt == attempts:
                raise InvalidRequest(
                    f"--interactive: no valid value for '{name}' after {attempts} "
                    f"attempts ({reason})",
                    param=f"input.{name}",
                )
            prompts.write(f"  {reason}; try again\n")
    return values


def describe(name: str, prop: Mapping[str, Any], required: bool) -> str:
    kind = prop.get("type", "any")
    text = f"{name} ({'|'.join(kind) if isinstance(kind, list) else kind}"
    text += ", required)" if required else ")"
    if "enum" in prop:
        text += " one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    if prop.get("description"):
        text += f": {prop['description']}"
    if "default" in prop:
        text += f" [default: {json.dumps(prop['default'])}]"
    return text


def answer_value(text: str, prop: Mapping[str, Any]) -> Any:
    """The value an answer stands for, by the property's type."""
    kind = prop.get("type")
    kinds: set[str] = {str(k) for k in kind} if isinstance(kind, list) else {str(kind)}
    if "boolean" in kinds and text.lower() in _BOOLEANS:
        return _BOOLEANS[text.lower()]
    typed = kinds & _JSON_TYPES.keys()
    if not typed:  # a string is taken as typed; an untyped field is JSON when it parses
        return text if "string" in kinds else parse_value(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if "string" in kinds:
            return text
        raise BadAnswer(f"expected {' or '.join(sorted(typed))} (JSON)") from None
    if not any(_is(value, t) for t in kinds):
        if "string" in kinds:
            return text
        raise BadAnswer(f"expected {' or '.join(sorted(kinds))}")
    return value


def _is(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "string":
        return isinstance(value, str)
    if isinstance(value, bool) and kind != "boolean":
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    expected = _JSON_TYPES.get(kind)
    return expected is None or isinstance(value, expected)


def check_field(validator: Draft202012Validator, values: Mapping[str, Any], name: str) -> None:
    """The field's own problems under the whole schema (constraints, enum, `$ref`s);
    fields not answered yet are not its problem."""
    errors = [e for e in validator.iter_errors(values) if list(e.absolute_path)[:1] == [name]]
    if errors:
        raise BadAnswer(short_message(best_match(errors)))
