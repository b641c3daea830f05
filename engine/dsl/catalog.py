"""Workflow definitions by id: the files of a directory, plus any added at run time."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.source import Document, load_file
from engine.errors import ErrorCode, NotFound
from engine.steps.registry import StepRegistry

WORKFLOW_SUFFIXES = (".yaml", ".yml", ".json")


def workflow_files(paths: Iterable[str | Path]) -> list[Path]:
    """The workflow files named, directories searched recursively, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.suffix in WORKFLOW_SUFFIXES and p.is_file())
            )
        else:
            found.append(path)
    return found


def document_id(doc: Document, path: Path | None) -> str | None:
    data = doc.data if isinstance(doc.data, dict) else {}
    wf_id = data.get("id")
    if isinstance(wf_id, str):
        return wf_id
    return path.stem if path is not None else None


def compile_files(
    files: list[Path], registry: StepRegistry, extra_ids: Iterable[str] = ()
) -> tuple[dict[str, CompiledWorkflow], dict[Path, list[Issue]]]:
    """Compile files against each other (a `workflow` step may call any of them by id);
    every file's issues are collected, none stops the others from being checked."""
    docs: dict[Path, Document] = {}
    issues: dict[Path, list[Issue]] = {}
    for path in files:
        try:
            docs[path] = load_file(path)
        except WorkflowInvalid as exc:
            issues[path] = exc.issues
    ids = {path: document_id(doc, path) for path, doc in docs.items()}
    known = {i for i in ids.values() if i} | set(extra_ids)
    compiled: dict[str, CompiledWorkflow] = {}
    seen: dict[str, Path] = {}
    for path, doc in docs.items():
        wf_id = ids[path]
        if wf_id in seen:
            issues.setdefault(path, []).append(
                doc.issue(f"workflow id '{wf_id}' is also defined in {seen[wf_id]}", ("id",))
            )
            continue
        try:
            compiled[wf_id or path.stem] = compile_document(
                doc, registry, workflow_ids=known, default_id=wf_id
            )
            seen[wf_id or path.stem] = path
        except WorkflowInvalid as exc:
            issues.setdefault(path, []).extend(exc.issues)
    return compiled, issues


class WorkflowCatalog:
    """Compiled workflows by id; the source a `workflow` step resolves ids against."""

    def __init__(self, registry: StepRegistry) -> None:
        self.registry = registry
        self._workflows: dict[str, CompiledWorkflow] = {}

    def load_directory(self, directory: str | Path) -> None:
        """Load every workflow file; any invalid file fails the load with all its issues."""
        compiled, issues = compile_files(workflow_files([directory]), self.registry, self.ids())
        if issues:
            raise WorkflowInvalid([i for found in issues.values() for i in found])
        self._workflows.update(compiled)

    def add(self, workflow: CompiledWorkflow) -> None:
        self._workflows[workflow.id] = workflow

    def remove(self, workflow_id: str) -> None:
        self._workflows.pop(workflow_id, None)

    def ids(self) -> frozenset[str]:
        return frozenset(self._workflows)

    def get(self, workflow_id: str) -> CompiledWorkflow:
        try:
            return self._workflows[workflow_id]
        except KeyError:
            raise NotFound(
                f"workflow '{workflow_id}' not found",
                param="workflow",
                code=ErrorCode.INVALID_WORKFLOW,
            ) from None

    def __iter__(self):
        return iter(self._workflows.values())
