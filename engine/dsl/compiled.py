"""A compiled workflow: what the compiler (engine.dsl.compiler) builds from a valid
document and the runtime executes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from engine.dsl.types import ANY, Type
from engine.dsl.values import Value
from engine.steps.base import StepPlugin

DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True)
class RoleSpec:
    type: str
    optional: bool = False


@dataclass(frozen=True)
class RetrySpec:
    attempts: int = 1
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))


@dataclass(frozen=True)
class RepeatSpec:
    max: int
    until: Value


@dataclass
class CompiledStep:
    id: str
    type: str
    plugin: StepPlugin
    params: Value
    raw_params: dict[str, Any]
    prepared: Any = None
    when: Value | None = None
    for_each: Value | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    repeat: RepeatSpec | None = None
    retry: RetrySpec = field(default_factory=RetrySpec)
    timeout_s: float | None = None
    on_error: str = "fail"
    default: Value | None = None  # None: no default, the output is null
    deps: frozenset[str] = frozenset()
    guarded: frozenset[str] = frozenset()


@dataclass
class CompiledWorkflow:
    id: str
    name: str
    description: str
    version: int | str | None
    models: dict[str, RoleSpec]
    input_schema: dict[str, Any]
    config: dict[str, Any]
    steps: dict[str, CompiledStep]
    graph: nx.DiGraph
    output: Value | None
    definition: dict[str, Any]
    file: str | None = None
    output_schema: dict[str, Any] | None = None
    # What the output holds: output_schema's type, else inferred from `output`.
    output_type: Type = ANY

    @property
    def required_models(self) -> list[str]:
        return sorted({r.type for r in self.models.values() if not r.optional})

    @property
    def optional_models(self) -> list[str]:
        return sorted(role for role, r in self.models.items() if r.optional)

    def sinks(self) -> list[str]:
        return [s for s in self.steps if self.graph.out_degree(s) == 0]
