"""Test files: `<name>.test.yaml` beside the workflow `<name>.yaml`, holding its cases.

Loading checks the file's shape (known keys, types, matchers, mock files) and every problem
becomes an Issue at its file:line:col; a case with a problem is reported as an error and not
run, the file's other cases still are. Checks against the workflow itself (mocked steps,
model roles, the input against input_schema) come once it has compiled (`check_against`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.hints import suggest
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.issues import Path as KeyPath
from engine.dsl.source import Document, load_file
from engine.errors import InvalidRequest
from engine.runtime.executor import RunLimits
from engine.runtime.inputs import prepare_input
from engine.runtime.trace import COMPLETED, FAILED, PARTIAL, StepRecord
from engine.testing.matchers import check_expected

TEST_SUFFIXES = (".test.yaml", ".test.yml")
FILE_KEYS = ("workflow", "cases")
CASE_KEYS = ("name", "description", "input", "config", "models", "mocks", "expect")
EXPECT_KEYS = ("status", "output", "steps", "error")
STATUSES = (COMPLETED, PARTIAL, FAILED)
# What `expect.steps.<id>` may check: the fields of a step's trace entry, and its output.
STEP_FIELDS = (*(f.name for f in fields(StepRecord) if f.name != "step_id"), "output")
_LIMITS = RunLimits()


def is_test_file(path: Path) -> bool:
    return path.name.endswith(TEST_SUFFIXES)


def workflow_stem(path: Path) -> str:
    """`rag.test.yaml` -> `rag`."""
    return next(path.name[: -len(s)] for s in TEST_SUFFIXES if path.name.endswith(s))


@dataclass
class Case:
    name: str
    index: int  # in the file's `cases` list
    input: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    models: dict[str, str] = field(default_factory=dict)
    mocks: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    @property
    def where(self) -> KeyPath:
        return ("cases", self.index)

    @property
    def status(self) -> str:
        """The run status expected: `failed` when only an error is expected."""
        default = FAILED if "error" in self.expect else COMPLETED
        status: str = self.expect.get("status", default)
        return status


@dataclass
class TestFile:
    __test__ = False  # not a pytest test class, whatever its name

    path: Path
    doc: Document
    workflow: str | None  # `workflow:` as written: a file (relative to this one) or an id
    cases: list[Case]
    issues: list[Issue]  # about the file as a whole: none of its cases can run

    def issue(self, message: str, path: KeyPath, *, at_key: bool = False) -> Issue:
        return self.doc.issue(message, path, at_key=at_key)


def load_test_file(path: Path) -> TestFile:
    """The file's cases, each with the issues of its own part of the file."""
    try:
        doc = load_file(path)
    except WorkflowInvalid as exc:
        return TestFile(path, Document(None, str(path)), None, [], exc.issues)
    test = TestFile(path, doc, None, [], [])
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        message = "a test file is a mapping with a non-empty 'cases' list (docs/testing.md)"
        test.issues.append(doc.issue(message, ("cases",) if isinstance(data, dict) else ()))
        return test
    test.issues += _unknown_keys(test, data, FILE_KEYS, (), "in a test file")
    workflow = data.get("workflow")
    if workflow is not None and not isinstance(workflow, str):
        test.issues.append(
            doc.issue("workflow must be a file name or a workflow id", ("workflow",))
        )
    test.workflow = workflow if isinstance(workflow, str) else None
    seen: dict[str, int] = {}
    for index, raw in enumerate(data["cases"]):
        case = _load_case(test, raw, index)
        if case.name in seen:
            first = doc.values.get(("cases", seen[case.name], "name"))
            at = f" (first at line {first[0]})" if first else ""
            case.issues.append(
                doc.issue(f"duplicate case name '{case.name}'{at}", (*case.where, "name"))
            )
        elif case.name:
            seen[case.name] = index
        test.cases.append(case)
    return test


def _unknown_keys(
    test: TestFile, data: dict[str, Any], allowed: tuple[str, ...], where: KeyPath, what: str
) -> list[Issue]:
    listed = f" (allowed: {', '.join(allowed)})"
    return [
        test.issue(
            f"unknown key '{key}' {what}{suggest(key, allowed) or listed}",
            (*where, key),
            at_key=True,
        )
        for key in data
        if key not in allowed
    ]


def _load_case(test: TestFile, raw: Any, index: int) -> Case:
    case = Case(name="", index=index)
    at = case.where
    if not isinstance(raw, dict):
        case.issues.append(test.issue("a case is a mapping with a 'name'", at))
        return case
    issues = case.issues
    issues += _unknown_keys(test, raw, CASE_KEYS, at, "in a case")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        issues.append(test.issue("a case needs a 'name' (a non-empty string)", (*at, "name")))
    else:
        case.name = name
    for key in ("input", "config", "models", "mocks", "expect"):
        if key in raw and not isinstance(raw[key], dict):
            issues.append(test.issue(f"{key} must be a mapping", (*at, key)))
    case.input = _mapping(raw, "input")
    case.config = raw["config"] if isinstance(raw.get("config"), dict) else None
    case.models = _mapping(raw, "models")
    for role, model in case.models.items():
        if not isinstance(model, str):
            issues.append(test.issue(f"models.{role} must be a string", (*at, "models", role)))
    case.mocks = {
        sid: _mock(test, value, (*at, "mocks", sid), issues)
        for sid, value in _mapping(raw, "mocks").items()
    }
    case.expect = _mapping(raw, "expect")
    issues += _check_expect(test, case.expect, (*at, "expect"))
    return case


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _mock(test: TestFile, value: Any, where: KeyPath, issues: list[Issue]) -> Any:
    """A mock's output: the value itself, or the JSON of `{file: PATH}`."""
    if not (isinstance(value, dict) and list(value) == ["file"]):
        return value
    name = value["file"]
    if not isinstance(name, str):
        issues.append(test.issue("file must be a path to a JSON file", (*where, "file")))
        return None
    path = test.path.parent / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        issues.append(test.issue(f"cannot read mock file {path}: {exc}", (*where, "file")))
    except (json.JSONDecodeError, RecursionError) as exc:
        issues.append(test.issue(f"mock file {path} is not JSON: {exc}", (*where, "file")))
    return None


def _check_expect(test: TestFile, expect: dict[str, Any], at: KeyPath) -> list[Issue]:
    issues = _unknown_keys(test, expect, EXPECT_KEYS, at, "in expect")
    status = expect.get("status")
    if "status" in expect and status not in STATUSES:
        issues.append(test.issue(f"status must be one of {', '.join(STATUSES)}", (*at, "status")))
    for key in ("output", "error"):
        if key in expect:
            issues += _matcher_issues(test, expect[key], (*at, key))
    steps = expect.get("steps", {})
    if not isinstance(steps, dict):
        return [*issues, test.issue("steps must be a mapping of step ids", (*at, "steps"))]
    for sid, checks in steps.items():
        where = (*at, "steps", sid)
        if not isinstance(checks, dict):
            message = f"steps.{sid} must be a mapping of trace fields (or output)"
            issues.append(test.issue(message, where))
            continue
        issues += _unknown_keys(test, checks, STEP_FIELDS, where, "in a step's expectation")
        for key, value in checks.items():
            issues += _matcher_issues(test, value, (*where, key))
    return issues


def _matcher_issues(test: TestFile, expected: Any, where: KeyPath) -> list[Issue]:
    # Every problem of a matcher is about one of its keys (the matcher's name, or a key
    # of the schema it holds): placed there.
    return [test.issue(m, p, at_key=True) for m, p in check_expected(expected, where)]


async def check_against(test: TestFile, case: Case, wf: CompiledWorkflow) -> None:
    """Add the case's issues with the workflow it tests: unknown steps and roles, an input
    the workflow's input_schema refuses. The input is replaced by its checked copy."""
    at = case.where
    for key, names, what in (
        ("mocks", case.mocks, "step"),
        ("models", case.models, "model role"),
        ("steps", case.expect.get("steps") or {}, "step"),
    ):
        known = wf.models if key == "models" else wf.steps
        where = (*at, "expect", "steps") if key == "steps" else (*at, key)
        for name in names:
            if name not in known:
                message = f"workflow '{wf.id}' has no {what} '{name}'{suggest(name, known)}"
                case.issues.append(test.issue(message, (*where, name), at_key=True))
    try:
        case.input = await prepare_input(wf.input_schema, case.input, _LIMITS.schemas)
    except InvalidRequest as exc:
        pointer = (exc.param or "input").removeprefix("input")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        inner = tuple(int(p) if p.isdigit() else p for p in parts)
        message = exc.message.removeprefix(f"{exc.param}: ")  # the issue's path says where
        case.issues.append(test.issue(message, (*at, "input", *inner)))
