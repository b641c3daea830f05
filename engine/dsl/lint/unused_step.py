"""unused-step: a step whose result nothing uses."""

from __future__ import annotations

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Severity, finding, step_path, templates
from engine.dsl.source import Document


class UnusedStep:
    """A step that no other step reads or waits for (`depends_on`) and that the workflow's
    `output` does not read: its work is thrown away. Only when `output` is written: without
    it the result is every such step's output. No step type exists for its side effects
    (model calls, searches, chunking and child workflows only compute), so none is exempt."""

    id = "unused-step"
    severity = Severity.WARNING

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        if workflow.output is None:
            return []
        read_by_output = {
            str(ref.path[0])
            for located in templates(workflow)
            if located.part == "output"
            for ref in located.template.references
            if ref.root == "steps" and ref.path
        }
        return [
            finding(
                self,
                doc,
                f"step '{sid}' is not used: no step reads it or depends on it, "
                "and 'output' does not read it",
                (*step_path(workflow, sid), "step_id"),
            )
            for sid in workflow.steps
            if workflow.graph.out_degree(sid) == 0 and sid not in read_by_output
        ]
