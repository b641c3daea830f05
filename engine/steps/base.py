"""The step-type plugin contract.

A step type is a class with a name, a JSON Schema for its parameters and an async ``run``.
The engine renders the step's templates, validates the rendered parameters against
``params_schema`` and calls ``run``; whatever ``run`` returns is the step's ``output``,
described by ``output_schema`` so the compiler can type templates that read it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import InvalidRequest

if TYPE_CHECKING:
    from engine.dsl.issues import Path
    from engine.models.registry import ModelRegistry
    from engine.rag.service import RagService

Emit = Callable[[str, Mapping[str, Any]], None]
RunWorkflow = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class StepServices:
    """The engine services a running step may use. A runner is given those it has: `fusion
    run` loads no models, so it has neither. `extra` carries plugins' own services by name
    (the tests' step types coordinate through one)."""

    models: ModelRegistry | None = None
    rag: RagService | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a running step may use besides its parameters."""

    step_id: str
    attempt: int
    services: StepServices
    emit: Emit
    run_workflow: RunWorkflow
    item: Any = None
    index: int | None = None

    @property
    def models(self) -> ModelRegistry:
        """The model registry; a request error where the runner has none."""
        if self.services.models is None:
            raise self._missing("models")
        return self.services.models

    @property
    def rag(self) -> RagService:
        """The RAG service; a request error where the runner has none."""
        if self.services.rag is None:
            raise self._missing("rag")
        return self.services.rag

    def _missing(self, name: str) -> InvalidRequest:
        return InvalidRequest(
            f"step '{self.step_id}' needs the engine's '{name}' service, which this runner "
            "does not provide: run the workflow on the server (`fusion serve`)"
        )


@dataclass
class CheckContext:
    """Static checks a plugin may run on its raw (unrendered) parameters."""

    report: Callable[[str, Path], None]  # message, path relative to the step
    workflow_ids: frozenset[str] | None  # known workflow ids, when a catalog is available
    compile_inline: Callable[[Any, Path], Any]  # compile an inline workflow definition
    extra: dict[str, Any] = field(default_factory=dict)


class StepPlugin:
    type_name: ClassVar[str]
    description: ClassVar[str] = ""
    params_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}
    # Parameters the engine must not treat as templates (e.g. an inline workflow whose
    # templates belong to the child run).
    raw_params: ClassVar[frozenset[str]] = frozenset()
    # Parameter naming the model a step calls, recorded in the trace.
    model_param: ClassVar[str | None] = None
    # JSON Schema of what run() returns, for every parameter value ({}: any JSON value).
    output_schema: ClassVar[dict[str, Any]] = {}
    # A parameter whose rendered value is the output (the template step): the compiler
    # infers the output's type from what is written there instead.
    output_param: ClassVar[str | None] = None

    def output_schema_for(self, params: Mapping[str, Any], prepared: Any) -> dict[str, Any]:
        """The output's schema for these raw (unrendered) parameters, narrower than
        ``output_schema`` where a parameter decides the shape (e.g. an operation)."""
        return self.output_schema

    def check(self, params: Mapping[str, Any], ctx: CheckContext) -> None:
        """Extra static validation beyond the JSON Schema; report problems via ctx.report."""

    def prepare(self, params: Mapping[str, Any], ctx: CheckContext) -> Any:
        """Compile-time state derived from raw parameters, passed to run as ``prepared``."""
        return None

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        raise NotImplementedError
