"""unused-config: a `config` key no template reads."""

from __future__ import annotations

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.lint.base import Finding, Severity, finding, templates
from engine.dsl.source import Document


class UnusedConfig:
    """A key under `config` that no template of the workflow reads (``config.KEY``):
    leftover or misspelt. A template that reads `config` whole, or by a computed key,
    may read any key, and then no key is reported."""

    id = "unused-config"
    severity = Severity.INFO

    def check(self, workflow: CompiledWorkflow, doc: Document) -> list[Finding]:
        read: set[str] = set()
        for located in templates(workflow):
            for ref in located.template.references:
                if ref.root != "config":
                    continue
                if not ref.path:
                    return []
                read.add(str(ref.path[0]))
        return [
            finding(
                self,
                doc,
                f"config key '{key}' is not read by any template",
                ("config", key),
                at_key=True,
            )
            for key in workflow.config
            if key not in read
        ]
