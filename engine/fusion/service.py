"""FusionService: what the §3 routes call. Orchestrate a workflow (predefined, composed,
or an inline "custom" definition), stream its events, store and fetch runs, list and
describe workflows, compose and delete custom ones, and report capabilities. It answers
with the dataclasses below (and the engine's own: StoredRun, ComposedInfo, Capabilities);
server/routes/fusion.py shapes them into HTTP bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.source import from_object
from engine.errors import ErrorCode, InvalidRequest, NotFound, StorageError
from engine.fusion import capabilities as caps
from engine.fusion.composed import ComposedInfo, ComposedWorkflows
from engine.fusion.runs import RunRequest, RunStore, StoredRun
from engine.runtime.executor import EventSink, new_run_id
from engine.runtime.inputs import prepare_input
from engine.runtime.trace import RunResult

if TYPE_CHECKING:
    from engine.dsl.catalog import WorkflowCatalog
    from engine.models.registry import ModelRegistry
    from engine.runtime.executor import Runner
    from engine.steps.registry import StepRegistry
    from engine.store import Store

log = structlog.get_logger(__name__)

CUSTOM = "custom"
PREDEFINED, COMPOSED, INLINE = "predefined", "custom", "inline"
# Runner events that describe the run as a whole: the stream's `result` event says it all.
_RUN_EVENTS = frozenset({"run_started", "run_finished", "run_cancelled"})
# A model type that can stand in for a role's type when the caller names it explicitly;
# echo (a fake model) for every type whose requests it serves, so tests and demos run
# any workflow without weights.
_SERVES = {
    "lm": frozenset({"lm", "multimodal", "echo"}),
    "embeddings": frozenset({"embeddings", "echo"}),
}
# The predefined workflows name their main model's role `generation`, so one `models`
# mapping serves them all; the names they used before are still accepted, with a
# deprecation warning, until ROLE_RENAMES_SUNSET (six months, spec §9's policy).
ROLE_RENAMES: dict[str, dict[str, str]] = {
    "multimodal_analysis": {"vision": "generation"},
    "sequential_summarization": {"summarizer": "generation"},
}
ROLE_RENAMES_SUNSET = "2027-05-27"


@dataclass(frozen=True)
class RequestWarning:
    """Something about the request (not the run) the caller should change, such as a
    deprecated role name; `param` names where it is."""

    code: str
    message: str
    param: str


@dataclass
class PreparedRun:
    """A request that passed every check: it will run, and end with a stored run (or an
    outcome saying why it could not be stored)."""

    run_id: str
    workflow: CompiledWorkflow
    source: str
    input: dict[str, Any]  # validated, defaults filled in
    given_input: Any
    models: dict[str, Any]  # every role bound (None for an unbound optional role)
    config: dict[str, Any] | None
    definition: dict[str, Any] | None  # an inline workflow's definition
    # One for each deprecated name the request used; `sunset` is the date they stop being
    # accepted (None: none used).
    warnings: list[RequestWarning] = field(default_factory=list)
    sunset: str | None = None


@dataclass
class RunOutcome:
    """A run that ended (completed, failed or partial), as stored, and whether it was: a
    full or read-only database leaves `stored` False with the error a write raised."""

    run: StoredRun
    stored: bool
    storage_error: StorageError | None
    warnings: list[RequestWarning]  # about the request: not stored with the run

    @property
    def result(self) -> RunResult:
        return self.run.result


@dataclass(frozen=True)
class RunEvent:
    """One event of a streamed run (step_started, step_finished, token, or one a step
    plugin emits) with its data."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class WorkflowInfo:
    """A workflow of the catalog, where it comes from (predefined or custom), and when a
    composed one was composed (None for a predefined one)."""

    workflow: CompiledWorkflow
    source: str
    created_at: str | None = None


class FusionService:
    """Orchestration (spec §3) over the engine's collaborators, given at construction."""

    def __init__(
        self,
        store: Store,
        steps: StepRegistry,
        catalog: WorkflowCatalog,
        models: ModelRegistry,
        runner: Runner,
        runs: RunStore,
    ) -> None:
        self.steps = steps
        self.catalog = catalog
        self.models = models
        self.runner = runner
        self.runs = runs
        self.composed = ComposedWorkflows(store, steps, catalog)
        self.composed.load()

    # -- orchestrate ----------------------------------------------------------------------
    async def prepare(
        self,
        workflow: str,
        input: Any = None,
        models: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        definition: dict[str, Any] | None = None,
    ) -> PreparedRun:
        """Every request error, before anything runs: unknown workflow (404), invalid
        inline definition or input (400, `param` naming where), a named model that is
        not loaded (404 `model_not_found`), a required role no loaded model can fill (503
        `model_not_loaded`)."""
        if workflow == CUSTOM and definition is not None:
            # A request's own definition (up to workflow_max_bytes) compiles off the loop.
            wf, source = await asyncio.to_thread(self.resolve, workflow, definition)
        else:
            wf, source = self.resolve(workflow, definition)
        prepared_input = await prepare_input(wf.input_schema, input, self.runner.limits.schemas)
        if config is not None and not isinstance(config, Mapping):
            raise InvalidRequest("config must be an object", param="config")
        models, warnings = _renamed_roles(wf, source, models or {})
        self.check_models(wf, models)
        bound = self.runner.bind_models(wf, models)
        return PreparedRun(
            run_id=new_run_id(),
            workflow=wf,
            source=source,
            input=prepared_input,
            given_input=input,
            models=bound,
            config=dict(config) if config is not None else None,
            definition=definition if source == INLINE else None,
            warnings=warnings,
            sunset=ROLE_RENAMES_SUNSET if warnings else None,
        )

    def resolve(
        self, workflow: str, definition: dict[str, Any] | None
    ) -> tuple[CompiledWorkflow, str]:
        if workflow != CUSTOM:
            if definition is not None:
                raise InvalidRequest(
                    f"'definition' is only read with workflow \"{CUSTOM}\" (got '{workflow}')",
                    param="definition",
                )
            wf = self.catalog.get(workflow)  # 404 invalid_workflow
            return wf, self.source_of(workflow)
        if definition is None:
            raise InvalidRequest(
                f"workflow \"{CUSTOM}\" runs the workflow given in 'definition'; it is missing",
                param="definition",
                code=ErrorCode.INVALID_WORKFLOW,
            )
        if not isinstance(definition, dict):
            raise InvalidRequest("definition must be an object", param="definition")
        try:
            wf = compile_document(
                from_object(definition),
                self.steps,
                workflow_ids=self.catalog.ids(),
                default_id=CUSTOM,
            )
        except WorkflowInvalid as exc:
            # Pointers into the request body, not into the definition alone.
            raise WorkflowInvalid(
                [Issue(i.message, ("definition", *i.path)) for i in exc.issues]
            ) from None
        return wf, INLINE

    def check_models(self, wf: CompiledWorkflow, given: Mapping[str, Any]) -> None:
        """A model the caller names for a role must be loaded and of the role's type."""
        registry = self.models
        for role, model_id in given.items():
            spec = wf.models.get(role)
            if model_id is None or spec is None:
                continue  # unbound: auto-selected; unknown role: the runner says so
            if not isinstance(model_id, str):
                raise InvalidRequest("a model id must be a string", param=f"models.{role}")
            entry = registry.find(model_id)
            if entry is None:
                raise NotFound(
                    f"model '{model_id}' given for role '{role}' (type '{spec.type}') is not "
                    "loaded: load it first (POST /v1/models/load)",
                    param=f"models.{role}",
                    code=ErrorCode.MODEL_NOT_FOUND,
                )
            if entry.type not in _SERVES.get(spec.type, {spec.type}):
                raise InvalidRequest(
                    f"role '{role}' needs a '{spec.type}' model; '{model_id}' is a "
                    f"'{entry.type}' model",
                    param=f"models.{role}",
                    code=ErrorCode.WRONG_MODEL_TYPE,
                )

    async def execute(self, run: PreparedRun, on_event: EventSink | None = None) -> RunOutcome:
        """Run and store the run. A run that ends failed or partial is a result like any
        other, not an error."""
        # Inline definitions choose their own ids: one label for all keeps the series bounded.
        label = CUSTOM if run.source == INLINE else run.workflow.id
        # Every log line of the run (its steps' tasks inherit the context) names it.
        try:
            with structlog.contextvars.bound_contextvars(
                run_id=run.run_id, workflow_id=run.workflow.id
            ):
                result = await self.runner.run(
                    run.workflow,
                    run.input,
                    models=run.models,
                    config=run.config,
                    on_event=on_event,
                    run_id=run.run_id,
                    input_checked=True,
                )
        except asyncio.CancelledError:
            self.models.metrics.observe_run(label, "cancelled")
            raise
        self.models.metrics.observe_run(label, result.status)
        request = RunRequest(run.given_input, run.config, run.definition)
        stored = StoredRun(result, run.source, run.models, request)
        error = await self.store_run(stored)
        return RunOutcome(stored, error is None, error, run.warnings)

    async def store_run(self, run: StoredRun) -> StorageError | None:
        """Store the run; None once stored. A full or read-only database must not lose
        the result the caller waited for: its error is returned, not raised."""
        try:
            # On the loop when the database is free (a thread hop costs more than the
            # insert); when another writer (a RAG ingest) holds the lock, wait for it in a
            # worker thread rather than stall every request. Encoded once for both.
            row = self.runs.encode(run)
            if not self.runs.try_insert(row):
                await asyncio.to_thread(self.runs.insert, row)
        except StorageError as exc:
            log.error("run_not_stored", run_id=run.result.run_id, code=exc.code, error=exc.message)
            return exc
        return None

    async def orchestrate(
        self,
        workflow: str,
        input: Any = None,
        models: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        definition: dict[str, Any] | None = None,
        on_event: EventSink | None = None,
    ) -> RunOutcome:
        return await self.execute(
            await self.prepare(workflow, input, models, config, definition), on_event
        )

    async def stream(self, run: PreparedRun) -> AsyncIterator[RunEvent | RunOutcome]:
        """The run's events in order: step_started, step_finished, token (and any other
        event a step plugin emits), then its RunOutcome. Closing the iterator early (the
        client went away) cancels the run; it is then not stored."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        task = asyncio.create_task(self.execute(run, on_event=queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                name = event.get("event")
                if name in _RUN_EVENTS or not isinstance(name, str):
                    continue
                yield RunEvent(name, {k: v for k, v in event.items() if k != "event"})
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                log.info("run_cancelled", run_id=run.run_id, workflow_id=run.workflow.id)

    def get_run(self, run_id: str) -> StoredRun:
        return self.runs.get(run_id)

    # -- workflows ------------------------------------------------------------------------
    def source_of(self, wf_id: str) -> str:
        return COMPOSED if wf_id in self.composed.active else PREDEFINED

    def info(self, wf: CompiledWorkflow) -> WorkflowInfo:
        composed = self.composed.active.get(wf.id)
        if composed is None:
            return WorkflowInfo(wf, PREDEFINED)
        return WorkflowInfo(wf, COMPOSED, composed.created_at)

    def list_workflows(self) -> list[WorkflowInfo]:
        """Predefined workflows, then composed ones, each by id."""
        infos = [self.info(wf) for wf in self.catalog]
        return sorted(infos, key=lambda i: (i.source != PREDEFINED, i.workflow.id))

    def get_workflow(self, wf_id: str) -> WorkflowInfo:
        return self.info(self.catalog.get(wf_id))

    def compose(self, body: dict[str, Any]) -> ComposedInfo:
        return self.composed.compose(body)

    def delete_workflow(self, wf_id: str) -> ComposedInfo:
        return self.composed.delete(wf_id)

    # -- capabilities ---------------------------------------------------------------------
    def capabilities(self, capability: str | None = None) -> caps.Capabilities:
        return caps.capabilities(self.models.entries(), capability)


def _renamed_roles(
    wf: CompiledWorkflow, source: str, models: Mapping[str, Any]
) -> tuple[dict[str, Any], list[RequestWarning]]:
    """The caller's role -> model mapping with the predefined workflows' old role names
    replaced by the new ones, and a `deprecated_role` warning for each."""
    renames = ROLE_RENAMES.get(wf.id, {}) if source == PREDEFINED else {}
    renamed: dict[str, Any] = {}
    warnings: list[RequestWarning] = []
    for role, model in models.items():
        new = renames.get(role)
        # A workflows directory may hold its own file of that id, still using the old name.
        if new is None or role in wf.models or new not in wf.models:
            renamed[role] = model
            continue
        if new in models:
            raise InvalidRequest(
                f"models.{role} is the old name of role '{new}' of workflow '{wf.id}': "
                f"give only models.{new}",
                param=f"models.{role}",
            )
        renamed[new] = model
        message = (
            f"model role '{role}' of workflow '{wf.id}' is now named '{new}': pass "
            f"models.{new}; the old name is accepted until {ROLE_RENAMES_SUNSET}"
        )
        warnings.append(RequestWarning("deprecated_role", message, f"models.{role}"))
        log.info("deprecated_role", workflow_id=wf.id, role=role, renamed_to=new)
    return renamed, warnings
