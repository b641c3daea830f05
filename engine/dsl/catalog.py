"""Workflow definitions by id: the files of a directory, plus any added at run time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.discovery import files_to_check
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.source import Document, load_file
from engine.errors import ErrorCode, NotFound
from engine.steps.registry import StepRegistry


def document_id(doc: Document, path: Path | None) -> str | None:
    data = doc.data if isinstance(doc.data, dict) else {}
    wf_id = data.get("id")
    if isinstance(wf_id, str):
        return wf_id
    return path.stem if path is not None else None


def compile_each(
    files: list[Path],
    registry: StepRegistry,
    extra_ids: Iterable[str] = (),
    taken: Mapping[str, Path] | None = None,
) -> dict[Path, CompiledWorkflow | list[Issue]]:
    """Each file's compiled workflow, or its issues; files are compiled against each other
    (a `workflow` step may call any of them by id), none stops the others from being
    checked. `taken`: ids other files already define (id -> file), which these may call but
    not define again. Files that cannot be read come first, then the others in order."""
    results: dict[Path, CompiledWorkflow | list[Issue]] = {}
    docs: dict[Path, Document] = {}
    for path in files:
        try:
            docs[path] = load_file(path)
        except WorkflowInvalid as exc:
            results[path] = exc.issues
    ids = {path: document_id(doc, path) for path, doc in docs.items()}
    seen: dict[str, Path] = dict(taken or {})
    known = {i for i in ids.values() if i} | set(extra_ids) | set(seen)
    for path, doc in docs.items():
        wf_id = ids[path] or path.stem
        if wf_id in seen:
            message = f"workflow id '{wf_id}' is also defined in {seen[wf_id]}"
            results[path] = [doc.issue(message, ("id",))]
            continue
        try:
            results[path] = compile_document(doc, registry, workflow_ids=known, default_id=wf_id)
            seen[wf_id] = path
        except WorkflowInvalid as exc:
            results[path] = exc.issues
    return results


def compile_files(
    files: list[Path], registry: StepRegistry, extra_ids: Iterable[str] = ()
) -> tuple[dict[str, CompiledWorkflow], dict[Path, list[Issue]]]:
    """compile_each's results split: the compiled workflows by id, the issues by file."""
    compiled: dict[str, CompiledWorkflow] = {}
    issues: dict[Path, list[Issue]] = {}
    for path, result in compile_each(files, registry, extra_ids).items():
        if isinstance(result, list):
            issues[path] = result
        else:
            compiled[result.id] = result
    return compiled, issues


class WorkflowCatalog:
    """Compiled workflows by id; the source a `workflow` step resolves ids against."""

    def __init__(self, registry: StepRegistry) -> None:
        self.registry = registry
        self._workflows: dict[str, CompiledWorkflow] = {}

    def load_directory(self, directory: str | Path) -> None:
        """Load every workflow file (engine.dsl.discovery's rule); any invalid file fails the
        load with all its issues."""
        compiled, issues = compile_files(files_to_check([directory]), self.registry, self.ids())
        if issues:
            raise WorkflowInvalid([i for found in issues.values() for i in found])
        self.update(add=compiled.values())

    def add(self, workflow: CompiledWorkflow) -> None:
        self.update(add=[workflow])

    def remove(self, workflow_id: str) -> None:
        self.update(remove=[workflow_id])

    def update(self, add: Iterable[CompiledWorkflow] = (), remove: Iterable[str] = ()) -> None:
        """Remove, then add, as one change: the catalog is replaced, never edited in place,
        so a reader (a lookup, an iteration) sees it wholly before or wholly after."""
        workflows = dict(self._workflows)
        for workflow_id in remove:
            workflows.pop(workflow_id, None)
        for workflow in add:
            workflows[workflow.id] = workflow
        self._workflows = workflows

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

    def __iter__(self) -> Iterator[CompiledWorkflow]:
        return iter(self._workflows.values())
