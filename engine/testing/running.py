"""Run a test file's cases, one after another, in-process with the plain Runner (or, for a
case that names models to load, a runner on engine/testing/models.py's engine), and compare
each run with what the case expects."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.dsl.catalog import WorkflowCatalog, compile_files
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.discovery import WORKFLOW_SUFFIXES, files_to_check
from engine.dsl.hints import suggest
from engine.dsl.issues import Issue
from engine.errors import FusionError
from engine.runtime.executor import Runner
from engine.runtime.trace import RunResult
from engine.steps.registry import StepRegistry
from engine.testing.cases import Case, TestFile, check_against, workflow_stem
from engine.testing.matchers import Mismatch, match
from engine.testing.models import CaseModels

PASSED, FAILED, ERROR = "passed", "failed", "error"


@dataclass
class Outcome:
    """One case's result; a test file that cannot run at all is one outcome with no case."""

    file: Path
    case: str | None
    status: str  # passed, failed or error
    duration_ms: float = 0.0
    problems: list[Issue] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.file}::{self.case}" if self.case is not None else str(self.file)


class Workspace:
    """Compiled workflows of a test file's directory and of the workflows directory, so a
    test's workflow resolves, and so do the ids its `workflow` steps call; and the models
    its cases load (close() stops their engine)."""

    def __init__(
        self, registry: StepRegistry, workflows_dir: Path | None, models: CaseModels | None = None
    ) -> None:
        self.registry = registry
        self.workflows_dir = workflows_dir
        self.models = models or CaseModels()
        self._compiled: dict[Path, tuple[dict[str, CompiledWorkflow], dict[Path, list[Issue]]]] = {}

    def compiled(
        self, directory: Path
    ) -> tuple[dict[str, CompiledWorkflow], dict[Path, list[Issue]]]:
        found = self._compiled.get(directory)
        if found is None:
            # The test's own directory first: its workflows win an id both define.
            dirs = [directory, *([self.workflows_dir] if self.workflows_dir else [])]
            files: dict[Path, Path] = {}
            for path in files_to_check([str(d) for d in dirs if d.is_dir()]):
                files.setdefault(path.resolve(), path)
            found = self._compiled[directory] = compile_files(list(files.values()), self.registry)
        return found

    def resolve(self, test: TestFile) -> tuple[CompiledWorkflow, WorkflowCatalog] | list[Issue]:
        """The workflow a test file tests and the catalog it runs with, or why there is none."""
        compiled, issues = self.compiled(test.path.parent)
        catalog = WorkflowCatalog(self.registry)
        for workflow in compiled.values():
            catalog.add(workflow)
        ref = test.workflow
        if ref is not None and not ref.endswith(WORKFLOW_SUFFIXES):
            if ref in compiled:
                return compiled[ref], catalog
            hint = suggest(ref, compiled)
            return [test.issue(f"no workflow '{ref}' in {test.path.parent}{hint}", ("workflow",))]
        target = self._target(test)
        if isinstance(target, Issue):
            return [target]
        for path, found in issues.items():
            if path.resolve() == target.resolve():
                return found
        for workflow in compiled.values():
            if workflow.file is not None and Path(workflow.file).resolve() == target.resolve():
                return workflow, catalog
        # A file outside the directories searched, or one that does not look like a workflow.
        alone, problems = compile_files([target], self.registry, catalog.ids())
        if problems:
            return problems[target]
        workflow = next(iter(alone.values()))
        catalog.add(workflow)
        return workflow, catalog

    def _target(self, test: TestFile) -> Path | Issue:
        if test.workflow is not None:
            path = test.path.parent / test.workflow
            if path.is_file():
                return path
            return test.issue(f"no such workflow file: {path}", ("workflow",))
        stem = workflow_stem(test.path)
        for suffix in WORKFLOW_SUFFIXES:
            path = test.path.with_name(stem + suffix)
            if path.is_file():
                return path
        message = (
            f"no workflow file beside it ({stem}.yaml): name one with 'workflow: FILE' or an id"
        )
        return Issue(message, (), str(test.path), 1, 1)

    async def close(self) -> None:
        await self.models.close()


async def run_file(test: TestFile, cases: list[Case], workspace: Workspace) -> list[Outcome]:
    """The outcomes of ``cases`` (those of ``test`` that were selected)."""
    if test.issues:
        return [Outcome(test.path, None, ERROR, problems=test.issues)]
    resolved = workspace.resolve(test)
    if isinstance(resolved, list):
        return [Outcome(test.path, None, ERROR, problems=resolved)]
    workflow, catalog = resolved
    plain = Runner(catalog=catalog)
    outcomes = []
    for case in cases:
        if not case.issues:
            await check_against(test, case, workflow)
        if case.issues:
            outcomes.append(Outcome(test.path, case.name, ERROR, problems=case.issues))
            continue
        base = test.path.parent
        runner, models = plain, case.models
        if CaseModels.needed(case.models, base, workflow, case.mocks, catalog):
            try:
                runner, models = await workspace.models.runner(
                    case.models, base, workflow, case.mocks, catalog
                )
            except FusionError as exc:
                issue = test.issue(exc.message, (*case.where, "models"))
                outcomes.append(Outcome(test.path, case.name, ERROR, problems=[issue]))
                continue
        outcomes.append(await run_case(test, case, workflow, runner, models))
    return outcomes


async def run_case(
    test: TestFile, case: Case, wf: CompiledWorkflow, runner: Runner, models: dict[str, str]
) -> Outcome:
    started = time.perf_counter()
    try:
        result = await runner.run(
            wf,
            case.input,
            models=models,
            config=case.config,
            mocks=case.mocks,
            input_checked=True,
        )
    except FusionError as exc:  # a request error the checks before the run did not foresee
        issue = test.issue(f"the run was refused: {exc.message}", case.where)
        return Outcome(test.path, case.name, ERROR, _ms(started), [issue])
    mismatches = compare(case, result)
    problems = [_locate(test, m) for m in mismatches]
    return Outcome(test.path, case.name, FAILED if problems else PASSED, _ms(started), problems)


def compare(case: Case, result: RunResult) -> list[Mismatch]:
    """Where the run differs from what the case expects."""
    at = (*case.where, "expect")
    found: list[Mismatch] = []
    if result.status != case.status:
        why = f" ({result.error})" if result.error else _failed_steps(result)
        message = f"expected status {case.status}, got {result.status}{why}"
        found.append(Mismatch(message, ("status",), (*at, "status")))
    for key, actual in (("output", result.output), ("error", result.error)):
        if key in case.expect:
            found += match(case.expect[key], actual, (key,), (*at, key))
    records = {r.step_id: r.to_dict() for r in result.trace}
    for sid, checks in (case.expect.get("steps") or {}).items():
        record: dict[str, Any] = {**records.get(sid, {}), "output": result.step_outputs.get(sid)}
        for key, expected in checks.items():
            where = (*at, "steps", sid, key)
            found += match(expected, record.get(key), ("steps", sid, key), where)
    return found


def _failed_steps(result: RunResult) -> str:
    errors = [f"{r.step_id}: {r.error}" for r in result.trace if r.error]
    return f" ({'; '.join(errors)})" if errors else ""


def _locate(test: TestFile, mismatch: Mismatch) -> Issue:
    """The mismatch named by its path in the run, placed at its expectation in the file."""
    placed = test.issue(mismatch.message, mismatch.where)
    return Issue(mismatch.message, mismatch.path, placed.file, placed.line, placed.col)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
