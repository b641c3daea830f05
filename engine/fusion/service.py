"""FusionService: what the §3 routes call. Orchestrate a workflow (predefined, composed,
or an inline "custom" definition), stream its events, store and fetch runs, list and
describe workflows, compose and delete custom ones, and report capabilities. It answers
with the dataclasses below (and the engine's own: StoredRun, ComposedInfo, Capabilities);
server/routes/fusion.py shapes them into HTTP bodies."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from engine.clock import utc_iso
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.source import from_object
from engine.errors import (
    Conflict,
    ErrorCode,
    InvalidRequest,
    NotFound,
    RecordTooLarge,
    StorageError,
)
from engine.fusion import capabilities as caps
from engine.fusion import runs as stored_runs
from engine.fusion.composed import ComposedInfo, ComposedWorkflows
from engine.fusion.live import CANCELLED, Dropped, LiveRun, LiveRuns, RunEvent, Subscription
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
    """A run that ended (completed, failed, partial or cancelled), as stored, and whether
    it was: a full or read-only database leaves `stored` False with the error a write
    raised."""

    run: StoredRun
    stored: bool
    storage_error: StorageError | None
    warnings: list[RequestWarning]  # about the request: not stored with the run

    @property
    def result(self) -> RunResult:
        return self.run.result


@dataclass(frozen=True)
class Cancelled:
    """A run stopped by POST /api/fusion/runs/{id}/cancel: as stored, and when."""

    outcome: RunOutcome
    cancelled_at: str


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
        *,
        update_interval_s: float = 0.5,
        max_events: int = 10_000,
    ) -> None:
        """update_interval_s: least seconds between two writes of a running run's row
        (setting runs_update_interval_s); max_events: events a running run keeps for the
        clients that follow it, and the most one client may fall behind (run_events_max)."""
        self.steps = steps
        self.catalog = catalog
        self.models = models
        self.runner = runner
        self.runs = runs
        self.live = LiveRuns()
        self.update_interval_s = update_interval_s
        self.max_events = max_events
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

    # -- running a run ----------------------------------------------------------------------
    # A run belongs to the engine, not to the request: it runs as a task of its own, kept
    # in `self.live` while it runs; requests wait for it or follow its events.
    def start(self, run: PreparedRun, on_event: EventSink | None = None) -> LiveRun:
        """Start the run as the engine's task; `on_event` (if given) sees each runner
        event as it happens, as well as the run's followers."""
        live = LiveRun(run, max_events=self.max_events)
        self.live.add(live)
        live.task = asyncio.create_task(self._drive(live, on_event), name=f"run:{run.run_id}")
        return live

    async def execute(
        self,
        run: PreparedRun,
        on_event: EventSink | None = None,
        *,
        detach: bool = False,
        cancel_reason: str = "cancelled: what started it (a request or job) was cancelled",
    ) -> RunOutcome:
        """Run and store the run. A run that ends failed or partial is a result like any
        other, not an error. When the caller is cancelled (a client that went away, a job
        that stopped), the run is cancelled too (stored `cancelled` with `cancel_reason`),
        unless `detach`: then it runs on to its end and is stored."""
        live = self.start(run, on_event)
        assert live.task is not None
        try:
            return await asyncio.shield(live.task)
        except asyncio.CancelledError:
            if not detach and live.cancel(cancel_reason):
                await asyncio.gather(live.task, return_exceptions=True)
            elif detach:
                log.info("run_detached", run_id=run.run_id, workflow_id=run.workflow.id)
            raise

    async def _drive(self, live: LiveRun, on_event: EventSink | None) -> RunOutcome:
        """The run's task: store it as started, run it (its row updated as steps finish),
        store its end, and tell its followers."""
        run = live.run
        try:
            await self._write(self._started_write(live), run.run_id)
            progress = asyncio.create_task(self._write_progress(live))
            try:
                result = await self._execute(live, on_event)
            finally:
                live.phase = "finishing"
                progress.cancel()
            # Inline definitions choose their own ids: one label for all keeps the series
            # bounded.
            label = CUSTOM if run.source == INLINE else run.workflow.id
            self.models.metrics.observe_run(label, result.status)
            request = RunRequest(run.given_input, run.config, run.definition)
            stored = StoredRun(result, run.source, run.models, request)
            error = await self.store_run(stored)
            outcome = RunOutcome(stored, error is None, error, run.warnings)
            live.finish(outcome)
            return outcome
        finally:
            self.live.remove(run.run_id)

    async def _execute(self, live: LiveRun, on_event: EventSink | None) -> RunResult:
        """The runner's result; a cancelled run's (cancel()) as it stopped."""
        run = live.run
        if live.cancel_reason is not None:  # cancelled while its row was being written
            return live.cancelled()

        def sink(event: dict[str, Any]) -> None:
            name = event.get("event")
            if isinstance(name, str) and name not in _RUN_EVENTS:
                live.publish(RunEvent(name, {k: v for k, v in event.items() if k != "event"}))
            if on_event is not None:
                on_event(event)

        live.phase = "executing"
        task = asyncio.current_task()
        assert task is not None
        try:
            # Every log line of the run (its steps' tasks inherit the context) names it.
            with structlog.contextvars.bound_contextvars(
                run_id=run.run_id, workflow_id=run.workflow.id
            ):
                return await self.runner.run(
                    run.workflow,
                    run.input,
                    models=run.models,
                    config=run.config,
                    on_event=sink,
                    run_id=run.run_id,
                    input_checked=True,
                    trace_parent=live.root,
                )
        except asyncio.CancelledError:
            if live.cancel_reason is None:
                raise  # not a cancel() (the loop itself is closing): stop here
            # The cancellation was ours, and it is handled: the run is stored cancelled.
            task.uncancel()
            log.info("run_cancelled", run_id=run.run_id, reason=live.cancel_reason)
            return live.cancelled()
        except Exception as exc:
            # An engine fault outside any step: the run fails with it, stored, and its
            # followers get their `result`, rather than wait for an end that never comes.
            log.error("run_crashed", run_id=run.run_id, exc_info=exc)
            return live.failed(f"internal error: {type(exc).__name__}")

    def _started_write(self, live: LiveRun) -> Callable[[], None]:
        run = live.run
        request = RunRequest(run.given_input, run.config, run.definition)
        try:
            started = StoredRun(live.snapshot(), run.source, run.models, request)
            row = self.runs.encode(started, io=False)  # the steps' IO comes with its end
        except RecordTooLarge:
            return lambda: None  # its end cannot be stored either: it says so then
        return lambda: self.runs.insert(row)

    async def _write_progress(self, live: LiveRun) -> None:
        """Rewrite the running run's trace after steps start or finish: at most once per
        update_interval_s, so a run of many short steps costs few writes."""
        while True:
            await live.changed.wait()
            live.changed.clear()
            write = functools.partial(
                stored_runs.update_progress, self.runs, stored_runs.progress_row(live.snapshot())
            )
            await self._write(write, live.run_id)
            await asyncio.sleep(self.update_interval_s)

    async def _write(self, write: Callable[[], None], run_id: str) -> StorageError | None:
        """Write now when the database is free (a thread hop costs more than the write);
        when another writer (a RAG ingest) holds the lock, wait for it in a worker thread
        rather than stall every request. A storage error is logged and returned."""
        try:
            if not stored_runs.try_now(self.runs, write):
                await asyncio.to_thread(write)
        except StorageError as exc:
            log.error("run_not_stored", run_id=run_id, code=exc.code, error=exc.message)
            return exc
        return None

    async def store_run(self, run: StoredRun) -> StorageError | None:
        """Store the ended run over its running row; None once stored. A full or
        read-only database must not lose the result the caller waited for: its error is
        returned, not raised. A record too large to keep leaves no row at all."""
        run_id = run.result.run_id
        try:
            row = self.runs.encode(run)  # encoded once, on the loop
        except RecordTooLarge as exc:
            log.error("run_not_stored", run_id=run_id, code=exc.code, error=exc.message)
            await self._write(lambda: stored_runs.forget(self.runs, run_id), run_id)
            return exc
        return await self._write(lambda: stored_runs.save_end(self.runs, row), run_id)

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

    def stream(
        self, run: PreparedRun, *, cancel_on_disconnect: bool = False
    ) -> AsyncIterator[RunEvent | Dropped | RunOutcome]:
        """Start the run now, and its events in order: step_started, step_finished, token
        (and any other event a step plugin emits), then its RunOutcome (or Dropped, if
        the reader fell run_events_max events behind). Closing the iterator early (the
        client went away) leaves the run running to its end, unless
        `cancel_on_disconnect`."""
        live = self.start(run)
        return self._follow(live, live.subscribe(), cancel_on_disconnect=cancel_on_disconnect)

    async def follow(
        self, run_id: str
    ) -> AsyncIterator[RunEvent | Dropped | RunOutcome] | StoredRun:
        """A running run's events so far, then live ones, then its outcome; an ended run
        (404 run_not_found if none) as stored, read as `read_run` reads it."""
        live = self.live.get(run_id)
        if live is None or live.ended:
            return await self.read_run(run_id)
        return self._follow(live, live.subscribe(), cancel_on_disconnect=False)

    async def _follow(
        self, live: LiveRun, subscription: Subscription, *, cancel_on_disconnect: bool
    ) -> AsyncIterator[RunEvent | Dropped | RunOutcome]:
        finished = False
        try:
            async for item in subscription.items():
                yield item
                if isinstance(item, Dropped):
                    finished = True
                    return
            finished = True
            assert live.outcome is not None
            yield live.outcome
        finally:
            subscription.close()
            reason = "cancelled: the client that streamed it disconnected"
            if cancel_on_disconnect and not finished and live.cancel(reason):
                assert live.task is not None
                await asyncio.gather(live.task, return_exceptions=True)

    async def cancel(self, run_id: str) -> Cancelled:
        """Stop a running run: its running steps and model calls are cancelled, its
        unfinished steps marked cancelled, and it is stored `cancelled`. 404
        run_not_found; 409 run_not_cancellable when it has already ended."""
        live = self.live.get(run_id)
        if live is not None and live.task is not None:
            if live.cancel(f"cancelled: POST /api/fusion/runs/{run_id}/cancel"):
                log.info("run_cancel_requested", run_id=run_id)
            outcome = await asyncio.shield(live.task)
            if outcome.result.status == CANCELLED and live.cancelled_at is not None:
                return Cancelled(outcome, live.cancelled_at)
            status = outcome.result.status
        else:
            # 404 run_not_found; read off the loop (the row's JSON may be large)
            status = (await asyncio.to_thread(self.runs.get, run_id)).result.status
        raise Conflict(
            f"run '{run_id}' has already ended ({status}): only a running run can be cancelled",
            param="run_id",
            code=ErrorCode.RUN_NOT_CANCELLABLE,
        )

    def get_run(self, run_id: str, *, io: bool = False) -> StoredRun:
        """The run as it stands: a running one from memory (its trace so far, its records
        holding their IO), an ended one from the store (`io`: with its steps' IO)."""
        live = self.live.get(run_id)
        if live is None or live.ended:
            return self.runs.get(run_id, io=io)
        run = live.run
        request = RunRequest(run.given_input, run.config, run.definition)
        return StoredRun(live.snapshot(), run.source, run.models, request)

    async def read_run(self, run_id: str, *, io: bool = False) -> StoredRun:
        """`get_run` for a request: an ended run is read (and decoded: its IO may be large)
        on a worker thread, not on the event loop; a running one from memory, on the loop,
        where the executor changes its records."""
        live = self.live.get(run_id)
        if live is not None and not live.ended:
            return self.get_run(run_id, io=io)
        return await asyncio.to_thread(self.runs.get, run_id, io=io)

    # -- start and stop ---------------------------------------------------------------------
    async def recover(self) -> None:
        """At start: runs a stopped server left `running` are failed ("interrupted")."""
        count = await asyncio.to_thread(stored_runs.fail_interrupted, self.runs, utc_iso())
        if count:
            log.warning("interrupted_runs_failed", count=count)

    async def stop(self) -> None:
        """Cancel the runs in progress, each stored `cancelled` before this returns."""
        await self.live.cancel_all("cancelled: the server shut down during the run")

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
