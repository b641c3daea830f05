"""skipped-read: reading the output of a step that may have been skipped, unguarded."""

from __future__ import annotations

from jinja2 import nodes

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import GUARD_ATTRIBUTES
from engine.dsl.graph import may_skip
from engine.dsl.lint.base import Finding, Located, Severity, finding, mentions_step, templates
from engine.dsl.source import Document
from engine.dsl.templating import Template


class SkippedRead:
    """A read of ``steps.X.output`` where X may be skipped (it has a `when`, or a skip
    propagates to it) and X has no `default`, in a place that still runs when X is
    skipped: the workflow's `output`, or a step that guards X elsewhere (reads its `ran`
    or `status`, so the skip does not propagate). There the read silently gives `null`
    and the run still completes. Not a finding when the same template guards the read:
    ``steps.X.output if steps.X.ran else ...``, ``steps.X.output | default(..., true)``,
    ``steps.X.output is none``, ``steps.X.output or ...``. Null is defined, so neither
    ``is defined`` nor a plain ``default(...)`` (which replaces only undefined) guards.
    A step that reads X unguarded is skipped with it (skips propagate, docs/dsl.md), so it
    is no finding."""

    id = "skipped-read"
    severity = Severity.WARNING

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        skippable = {s for s in may_skip(workflow) if workflow.steps[s].default is None}
        found = []
        for located in templates(workflow):
            for target in sorted(_unguarded_reads(workflow, located, skippable)):
                why = (
                    "it has 'when'"
                    if workflow.steps[target].when is not None
                    else "a step it reads may be skipped"
                )
                message = (
                    f"steps.{target}.output is null when '{target}' is skipped ({why}); "
                    f"guard the read (steps.{target}.output if steps.{target}.ran else ..., "
                    f"or | default(..., true)) or give '{target}' a 'default'"
                )
                found.append(finding(self, doc, message, located.path))
        return found


def _unguarded_reads(workflow: CompiledWorkflow, located: Located, skippable: set[str]) -> set[str]:
    if located.part in ("when", "default"):
        return set()  # `when` skips the step itself; `default` runs when the step did not
    if located.step is not None and located.part != "output":
        runs_anyway = workflow.steps[located.step].guarded
    else:
        runs_anyway = frozenset(workflow.steps)  # the output is built whatever was skipped
    template = located.template
    return {
        str(ref.path[0])
        for ref in template.references
        if ref.root == "steps"
        and len(ref.path) > 1
        and ref.path[1] == "output"
        and str(ref.path[0]) in skippable
        and str(ref.path[0]) in runs_anyway
        and not _guards(template, str(ref.path[0]))
    }


def _guards(template: Template, step_id: str) -> bool:
    if any(
        ref.root == "steps"
        and len(ref.path) > 1
        and ref.path[0] == step_id
        and ref.path[1] in GUARD_ATTRIBUTES
        for ref in template.references
    ):
        return True
    for node in template.ast.find_all((nodes.Test, nodes.Filter, nodes.CondExpr, nodes.If)):
        guarded: nodes.Node | None
        if isinstance(node, nodes.Test):
            # A skipped step's output is null, which is defined: only other tests guard.
            guarded = node.node if node.name not in ("defined", "undefined") else None
        elif isinstance(node, nodes.Filter):
            guarded = node.node if node.name in ("default", "d") and _replaces_null(node) else None
        elif isinstance(node, nodes.CondExpr | nodes.If):
            guarded = None if _is_defined_test(node.test) else node.test
        else:
            guarded = None
        if guarded is not None and mentions_step(guarded, step_id):
            return True
    return any(mentions_step(node.left, step_id) for node in template.ast.find_all(nodes.Or))


def _replaces_null(node: nodes.Filter) -> bool:
    """``default(value, true)``: without its boolean argument `default` keeps a null."""
    flags = [*node.args[1:2], *(k.value for k in node.kwargs if k.key == "boolean")]
    return any(isinstance(f, nodes.Const) and f.value for f in flags)


def _is_defined_test(node: nodes.Node) -> bool:
    while isinstance(node, nodes.Not):
        node = node.node
    return isinstance(node, nodes.Test) and node.name in ("defined", "undefined")
