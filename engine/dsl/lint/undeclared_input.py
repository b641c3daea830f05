"""undeclared-input: a read of an input field the input_schema does not declare."""

from __future__ import annotations

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.hints import suggest
from engine.dsl.lint.base import Finding, Severity, finding, templates
from engine.dsl.source import Document


class UndeclaredInput:
    """``{{ input.NAME }}`` where input_schema lists `properties` and NAME is not one of
    them: a caller following the schema never passes NAME, so the template fails at run
    time. A schema that spells out `additionalProperties` or `patternProperties` says
    which other fields it takes, and the type checker judges those reads instead; a
    schema without `properties` declares nothing to compare with."""

    id = "undeclared-input"
    severity = Severity.ERROR

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        schema = workflow.input_schema
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return []
        if "additionalProperties" in schema or "patternProperties" in schema:
            return []
        found = []
        for located in templates(workflow):
            names = {
                ref.path[0]
                for ref in located.template.references
                if ref.root == "input" and ref.path and isinstance(ref.path[0], str)
            }
            for name in sorted(str(n) for n in names - set(props)):
                message = (
                    f"input_schema does not declare input field '{name}'"
                    f"{suggest(name, props)}; declared: {', '.join(props)}"
                )
                found.append(finding(self, doc, message, located.path))
        return found
