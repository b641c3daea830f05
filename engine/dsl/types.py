"""The types of template values, for the compile-time checker (engine.dsl.typecheck).

A small lattice after actionlint's ``expr_sema``: any, null, bool, number (integer or
not), string, array(elem) and object(props, strict). ``Any`` is what cannot be known (a
free-form value, a filter the checker does not model, a union JSON Schema): nothing is
ever reported about it. An object is strict when its properties are all it can have
(``additionalProperties: false``): only then is an unknown field a mistake (and, for
input_schema's top level, a name close to a declared one: see ``ObjectType.typos``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.dsl.issues import Path


class Type:
    """A template value's type; subclasses are the lattice's kinds."""

    def to_schema(self) -> dict[str, Any]:
        """The JSON Schema of the kind; a scalar's is its name's ``type``."""
        return {"type": str(self)}


@dataclass(frozen=True)
class AnyType(Type):
    def __str__(self) -> str:
        return "any"

    def to_schema(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class NullType(Type):
    def __str__(self) -> str:
        return "null"


@dataclass(frozen=True)
class BoolType(Type):
    def __str__(self) -> str:
        return "boolean"


@dataclass(frozen=True)
class NumberType(Type):
    integer: bool = False

    def __str__(self) -> str:
        return "integer" if self.integer else "number"


@dataclass(frozen=True)
class StringType(Type):
    def __str__(self) -> str:
        return "string"


@dataclass(frozen=True)
class ArrayType(Type):
    elem: Type = field(default_factory=AnyType)

    def __str__(self) -> str:
        return "array" if isinstance(self.elem, AnyType) else f"array<{self.elem}>"

    def to_schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.elem.to_schema()}


@dataclass(frozen=True)
class ObjectType(Type):
    props: Mapping[str, Type] = field(default_factory=dict)
    strict: bool = False  # no properties but ``props``
    # Open, yet a name close to a declared one is a typo (input_schema's top level).
    typos: bool = False

    def __str__(self) -> str:
        if not self.props:
            return "object"
        inner = ", ".join(f"{k}: {v}" for k, v in self.props.items())
        return f"object{{{inner}{'' if self.strict else ', ...'}}}"

    def to_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {k: v.to_schema() for k, v in self.props.items()},
        }
        if self.strict:
            schema["additionalProperties"] = False
        return schema

    def __hash__(self) -> int:
        return hash((tuple(self.props.items()), self.strict, self.typos))


ANY = AnyType()
NULL = NullType()
BOOL = BoolType()
NUMBER = NumberType()
INTEGER = NumberType(integer=True)
STRING = StringType()

_SCALARS: dict[str, Type] = {
    "null": NULL,
    "boolean": BOOL,
    "number": NUMBER,
    "integer": INTEGER,
    "string": STRING,
}


# The most a type built from templates may hold before it is taken as Any. Types nest by
# reference (a step's output type holds the one it read), so a chain of steps could
# otherwise make one as deep as the workflow is long, or, reading a step twice each time,
# twice as large per step: its display and its schema grow with it.
MAX_TYPE_NODES = 1000
MAX_TYPE_DEPTH = 32


def bounded(t: Type) -> Type:
    """``t``, or Any where it holds more than MAX_TYPE_NODES kinds or nests deeper than
    MAX_TYPE_DEPTH. Walks at most MAX_TYPE_NODES nodes however much ``t`` shares."""
    stack: list[tuple[Type, int]] = [(t, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_TYPE_NODES or depth > MAX_TYPE_DEPTH:
            return ANY
        if isinstance(node, ArrayType):
            stack.append((node.elem, depth + 1))
        elif isinstance(node, ObjectType):
            stack.extend((v, depth + 1) for v in node.props.values())
    return t


def from_schema(schema: Any) -> Type:
    """The type a JSON Schema describes; Any where it is not one plain kind (a union of
    types, anyOf/oneOf, $ref), so nothing is reported on a guess."""
    if not isinstance(schema, dict):
        return ANY
    if any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "not", "if")):
        return ANY
    if "const" in schema:
        return of_value(schema["const"])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return join_all([of_value(v) for v in schema["enum"]])
    kind = schema.get("type", "object" if "properties" in schema else None)
    if not isinstance(kind, str):
        return ANY  # a list of types is a union
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = schema.get("items")
        return ArrayType(from_schema(items) if isinstance(items, dict) else ANY)
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        return ObjectType(
            {str(k): from_schema(v) for k, v in props.items()},
            strict=schema.get("additionalProperties") is False
            and "patternProperties" not in schema,
        )
    return ANY


def of_value(value: Any) -> Type:
    """The type of a literal JSON value (a dict literal's keys are all it has)."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, str):
        return STRING
    if isinstance(value, list | tuple):
        return ArrayType(join_all([of_value(v) for v in value]))
    if isinstance(value, dict):
        return ObjectType({str(k): of_value(v) for k, v in value.items()}, strict=True)
    return ANY


def join(a: Type, b: Type) -> Type:
    """The least type holding both; without unions, two different kinds give Any."""
    if a == b:
        return a
    if isinstance(a, NumberType) and isinstance(b, NumberType):
        return NUMBER
    if isinstance(a, ArrayType) and isinstance(b, ArrayType):
        return ArrayType(join(a.elem, b.elem))
    if isinstance(a, ObjectType) and isinstance(b, ObjectType):
        # Only fields both sides have are certain; the rest may or may not be there.
        common = {k: join(v, b.props[k]) for k, v in a.props.items() if k in b.props}
        return ObjectType(common, strict=False)
    return ANY


def join_all(types: list[Type]) -> Type:
    """The join of all; an empty list's element is unknown."""
    if not types:
        return ANY
    out = types[0]
    for t in types[1:]:
        out = join(out, t)
    return out


def mismatches(
    value: Type, schema: Any, path: Path = (), root: str = "the value"
) -> list[tuple[Path, str]]:
    """Where a value of type ``value`` can never satisfy ``schema``: (path in the value,
    what is wrong; ``root`` names the whole value). Any and unions never conflict:
    definite mistakes only."""
    expected = from_schema(schema)
    if isinstance(value, AnyType) or isinstance(expected, AnyType):
        return []
    at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or root
    if isinstance(value, NumberType) and isinstance(expected, NumberType):
        return []  # 3.0 is an integer to JSON Schema: a number may still fit
    if type(value) is not type(expected):
        return [(path, f"{at} is {value}, where the schema wants {expected}")]
    if isinstance(value, ArrayType):
        return mismatches(value.elem, schema.get("items"), path, root)
    if not isinstance(value, ObjectType) or not isinstance(expected, ObjectType):
        return []
    found: list[tuple[Path, str]] = []
    declared = schema.get("properties")
    declared = declared if isinstance(declared, dict) else {}
    required = schema.get("required")
    if value.strict and isinstance(required, list):
        found += [
            (path, f"{at} has no '{key}', which the schema requires")
            for key in required
            if key not in value.props
        ]
    for key, sub in value.props.items():
        if key in declared:
            found += mismatches(sub, declared[key], (*path, key), root)
        elif expected.strict:
            found.append(((*path, key), f"{at} has '{key}', which the schema does not allow"))
    return found
