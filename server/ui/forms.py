"""The start-a-run form, generated from a workflow's input_schema: one field per property
(string: text area, number/integer: number input, boolean: checkbox, enum: select,
array/object and anything else: JSON in a text area), and one model select per role.
Reading the submitted form back gives the orchestrate body's `input` and `models`; the
values are then checked by the same code as the API's (FusionService.prepare)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequest

INPUT_PREFIX = "input."
MODEL_PREFIX = "model."


@dataclass(frozen=True)
class Field:
    name: str
    widget: str  # text | number | checkbox | select | json
    required: bool
    description: str
    type_label: str
    step: str | None = None  # number inputs: "1" for integers, "any" for numbers
    options: tuple[str, ...] = ()
    default: str = ""  # the value the field starts with, as the form shows it
    checked: bool = False


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def fields(schema: Mapping[str, Any], given: Mapping[str, str] | None = None) -> list[Field]:
    """The form's input fields for `schema`; `given`: the values a refused submission held,
    shown again."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    out: list[Field] = []
    for name, prop in properties.items():
        prop = prop if isinstance(prop, Mapping) else {}
        kind = prop.get("type")
        if given is not None:
            default = given.get(INPUT_PREFIX + name, "")
        else:
            default = _as_text(prop.get("default"))
        common = {
            "name": name,
            "required": name in required,
            "description": str(prop.get("description") or ""),
            "type_label": "enum" if "enum" in prop else str(kind or "JSON"),
        }
        if "enum" in prop:
            options = tuple(_as_text(v) for v in prop["enum"])
            out.append(Field(widget="select", options=options, default=default, **common))
        elif kind == "boolean":
            checked = (
                INPUT_PREFIX + name in given if given is not None else prop.get("default") is True
            )
            out.append(Field(widget="checkbox", checked=checked, **common))
        elif kind in ("number", "integer"):
            step = "1" if kind == "integer" else "any"
            out.append(Field(widget="number", step=step, default=default, **common))
        elif kind == "string":
            out.append(Field(widget="text", default=default, **common))
        else:
            out.append(Field(widget="json", default=default, **common))
    return out


def read_input(schema: Mapping[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    """The run's `input` from a submitted form. An empty field is left out (the schema's
    default or its `required` then decides); a malformed number or JSON value is a 400
    naming the field, as the API names `input.<field>`."""
    properties = schema.get("properties") or {}
    out: dict[str, Any] = {}
    for name, prop in properties.items():
        prop = prop if isinstance(prop, Mapping) else {}
        key = INPUT_PREFIX + name
        kind = prop.get("type")
        if kind == "boolean" and "enum" not in prop:
            out[name] = key in form
            continue
        text = form.get(key, "")
        if text == "":
            continue
        out[name] = _value(name, prop, text)
    return out


def _value(name: str, prop: Mapping[str, Any], text: str) -> Any:
    kind = prop.get("type")
    param = f"input.{name}"
    if "enum" in prop:
        # The option's text is each value's JSON (a string as itself): find which it was.
        for value in prop["enum"]:
            if _as_text(value) == text:
                return value
        raise InvalidRequest(f"{name}: not one of the allowed values", param=param)
    if kind == "string":
        return text
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise InvalidRequest(f"{name}: {text!r} is not an integer", param=param) from None
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(f"{name}: {text!r} is not a number", param=param) from None
        return int(number) if number.is_integer() and "." not in text else number
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{name}: not valid JSON ({exc})", param=param) from None


def read_models(form: Mapping[str, str]) -> dict[str, str]:
    """role -> model id for each role whose select names a model ("" is: let the server
    choose)."""
    return {
        key[len(MODEL_PREFIX) :]: value
        for key, value in form.items()
        if key.startswith(MODEL_PREFIX) and value
    }
