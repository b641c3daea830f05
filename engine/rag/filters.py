"""Metadata filters on retrieval: a Mongo/Chroma-style filter object compiled to one SQL
condition over a chunk (`c`, a `chunks` row) and its document (`d`, a `documents` row).

The language (docs/rag.md "Filters")
    {"field": value}                  equality (value: string, number, boolean or null)
    {"field": {"$op": value, ...}}    operators, all of which must hold:
        $eq $ne $gt $gte $lt $lte     $gt..$lte: a string or a number (not a boolean)
        $in $nin                      a list of scalars
        $exists                       true or false
    {"$and": [filter, ...]}           every filter holds; {"$or": [...]}: at least one
    several keys in one object        all must hold (an implicit $and)

A field is a key of a hit's metadata: the document's own metadata from ingest, or the
store's `file`, `page`, `heading`, `document_id` (which win on a clash, as in the hit).

Semantics, chosen to match MongoDB's where Chroma and Qdrant are silent
    - Types never coerce: "2024" does not equal 2024, true does not equal 1; integers and
      reals compare as numbers (1 equals 1.0). $gt/$gte/$lt/$lte compare numbers with
      numbers and strings with strings (by code point, so ISO dates order correctly); a
      value of another type does not match.
    - A metadata value that is a list matches when any element does ("tags": "x" matches
      ["x", "y"]); an object value never matches a scalar.
    - null: {"field": null} matches a null value or a missing key; $exists tells the two
      apart. The store's keys always exist (page and heading are null when unknown).
    - $ne and $nin are the negations of $eq and $in, so they match a missing key too.
    - {} (or no filter) matches every chunk.

Every value is bound as an SQL parameter; a field becomes a JSON path that is bound too,
so nothing from the filter is ever SQL text. The size of a filter is bounded (`FilterLimits`)
and anything malformed is a 400 (`InvalidRequest`, param "filter") naming where it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.config import Settings
from engine.errors import InvalidRequest

COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPERATORS = ("$eq", "$ne", *COMPARISONS, "$in", "$nin", "$exists")
LOGICAL = ("$and", "$or")
# The store's own keys of a hit's metadata (engine/rag/store.py `_hit`), as SQL columns.
STORE_FIELDS = {
    "file": "d.filename",
    "document_id": "d.document_id",
    "page": "c.page",
    "heading": "c.heading",
}
CHUNK_FIELDS = frozenset({"page", "heading"})
# Nesting of $and/$or inside each other; ample for hand-written and generated filters.
MAX_DEPTH = 8
MAX_KEY_CHARS = 256
MAX_STRING_CHARS = 1024
# SQLite binds 64-bit integers.
_INT_RANGE = (-(2**63), 2**63 - 1)
_NUMBER = "('integer', 'real')"

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class FilterLimits:
    """How large one filter may be (Settings; docs/rag.md "Filters")."""

    max_terms: int = Settings.rag_filter_max_terms  # field conditions, each operator one
    max_values: int = Settings.rag_filter_max_values  # values in one $in / $nin list

    @classmethod
    def from_settings(cls, settings: Settings) -> FilterLimits:
        return cls(
            max_terms=settings.rag_filter_max_terms, max_values=settings.rag_filter_max_values
        )


@dataclass(frozen=True)
class SqlFilter:
    """A compiled filter: `sql` is a condition over `c` (chunks) and `d` (documents)
    with `params` bound in order. The same condition split in two, so the store can judge
    most of it once per document: `document_sql` (over `d` alone; None: true) and
    `chunk_sql` (the top-level terms that read a chunk's page or heading; None: true),
    whose conjunction is `sql`."""

    sql: str
    params: tuple[Any, ...]
    document_sql: str | None = None
    document_params: tuple[Any, ...] = ()
    chunk_sql: str | None = None
    chunk_params: tuple[Any, ...] = ()


def compile_filter(spec: Any, limits: FilterLimits | None = None) -> SqlFilter | None:
    """`spec` (a parsed JSON filter) as SQL, or None when it is absent or `{}` (no filter).

    Raises InvalidRequest (param "filter") for anything malformed or over `limits`.
    """
    if spec is None:
        return None
    compiler = _Compiler(limits or FilterLimits())
    if not isinstance(spec, Mapping):
        raise compiler.error("filter", f"must be an object, not {_type_name(spec)}")
    if not spec:
        return None
    by_document: list[Fragment] = []
    by_chunk: list[Fragment] = []
    for key, value in spec.items():  # the implicit $and of the top level, term by term
        compiler.chunk_level = False
        part = compiler.object({key: value}, "filter", 0)
        (by_chunk if compiler.chunk_level else by_document).append(part)
    sql, params = _joined(by_document + by_chunk, " AND ")
    document = _joined(by_document, " AND ") if by_document else None
    chunk = _joined(by_chunk, " AND ") if by_chunk else None
    return SqlFilter(
        sql,
        tuple(params),
        document_sql=None if document is None else document[0],
        document_params=() if document is None else tuple(document[1]),
        chunk_sql=None if chunk is None else chunk[0],
        chunk_params=() if chunk is None else tuple(chunk[1]),
    )


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


Fragment = tuple[str, list[Any]]


class _Compiler:
    def __init__(self, limits: FilterLimits) -> None:
        self.limits = limits
        self.terms = 0
        self.chunk_level = False

    @staticmethod
    def error(where: str, problem: str) -> InvalidRequest:
        return InvalidRequest(f"{where}: {problem}", param="filter")

    def object(self, spec: Mapping[Any, Any], where: str, depth: int) -> Fragment:
        """A filter object: its keys' conditions, all of which must hold."""
        parts: list[Fragment] = []
        for key, value in spec.items():
            if not isinstance(key, str):
                raise self.error(where, f"keys must be strings, not {_type_name(key)}")
            if key in LOGICAL:
                parts.append(self.logical(key, value, f"{where}.{key}", depth + 1))
            elif key.startswith("$"):
                raise self.error(
                    where,
                    f"unknown operator {key!r} here: only {' and '.join(LOGICAL)} combine "
                    "filters; the other operators go inside a field, e.g. "
                    '{"year": {"$gte": 2020}}',
                )
            else:
                parts.append(self.field(key, value, f"{where}.{key}"))
        return _joined(parts, " AND ")

    def logical(self, operator: str, value: Any, where: str, depth: int) -> Fragment:
        if depth > MAX_DEPTH:
            raise self.error(where, f"$and/$or nest at most {MAX_DEPTH} deep")
        if not isinstance(value, list | tuple) or not value:
            raise self.error(where, f"must be a non-empty list of filters, not {_type_name(value)}")
        parts = []
        for i, item in enumerate(value):
            inner = f"{where}[{i}]"
            if not isinstance(item, Mapping) or not item:
                raise self.error(
                    inner, f"must be a non-empty filter object, not {_type_name(item)}"
                )
            parts.append(self.object(item, inner, depth))
        return _joined(parts, " AND " if operator == "$and" else " OR ")

    def field(self, key: str, value: Any, where: str) -> Fragment:
        _check_key(key, where, self.error)
        field = _Field(key)
        self.chunk_level |= key in CHUNK_FIELDS
        if isinstance(value, Mapping):
            if not value:
                raise self.error(where, "an operator object needs at least one operator")
            parts = [
                self.operator(field, op, operand, f"{where}.{op}") for op, operand in value.items()
            ]
            return _joined(parts, " AND ")
        return self.operator(field, "$eq", value, where)

    def operator(self, field: _Field, op: Any, operand: Any, where: str) -> Fragment:
        if op not in OPERATORS:
            raise self.error(
                where,
                f"unknown operator {op!r}; known: {', '.join(OPERATORS)}"
                + ("" if str(op).startswith("$") else " (a nested field is not supported)"),
            )
        self.terms += 1
        if self.terms > self.limits.max_terms:
            raise self.error(
                where,
                f"a filter may hold at most {self.limits.max_terms} conditions "
                "(setting rag_filter_max_terms)",
            )
        if op == "$exists":
            if not isinstance(operand, bool):
                raise self.error(where, f"must be true or false, not {_type_name(operand)}")
            return field.exists() if operand else _negated(field.exists())
        if op in ("$in", "$nin"):
            values = self.values(operand, where)
            found = field.any_of(values)
            return found if op == "$in" else _negated(found)
        scalar = self.scalar(operand, where)
        if op in COMPARISONS:
            if scalar is None or isinstance(scalar, bool):
                raise self.error(where, f"compares a string or a number, not {_type_name(scalar)}")
            return field.compared(COMPARISONS[op], scalar)
        equal = field.any_of([scalar])
        return equal if op == "$eq" else _negated(equal)

    def values(self, operand: Any, where: str) -> list[Scalar]:
        if not isinstance(operand, list | tuple):
            raise self.error(where, f"must be a list, not {_type_name(operand)}")
        if len(operand) > self.limits.max_values:
            raise self.error(
                where,
                f"a list may hold at most {self.limits.max_values} values "
                "(setting rag_filter_max_values)",
            )
        return [self.scalar(item, f"{where}[{i}]") for i, item in enumerate(operand)]

    def scalar(self, value: Any, where: str) -> Scalar:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
                raise self.error(where, "integers must fit in 64 bits")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(where, "numbers must be finite")
            return value
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise self.error(where, f"strings may be at most {MAX_STRING_CHARS} characters")
            _check_text(value, where, self.error)
            return value
        raise self.error(
            where,
            f"a value must be a string, number, boolean or null, not {_type_name(value)}"
            + (" (operators start with $)" if isinstance(value, Mapping) else ""),
        )


def _check_key(key: str, where: str, error: Any) -> None:
    if not key or len(key) > MAX_KEY_CHARS:
        raise error(where, f"a field name must be 1 to {MAX_KEY_CHARS} characters")
    # SQLite's JSON path cannot quote these inside a key.
    if any(ch in '"\\' or ord(ch) < 0x20 for ch in key):
        raise error(where, "a field name may not contain quotes, backslashes or control characters")
    _check_text(key, where, error)


def _check_text(text: str, where: str, error: Any) -> None:
    # A lone surrogate (possible from Python callers, not from JSON) cannot be bound.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(where, "strings must be valid Unicode (no lone surrogates)") from None


class _Field:
    """One field as SQL: a store column, or a key of the document's metadata JSON."""

    def __init__(self, key: str) -> None:
        self.column = STORE_FIELDS.get(key)
        self.path = f'$."{key}"'

    def _each(self, condition: Fragment) -> Fragment:
        """`condition` over the field's value, or over any element when it is a list;
        `t` is the value's JSON type and `a` the value."""
        if self.column is not None:
            sql = condition[0].replace("{t}", f"typeof({self.column})").replace("{a}", self.column)
            return f"({sql})", condition[1]
        sql = condition[0].replace("{t}", "j.type").replace("{a}", "j.atom")
        # json_each of a scalar is that one value; of an object, its members (never a match:
        # j.key is then their names).
        return (
            "EXISTS (SELECT 1 FROM json_each(d.metadata, ?) j"
            f" WHERE typeof(j.key) IN ('null', 'integer') AND ({sql}))",
            [self.path, *condition[1]],
        )

    def _missing(self) -> Fragment:
        if self.column is not None:
            return "0", []
        return "json_type(d.metadata, ?) IS NULL", [self.path]

    def exists(self) -> Fragment:
        if self.column is not None:
            return "1", []
        return "json_type(d.metadata, ?) IS NOT NULL", [self.path]

    def compared(self, sign: str, value: str | int | float) -> Fragment:
        kind = "= 'text'" if isinstance(value, str) else f"IN {_NUMBER}"
        return self._each((f"{{t}} {kind} AND {{a}} {sign} ?", [value]))

    def any_of(self, values: list[Scalar]) -> Fragment:
        """Equal to one of `values`; null also matches a missing key."""
        texts = [v for v in values if isinstance(v, str)]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        kinds = sorted({"true" if v else "false" for v in values if isinstance(v, bool)})
        if any(v is None for v in values):
            kinds.append("null")
        parts: list[Fragment] = []
        # Lists are bound as one JSON array each, so a long $in never nears SQLite's
        # parameter limit.
        if texts:
            parts.append(
                ("({t} = 'text' AND {a} IN (SELECT value FROM json_each(?)))", [_j(texts)])
            )
        if numbers:
            parts.append(
                (
                    f"({{t}} IN {_NUMBER} AND {{a}} IN (SELECT value FROM json_each(?)))",
                    [_j(numbers)],
                )
            )
        if kinds:
            parts.append(("{t} IN (" + ", ".join(f"'{k}'" for k in kinds) + ")", []))
        if not parts:
            return "0", []  # $in: [] matches nothing
        found = self._each(_joined(parts, " OR "))
        if "null" in kinds:
            return _joined([found, self._missing()], " OR ")
        return found


def _j(values: list[Any]) -> str:
    return json.dumps(values, ensure_ascii=False)


def _joined(parts: list[Fragment], glue: str) -> Fragment:
    if len(parts) == 1:
        return parts[0]
    return "(" + glue.join(sql for sql, _ in parts) + ")", [p for _, ps in parts for p in ps]


def _negated(fragment: Fragment) -> Fragment:
    # Every condition built here is 0 or 1, never NULL, so NOT is the exact complement.
    return f"NOT ({fragment[0]})", fragment[1]
