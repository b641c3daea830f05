"""The pure step type: its output is its rendered ``value``."""

from __future__ import annotations

from typing import Any, ClassVar

from engine.steps.base import StepContext, StepPlugin


class TemplateStep(StepPlugin):
    type_name = "template"
    description = "Render a value (any JSON value with templates) as the step's output."
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"value": {"description": "The value to render; templates allowed."}},
        "required": ["value"],
    }

    # Any JSON value; the compiler types it from the written `value`.
    output_param = "value"

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        return params["value"]
