"""Expected values and their matchers.

An expected value is compared exactly (mappings with the same keys, lists of the same length,
``1 == 1.0`` but ``true != 1``), except where it holds a matcher: a mapping with a single key
starting with ``$``:

- ``{$any: true}``: any value, null included;
- ``{$regex: PATTERN}``: a string in which PATTERN is found (a search, under RE2);
- ``{$contains: VALUE}``: a list with an item matching VALUE, or a string containing VALUE;
- ``{$schema: SCHEMA}``: a value valid against the JSON Schema SCHEMA;
- ``{$partial: MAPPING}``: a mapping with at least MAPPING's keys, each matching.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import re2
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from engine.dsl.hints import suggest
from engine.dsl.input_schema import (
    NO_RETRIEVAL,
    SafeValidator,
    pattern_error,
    schema_issues,
    short_message,
)
from engine.dsl.issues import Path, json_pointer

MATCHERS = ("$any", "$regex", "$contains", "$schema", "$partial")
_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)


@dataclass(frozen=True)
class Mismatch:
    """What differs: ``path`` in the run's result (``output``, ``sources``, 0), ``where`` the
    expected value's path in the test file (to locate it)."""

    message: str
    path: Path
    where: Path


def matcher_name(value: Any) -> str | None:
    """The name of the matcher ``value`` is (``$regex``), or None for a plain value."""
    if isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value):
        return next(k for k in value if k.startswith("$"))
    return None


def check_expected(value: Any, where: Path) -> Iterator[tuple[str, Path]]:
    """(message, path in the test file) for each malformed matcher inside ``value``."""
    name = matcher_name(value)
    if name is None:
        if isinstance(value, dict):
            for key, item in value.items():
                yield from check_expected(item, (*where, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from check_expected(item, (*where, index))
        return
    if len(value) != 1:
        others = ", ".join(k for k in value if k != name)
        yield f"a matcher is a mapping with one key: {name} has {others} beside it", where
        return
    if name not in MATCHERS:
        hint = suggest(name, MATCHERS) or f" (matchers: {', '.join(MATCHERS)})"
        yield f"unknown matcher '{name}'{hint}", (*where, name)
        return
    argument, at = value[name], (*where, name)
    if name == "$any" and argument is not True:
        yield "$any takes true", at
    elif name == "$regex":
        yield from _check_regex(argument, at)
    elif name == "$contains":
        yield from check_expected(argument, at)
    elif name == "$schema":
        yield from _check_schema(argument, at)
    elif name == "$partial":
        if isinstance(argument, dict):
            for key, item in argument.items():  # its keys are the value's, even a '$' one
                yield from check_expected(item, (*at, key))
        else:
            yield "$partial takes a mapping (the keys the value must have)", at


def _check_regex(pattern: Any, at: Path) -> Iterator[tuple[str, Path]]:
    if not isinstance(pattern, str):
        yield "$regex takes a string (a regular expression)", at
        return
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        yield f"$regex {pattern!r} is not a regular expression: {exc}", at
        return
    problem = pattern_error(pattern)
    if problem:
        yield f"$regex {problem}", at


def _check_schema(schema: Any, at: Path) -> Iterator[tuple[str, Path]]:
    if not isinstance(schema, dict | bool):
        yield "$schema takes a JSON Schema (a mapping)", at
        return
    for error in _META.iter_errors(schema):
        yield (
            f"$schema is not a valid JSON Schema: {short_message(error)}",
            (
                *at,
                *error.absolute_path,
            ),
        )
    for message, path in schema_issues(schema):
        yield f"$schema: {message}", (*at, *path)


def match(expected: Any, actual: Any, path: Path, where: Path) -> list[Mismatch]:
    """The mismatches between a checked expected value and the actual one (none: it matches)."""
    name = matcher_name(expected)
    if name is not None:
        return _match_matcher(name, expected[name], actual, path, (*where, name))
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [Mismatch(f"expected a mapping, got {show(actual)}", path, where)]
        found = _match_keys(expected, actual, path, where)
        extra = [k for k in actual if k not in expected]
        if extra:
            names = ", ".join(map(repr, extra))
            message = f"unexpected key(s) {names} (use $partial to allow other keys)"
            found.append(Mismatch(message, path, where))
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [Mismatch(f"expected a list, got {show(actual)}", path, where)]
        if len(expected) != len(actual):
            message = f"expected {len(expected)} item(s), got {len(actual)}: {show(actual)}"
            return [Mismatch(message, path, where)]
        return [
            m
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for m in match(e, a, (*path, i), (*where, i))
        ]
    if _same(expected, actual):
        return []
    return [Mismatch(f"expected {show(expected)}, got {show(actual)}", path, where)]


def _match_keys(
    expected: dict[str, Any], actual: dict[str, Any], path: Path, where: Path
) -> list[Mismatch]:
    """Mismatches of ``expected``'s keys: each must be in ``actual`` and match there."""
    found: list[Mismatch] = []
    for key, value in expected.items():
        if key not in actual:
            message = f"missing key '{key}'{suggest(key, actual)}"
            found.append(Mismatch(message, path, (*where, key)))
        else:
            found += match(value, actual[key], (*path, key), (*where, key))
    return found


def _match_matcher(name: str, argument: Any, actual: Any, path: Path, at: Path) -> list[Mismatch]:
    def fail(message: str) -> list[Mismatch]:
        return [Mismatch(message, path, at)]

    if name == "$any":
        return []
    if name == "$regex":
        if not isinstance(actual, str):
            return fail(f"expected a string matching {argument!r}, got {show(actual)}")
        if re2.search(argument, actual) is None:
            return fail(f"expected a match of {argument!r}, got {show(actual)}")
        return []
    if name == "$contains":
        if isinstance(actual, str) and isinstance(argument, str):
            if argument in actual:
                return []
            return fail(f"expected {show(actual)} to contain {show(argument)}")
        if not isinstance(actual, list):
            return fail(f"expected a list containing {show(argument)}, got {show(actual)}")
        if any(not match(argument, item, (*path, i), at) for i, item in enumerate(actual)):
            return []
        return fail(f"no item matches {show(argument)}: {show(actual)}")
    if name == "$schema":
        errors = list(SafeValidator(argument, registry=NO_RETRIEVAL).iter_errors(actual))
        if not errors:
            return []
        error = best_match(errors)
        inner = json_pointer(tuple(error.absolute_path)) or "/"
        return fail(f"does not match the schema at {inner}: {short_message(error)}")
    # $partial
    if not isinstance(actual, dict):
        return fail(f"expected a mapping, got {show(actual)}")
    return _match_keys(argument, actual, path, at)


def _same(expected: Any, actual: Any) -> bool:
    # JSON has one number type (1 == 1.0), but true is no 1 and null is no 0.
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    return bool(expected == actual)


def show(value: Any, limit: int = 120) -> str:
    """``value`` as JSON, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
