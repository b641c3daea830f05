"""repeat-without-until: a `repeat` whose stop condition never changes."""

from __future__ import annotations

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Severity, finding, step_path
from engine.dsl.source import Document
from engine.dsl.values import Literal


class RepeatWithoutUntil:
    """A `repeat` without `until` (or with a constant one) runs exactly `max` passes,
    or one pass when `until` is a true constant: the loop has no condition to meet.
    Repeating a fixed number of times reads better as a `for_each` over
    ``{{ range(n) }}``; a refinement loop needs an `until` that reads `output`."""

    id = "repeat-without-until"
    severity = Severity.WARNING

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        found = []
        for sid, step in workflow.steps.items():
            if step.repeat is None or not isinstance(step.repeat.until, Literal):
                continue
            path = (*step_path(workflow, sid), "repeat")
            raw = step.repeat.until.value
            if raw is False:
                message = (
                    f"repeat has no 'until': it always runs max ({step.repeat.max}) passes; "
                    "add an 'until' that reads 'output', or use for_each over range(n)"
                )
            else:
                runs = "one pass" if raw else f"max ({step.repeat.max}) passes"
                message = f"repeat's 'until' is the constant {raw!r}: it always runs {runs}"
            found.append(finding(self, doc, message, path, at_key=True))
        return found
