"""Call another workflow, by id or defined inline, as one step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from engine.dsl.compiled import CompiledWorkflow
from engine.runtime.trace import FAILED
from engine.steps.base import CheckContext, StepContext, StepPlugin


class WorkflowStep(StepPlugin):
    type_name = "workflow"
    description = (
        "Run another workflow (its id, or an inline definition) with the given input; the "
        "output is that workflow's output. Nesting is bounded."
    )
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "workflow": {
                "anyOf": [{"type": "string", "minLength": 1}, {"type": "object"}],
                "description": "A workflow id, or an inline workflow definition.",
            },
            "input": {"type": "object", "description": "The called workflow's input."},
            "models": {
                "type": "object",
                "additionalProperties": {"type": ["string", "null"]},
                "description": "Role bindings (default: the caller's, for the same role names).",
            },
            "config": {"type": "object"},
        },
        "required": ["workflow"],
    }
    raw_params = frozenset({"workflow"})

    def output_schema_for(self, params: Mapping[str, Any], prepared: Any) -> dict[str, Any]:
        # An inline workflow's output is known; one called by id may be replaced at run time.
        if isinstance(prepared, CompiledWorkflow):
            return prepared.output_type.to_schema()
        return self.output_schema

    def check(self, params: Mapping[str, Any], ctx: CheckContext) -> None:
        target = params.get("workflow")
        known = ctx.workflow_ids
        if isinstance(target, str) and known is not None and target not in known:
            listed = ", ".join(sorted(known)) or "none"
            ctx.report(f"unknown workflow '{target}' (known: {listed})", ("workflow",))

    def prepare(self, params: Mapping[str, Any], ctx: CheckContext) -> Any:
        target = params.get("workflow")
        if isinstance(target, dict):
            return ctx.compile_inline(target, ("workflow",))
        return target

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        result = await ctx.run_workflow(
            prepared, params.get("input"), params.get("models"), params.get("config")
        )
        if result.status == FAILED:
            raise RuntimeError(f"workflow '{result.workflow_id}' failed: {result.error}")
        return result.output
