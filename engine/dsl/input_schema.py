"""JSON Schemas that workflows bring (``input_schema``), made safe to run.

A schema comes from a workflow author, possibly a stranger (compose, ``custom``). Three
things in JSON Schema would let it reach outside or stall the server, and each is closed:

- ``$ref`` (and ``$dynamicRef``/``$recursiveRef``) to anything but a local ``#...`` fragment
  would make jsonschema fetch a URL or read a file: such references are compile errors, and
  the validator's registry refuses to retrieve anything at all.
- ``pattern`` and ``patternProperties`` run under RE2, a linear-time engine, instead of
  Python's backtracking ``re``; a pattern RE2 cannot compile (backreferences, lookaround)
  is a compile error. ``unevaluatedProperties`` beside ``patternProperties`` would send the
  patterns through jsonschema's own ``re`` and is refused.
- Validation itself can be exponential (``anyOf`` over recursive ``$ref``) or quadratic
  (``uniqueItems``): only schemas built of keywords whose cost is linear in the instance
  (``is_linear``) validate in-process; the others validate in the sandbox under its time and
  memory budget (engine.runtime.inputs).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2
from jsonschema import Draft202012Validator, ValidationError, validators
from referencing import Registry
from referencing.exceptions import NoSuchResource

from engine.dsl.issues import Path

_REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
# Keywords whose values are data, not subschemas: a "$ref" or "pattern" key inside them is
# an instance's, not the schema's.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# Keywords that cost time linear in the instance (and in the schema) to check.
_LINEAR_KEYWORDS = frozenset(
    {
        "$schema",
        "$comment",
        "$id",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "enum",
        "const",
        "pattern",
    }
)
_MAX_LINEAR_ENUM = 64
_RE2_MAX_MEM = 8 << 20  # bytes of automaton one pattern may build


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported, not printed to stderr
    options.max_mem = _RE2_MAX_MEM
    return options


_OPTIONS = _options()


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def pattern_error(pattern: str) -> str | None:
    """Why RE2 refuses ``pattern``, or None; None too for a pattern that is no regular
    expression at all, which the meta-schema's ``format: regex`` reports already."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None
    try:
        _compiled(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        return (
            f"pattern {pattern!r} is refused: {reason} (patterns run under RE2, a linear-time "
            "engine without backreferences or lookaround)"
        )
    return None


@dataclass
class _Seen:
    """What the walk met that matters only in combination."""

    pattern_properties: bool = False
    unevaluated: Path | None = None


def schema_issues(schema: Any) -> Iterator[tuple[str, Path]]:
    """(message, path) for every construct of ``schema`` that is refused."""
    state = _Seen()
    yield from _walk(schema, (), state)
    if state.pattern_properties and state.unevaluated is not None:
        yield (
            "unevaluatedProperties cannot be combined with patternProperties (its patterns "
            "would run under a backtracking engine)",
            state.unevaluated,
        )


def _walk(node: Any, path: Path, state: _Seen) -> Iterator[tuple[str, Path]]:
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, (*path, index), state)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = (*path, key)
        if key in _REF_KEYS and isinstance(value, str) and not value.startswith("#"):
            yield (
                f"{key} {value!r} is refused: only local references ('#/$defs/...') are "
                "resolved; Fusion never fetches a schema from a URL or a file",
                where,
            )
        elif key == "pattern" and isinstance(value, str):
            error = pattern_error(value)
            if error:
                yield error, where
        elif key == "patternProperties" and isinstance(value, dict):
            state.pattern_properties = True
            for pattern in value:
                error = pattern_error(pattern)
                if error:
                    yield error, (*where, pattern)
        elif key == "unevaluatedProperties":
            state.unevaluated = where
        if key not in _DATA_KEYWORDS:
            yield from _walk(value, where, state)


def is_linear(schema: Any) -> bool:
    """Whether validating against ``schema`` costs time linear in the instance."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict):
        return False
    for key, value in schema.items():
        if key not in _LINEAR_KEYWORDS:
            return False
        if key == "properties":
            if not isinstance(value, dict) or not all(map(is_linear, value.values())):
                return False
        elif (key in ("items", "additionalProperties") and not is_linear(value)) or (
            key == "enum" and (not isinstance(value, list) or len(value) > _MAX_LINEAR_ENUM)
        ):
            return False
    return True


# -- the validator ----------------------------------------------------------------------------
def _search(pattern: str, text: str) -> bool:
    return _compiled(pattern).search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key for key in instance if key not in known and not any(_search(p, key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif additional is False and extras:
        names = ", ".join(repr(e) for e in sorted(extras)[:10])
        more = f" and {len(extras) - 10} more" if len(extras) > 10 else ""
        yield ValidationError(f"additional properties are not allowed ({names}{more})")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_retrieval(uri: str) -> Any:
    raise NoSuchResource(uri)


# Every validator of workflow schemas: no retrieval, RE2 for every pattern.
NO_RETRIEVAL = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]
SafeValidator = validators.extend(
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)


def short_message(error: ValidationError, limit: int = 300) -> str:
    """An error message bounded in size: jsonschema quotes the whole failing instance."""
    message = error.message
    return message if len(message) <= limit else f"{message[:limit]}..."
