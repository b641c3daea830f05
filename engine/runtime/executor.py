"""Run a compiled workflow: each step starts as soon as its dependencies are done, up to
``max_parallel`` at once; the run records a trace entry per step."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from engine.clock import utc_iso
from engine.config import Settings
from engine.dsl.compiled import CompiledStep, CompiledWorkflow, RoleSpec
from engine.dsl.hints import suggest
from engine.dsl.issues import dotted
from engine.dsl.rendering import render
from engine.dsl.templating import TemplateRenderError
from engine.dsl.values import Literal, Value
from engine.errors import ErrorCode, FusionError, InvalidRequest, ServiceUnavailable
from engine.runtime.inputs import output_problem, prepare_input
from engine.runtime.trace import (
    COMPLETED,
    FAILED,
    PARTIAL,
    STEP_CANCELLED,
    STEP_PENDING,
    STEP_RUNNING,
    STEP_SKIPPED,
    RunResult,
    StepRecord,
)
from engine.sandbox import Budget
from engine.steps.base import StepContext, StepServices

log = structlog.get_logger(__name__)

EventSink = Callable[[dict[str, Any]], None]
ModelSelector = Callable[[str, RoleSpec], str | None]
# A step's or child's place from the top run: step ids and item / pass indexes.
TracePath = tuple[str | int, ...]
# A child run's own run events are not forwarded: its step's events say it all.
_RUN_EVENTS = frozenset({"run_started", "run_finished", "run_cancelled"})
_STEP_EVENTS = frozenset({"step_started", "step_finished"})


class WorkflowSource(Protocol):
    def get(self, workflow_id: str) -> CompiledWorkflow: ...


class StepFailed(Exception):
    """A step's final failure, after its retries."""


_DEFAULTS = Settings()
_RENDER = Budget(_DEFAULTS.template_timeout_s, _DEFAULTS.template_memory_mb)
_SCHEMAS = Budget(_DEFAULTS.schema_timeout_s, _DEFAULTS.schema_memory_mb)


@dataclass(frozen=True)
class RunLimits:
    """Per-run budgets (Settings: run_max_steps, run_max_for_each_items,
    run_max_step_output_bytes, run_max_output_bytes, trace_max_children; sandboxed work:
    template_timeout_s, template_memory_mb, schema_timeout_s, schema_memory_mb), Settings'
    defaults by default."""

    max_steps: int = _DEFAULTS.run_max_steps
    max_for_each_items: int = _DEFAULTS.run_max_for_each_items
    max_step_output_bytes: int = _DEFAULTS.run_max_step_output_bytes
    max_output_bytes: int = _DEFAULTS.run_max_output_bytes
    max_trace_children: int = _DEFAULTS.trace_max_children
    render: Budget = _RENDER
    schemas: Budget = _SCHEMAS

    @classmethod
    def from_settings(cls, settings: Settings) -> RunLimits:
        return cls(
            max_steps=settings.run_max_steps,
            max_for_each_items=settings.run_max_for_each_items,
            max_step_output_bytes=settings.run_max_step_output_bytes,
            max_output_bytes=settings.run_max_output_bytes,
            max_trace_children=settings.trace_max_children,
            render=Budget(settings.template_timeout_s, settings.template_memory_mb),
            schemas=Budget(settings.schema_timeout_s, settings.schema_memory_mb),
        )


class _StepBudget:
    """Step executions left to one run and the child runs it starts, so a workflow that
    calls itself under ``for_each`` cannot fan out exponentially within the depth limit.
    Each step, each ``for_each`` item and each ``repeat`` pass costs one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def charge(self, count: int = 1) -> None:
        self.left -= count
        if self.left < 0:
            raise StepFailed(
                f"the run exceeded its budget of {self.limit} step executions "
                "(child workflows included; setting run_max_steps)"
            )


def _json_size(value: Any) -> int:
    """Bytes of ``value`` encoded as JSON, without building the encoding: a part shared
    many times (each for_each item returning the same large input string) is measured once,
    so the size of an output far beyond the limit costs no more than the output itself."""
    try:
        try:
            return _measure(value, {})
        except RecursionError:  # nested deeper than the walk goes: as deep as msgspec goes
            return len(_JSON.encode(value))
    except (TypeError, OverflowError):
        return 0  # not JSON data: the store's own encoding reports it


def _measure(value: Any, sizes: dict[int, int]) -> int:
    """msgspec's JSON size of ``value``; ``sizes``: the containers and long strings measured
    so far, by identity (they all live as long as ``value``). A container of scalars and
    short strings alone is encoded whole, at C speed: it cannot encode to many times its size
    in memory."""
    kind = type(value)
    if kind in _SCALARS or (kind is str and len(value) <= _SHORT):
        return len(_JSON.encode(value))
    size = sizes.get(id(value))
    if size is not None:
        return size
    if isinstance(value, list | tuple):
        if _flat(value):
            size = len(_JSON.encode(value))
        else:
            size = 1 + len(value)  # brackets and commas
            for item in value:
                size += _measure(item, sizes)
    elif isinstance(value, dict) and all(type(key) is str for key in value):
        if _flat(value) and _flat(value.values()):
            size = len(_JSON.encode(value))
        else:
            size = 1 + 2 * len(value)  # braces, commas and colons
            for key, item in value.items():
                size += _measure(key, sizes) + _measure(item, sizes)
    else:  # a long string, or anything msgspec encodes as one piece
        size = len(_JSON.encode(value))
    sizes[id(value)] = size
    return size


_SHORT = 1024  # characters of a string measured afresh wherever it is met
_SCALARS = frozenset({int, float, bool, type(None)})


def _flat(items: Iterable[Any]) -> bool:
    return all(type(x) in _SCALARS or (type(x) is str and len(x) <= _SHORT) for x in items)


_JSON = msgspec.json.Encoder()


def check_mocks(wf: CompiledWorkflow, mocks: Mapping[str, Any]) -> None:
    """A mock of a step the workflow lacks is a request error, with a hint."""
    for sid in mocks:
        if sid not in wf.steps:
            raise InvalidRequest(
                f"workflow '{wf.id}' has no step '{sid}' to mock{suggest(sid, wf.steps)}",
                param=f"mocks.{sid}",
            )


def new_run_id() -> str:
    return f"wf-{uuid.uuid4().hex[:12]}"


class Runner:
    def __init__(
        self,
        *,
        catalog: WorkflowSource | None = None,
        services: StepServices | None = None,
        select_model: ModelSelector | None = None,
        max_parallel: int = 16,
        max_depth: int = 8,
        limits: RunLimits | None = None,
    ) -> None:
        self.catalog = catalog
        self.services = services or StepServices()
        self.select_model = select_model
        self.max_parallel = max_parallel
        self.max_depth = max_depth
        self.limits = limits or RunLimits()
        self._validators: dict[str, Draft202012Validator] = {}

    def bind_models(
        self, wf: CompiledWorkflow, given: Mapping[str, Any] | None, *, lenient: bool = False
    ) -> dict[str, Any]:
        """Role -> model id: the caller's choice; for a required role, else the selector's
        (a loaded model of its type); an optional role not given is None. A required role
        nobody can fill is a 503, unless `lenient` (a run with mocked steps, which may be
        the only ones using it): then it is None and a step using it fails."""
        given = dict(given or {})
        for role in given:
            if role not in wf.models:
                declared = ", ".join(wf.models) or "none"
                raise InvalidRequest(
                    f"workflow '{wf.id}' has no model role '{role}' (roles: {declared})",
                    param=f"models.{role}",
                )
        bound: dict[str, Any] = {}
        for role, spec in wf.models.items():
            model = given.get(role)
            # An optional role is a feature the caller turns on (a reranker): filling it
            # with whatever model is loaded would turn it on for everyone.
            if model is None and not spec.optional and self.select_model is not None:
                model = self.select_model(role, spec)
            if model is None and not spec.optional and not lenient:
                raise ServiceUnavailable(
                    f"no model bound to required role '{role}' (type '{spec.type}'): load a "
                    f"'{spec.type}' model or pass models.{role}",
                    param=f"models.{role}",
                    code=ErrorCode.MODEL_NOT_LOADED,
                )
            bound[role] = model
        return bound

    async def run(
        self,
        wf: CompiledWorkflow,
        input: Any = None,
        *,
        models: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        on_event: EventSink | None = None,
        run_id: str | None = None,
        depth: int = 0,
        input_checked: bool = False,
        budget: _StepBudget | None = None,
        mocks: Mapping[str, Any] | None = None,
        trace_path: TracePath = (),
        trace_parent: StepRecord | None = None,
    ) -> RunResult:
        """Validate input, bind models and execute. Request errors (bad input, unknown role,
        missing model, a mock of no step) raise before anything runs; step failures end in
        the result. ``input_checked``: the caller already ran prepare_input against
        wf.input_schema (the server checks every request error before it answers).
        ``mocks``: step id -> the output that step has, without running it (its `when`
        still decides whether it runs; for_each, repeat and retries do not apply).
        ``trace_path``, ``trace_parent``: a child run's place in its top run (the path of
        the step, item or pass that runs it) and the trace record its steps' records
        become children of (None: not recorded, beyond trace_max_children)."""
        check_mocks(wf, mocks or {})
        prepared_input = (
            input
            if input_checked
            else await prepare_input(wf.input_schema, input, self.limits.schemas)
        )
        bound = self.bind_models(wf, models, lenient=bool(mocks))
        if config is not None and not isinstance(config, Mapping):
            raise InvalidRequest("config must be an object", param="config")
        # A copy: a step mutating a rendered `{{ config.x }}` must not change the workflow.
        merged_config = copy.deepcopy({**wf.config, **(config or {})})
        budget = budget or _StepBudget(self.limits.max_steps)
        run = _Run(self, wf, run_id or new_run_id(), depth, on_event, budget, mocks or {})
        run.place(trace_path, trace_parent)
        return await run.execute(prepared_input, bound, merged_config)

    async def run_child(
        self,
        target: str | CompiledWorkflow,
        input: Any,
        *,
        models: Mapping[str, Any] | None,
        config: Mapping[str, Any] | None,
        parent_models: Mapping[str, Any],
        depth: int,
        on_event: EventSink | None,
        budget: _StepBudget | None = None,
        trace_path: TracePath = (),
        trace_parent: StepRecord | None = None,
    ) -> RunResult:
        if depth > self.max_depth:
            raise InvalidRequest(f"workflow calls nest deeper than {self.max_depth} levels")
        if isinstance(target, str):
            if self.catalog is None:
                raise InvalidRequest(f"no workflow catalog to resolve '{target}'")
            target = self.catalog.get(target)
        if models is None:  # inherit the parent's bindings for the roles the child declares
            models = {r: m for r, m in parent_models.items() if r in target.models and m}
        return await self.run(
            target,
            input,
            models=models,
            config=config,
            depth=depth,
            on_event=on_event,
            budget=budget,
            trace_path=trace_path,
            trace_parent=trace_parent,
        )

    def validator(self, step: CompiledStep) -> Draft202012Validator:
        found = self._validators.get(step.type)
        if found is None:
            found = self._validators[step.type] = Draft202012Validator(step.plugin.params_schema)
        return found


class _Run:
    def __init__(
        self,
        runner: Runner,
        wf: CompiledWorkflow,
        run_id: str,
        depth: int,
        on_event: EventSink | None,
        budget: _StepBudget,
        mocks: Mapping[str, Any],
    ) -> None:
        self.runner = runner
        self.mocks = mocks
        self.limits = runner.limits
        self.budget = budget
        self.wf = wf
        self.run_id = run_id
        self.depth = depth
        self.on_event = on_event
        # A repeat step counts its passes from 0 (also when skipped); other steps have none.
        self.records = {
            sid: StepRecord(sid, step.type, iterations=0 if step.repeat is not None else None)
            for sid, step in wf.steps.items()
        }
        self.states: dict[str, dict[str, Any]] = {
            sid: {
                "output": None,
                "status": "pending",
                "ran": False,
                "error": None,
                "attempts": 0,
                "iterations": self.records[sid].iterations,
                "until_met": None,
            }
            for sid in wf.steps
        }
        self.scope: dict[str, Any] = {}
        self.prefix: TracePath = ()  # where this run is in its top run: () for the top run

    def place(self, prefix: TracePath, parent: StepRecord | None) -> None:
        """Make this run a child run at `prefix`: its steps' records carry their path and
        become children of `parent` (when not None)."""
        self.prefix = tuple(prefix)
        for record in self.records.values():
            if prefix:
                record.path = [*prefix, record.step_id]
            if parent is not None:
                parent.add_child(record, self.limits.max_trace_children)

    def step_path(self, sid: str) -> TracePath:
        return (*self.prefix, sid)

    def emit(self, event: str, data: Mapping[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event({"event": event, "run_id": self.run_id, **data})

    async def execute(
        self, input: dict[str, Any], models: dict[str, Any], config: dict[str, Any]
    ) -> RunResult:
        wf = self.wf
        started = time.perf_counter()
        created_at = utc_iso()
        self.scope = {"input": input, "config": config, "models": models, "steps": self.states}
        self.emit("run_started", {"workflow_id": wf.id})
        error: str | None = None
        try:
            error = await self.schedule()
        except asyncio.CancelledError:
            self.emit("run_cancelled", {})
            raise
        output = None
        if error is None:
            try:
                output = await self.render_output()
            except TemplateRenderError as exc:
                error = f"output: {exc}"
            else:
                size = _json_size(output)
                if size > self.limits.max_output_bytes:
                    output = None
                    error = (
                        f"output: {size} bytes exceed the run's limit of "
                        f"{self.limits.max_output_bytes} (setting run_max_output_bytes)"
                    )
                elif wf.output_schema is not None:
                    problem = await output_problem(wf.output_schema, output, self.limits.schemas)
                    if problem:
                        output, error = None, f"output: {problem}"
        failed_steps = any(r.status == FAILED for r in self.records.values())
        status = FAILED if error else (PARTIAL if failed_steps else COMPLETED)
        result = RunResult(
            run_id=self.run_id,
            workflow_id=wf.id,
            workflow_version=wf.version,
            status=status,
            output=output,
            trace=list(self.records.values()),
            error=error,
            created_at=created_at,
            completed_at=utc_iso(),
            total_latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        self.emit("run_finished", {"status": status, "error": error})
        return result

    async def render_output(self) -> Any:
        if self.wf.output is not None:
            return await render(self.wf.output, self.scope, self.limits.render)
        return {sid: self.states[sid]["output"] for sid in self.wf.sinks()}

    async def schedule(self) -> str | None:
        """Run the DAG; the error that failed the run, or None."""
        graph = self.wf.graph
        waiting = {sid: graph.in_degree(sid) for sid in self.wf.steps}
        ready = [sid for sid, n in waiting.items() if n == 0]
        running: dict[asyncio.Task[None], str] = {}
        try:
            while ready or running:
                while ready and len(running) < self.runner.max_parallel:
                    sid = ready.pop(0)
                    if self.should_skip(sid):
                        await self.finish_skipped(self.wf.steps[sid], "a dependency was skipped")
                        error = self.run_error(sid)
                        if error is not None:
                            await self.cancel(running)
                            return error
                        ready.extend(self.release(sid, waiting))
                        continue
                    task = asyncio.create_task(self.run_step(self.wf.steps[sid]))
                    running[task] = sid
                if not running:
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    sid = running.pop(task)
                    task.result()
                    error = self.run_error(sid)
                    if error is not None:
                        await self.cancel(running)
                        return error
                    ready.extend(self.release(sid, waiting))
        except asyncio.CancelledError:
            await self.cancel(running)
            raise
        return None

    def run_error(self, sid: str) -> str | None:
        """The run's error if step ``sid`` failed and fails the run."""
        if self.states[sid]["status"] == FAILED and self.wf.steps[sid].on_error == "fail":
            return f"step '{sid}' failed: {self.records[sid].error}"
        return None

    def release(self, sid: str, waiting: dict[str, int]) -> list[str]:
        freed = []
        for dependent in self.wf.graph.successors(sid):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                freed.append(dependent)
        return freed

    def should_skip(self, sid: str) -> bool:
        step = self.wf.steps[sid]
        return any(
            self.states[dep]["status"] == STEP_SKIPPED and dep not in step.guarded
            for dep in step.deps
        )

    async def finish_skipped(self, step: CompiledStep, reason: str) -> None:
        """Record a skip, whose output is the step's default; a default that cannot be
        rendered fails the step instead (it did not run: `ran` stays false)."""
        record, state = self.records[step.id], self.states[step.id]
        try:
            output = await self.fallback(step)
        except StepFailed as exc:
            record.status = FAILED
            record.error = str(exc)
            state.update(status=FAILED, ran=False, output=None, error=str(exc))
            log.info("step_failed", run_id=self.run_id, step_id=step.id, error=str(exc))
            self.emit(
                "step_finished",
                {"step_id": step.id, **self.where(step.id), "status": FAILED, "error": str(exc)},
            )
            return
        record.status, record.output = STEP_SKIPPED, output
        state.update(status=STEP_SKIPPED, ran=False, output=output)
        self.emit(
            "step_finished",
            {"step_id": step.id, **self.where(step.id), "status": STEP_SKIPPED, "reason": reason},
        )

    async def fallback(self, step: CompiledStep) -> Any:
        """The step's default, rendered now against the run's scope: its step references
        are dependencies, so what it reads has finished."""
        if step.default is None:
            return None
        try:
            output = await render(step.default, self.scope, self.limits.render, step.timeout_s)
        except TemplateRenderError as exc:
            raise StepFailed(f"default: {exc}") from None
        self.check_size(output, "default")
        return output

    def check_size(self, output: Any, what: str) -> None:
        size = _json_size(output)
        if size > self.limits.max_step_output_bytes:
            raise StepFailed(
                f"{what} of {size} bytes exceeds the limit of "
                f"{self.limits.max_step_output_bytes} (setting run_max_step_output_bytes)"
            )

    async def cancel(self, running: dict[asyncio.Task[None], str]) -> None:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for record in self.records.values():
            if record.status in ("pending", STEP_RUNNING):
                record.status = STEP_CANCELLED
                self.states[record.step_id]["status"] = STEP_CANCELLED

    async def run_step(self, step: CompiledStep) -> None:
        record, state = self.records[step.id], self.states[step.id]
        started = time.perf_counter()
        record.started_at = utc_iso()
        record.status = state["status"] = STEP_RUNNING
        self.emit("step_started", {"step_id": step.id, **self.where(step.id), "type": step.type})
        skipped = False  # finish_skipped sends the step's step_finished itself
        try:
            if step.when is not None and not await self.control(step, "when", step.when, {}):
                await self.finish_skipped(step, "'when' was false")
                skipped = True
                return
            self.budget.charge()
            if step.id in self.mocks:
                # A copy: a later step mutating its input must not change the next run's mock.
                output = copy.deepcopy(self.mocks[step.id])
                record.mocked = True
            elif step.for_each is not None:
                output = await self.run_items(step, record)
            elif step.repeat is not None:
                output = await self.run_repeat(step, record)
            else:
                output = await self.attempts(step, record, self.scope)
            self.check_size(output, "output")
            state.update(status=COMPLETED, ran=True, output=output)
            record.status, record.output = COMPLETED, output
        except Exception as exc:
            if isinstance(exc, StepFailed):
                error = str(exc)
            else:
                # An engine fault, not the step's: logged with its traceback. The step fails
                # with it all the same, or the exception would end the run unfinished (the
                # step left 'running', the run unstored, the request a 500).
                log.error("step_crashed", run_id=self.run_id, step_id=step.id, exc_info=exc)
                error = f"internal error: {type(exc).__name__}: {exc}"
            record.status = FAILED
            try:
                output = await self.fallback(step)
            except StepFailed as unusable:
                output, error = None, f"{error}; {unusable}"
            record.error, record.output = error, output
            state.update(status=FAILED, ran=True, output=output, error=error)
            log.info("step_failed", run_id=self.run_id, step_id=step.id, error=error)
        except asyncio.CancelledError:
            record.status = state["status"] = STEP_CANCELLED
            raise
        finally:
            record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            state["attempts"] = record.attempts
            state["iterations"] = record.iterations
            state["until_met"] = record.until_met
            if not skipped:
                if self.runner.services.models is not None:
                    self.runner.services.models.metrics.observe_step(
                        step.type, time.perf_counter() - started
                    )
                self.emit(
                    "step_finished",
                    {
                        "step_id": step.id,
                        **self.where(step.id),
                        "status": record.status,
                        "duration_ms": record.duration_ms,
                        "error": record.error,
                        **({} if record.until_met is None else {"until_met": record.until_met}),
                    },
                )

    async def control(self, step: CompiledStep, key: str, value: Value, extra: dict) -> Any:
        scope = {**self.scope, **extra} if extra else self.scope
        try:
            return await render(value, scope, self.limits.render, step.timeout_s)
        except TemplateRenderError as exc:
            raise StepFailed(f"{key}: {exc}") from None

    async def run_items(self, step: CompiledStep, record: StepRecord) -> list[Any]:
        assert step.for_each is not None
        items = await self.control(step, "for_each", step.for_each, {})
        if not isinstance(items, list | tuple):
            raise StepFailed(f"for_each gave {type(items).__name__}, not a list")
        if len(items) > self.limits.max_for_each_items:
            raise StepFailed(
                f"for_each gave {len(items)} items, more than the limit of "
                f"{self.limits.max_for_each_items} (setting run_max_for_each_items)"
            )
        self.budget.charge(len(items))
        record.items = len(items)
        limit = asyncio.Semaphore(step.concurrency)
        # One child record per item, the first trace_max_children of them: a record per
        # item beyond would grow the trace with the list.
        path = self.step_path(step.id)
        kept = min(len(items), self.limits.max_trace_children)
        children = [_child(step, path, i) for i in range(kept)]
        record.children = list(children)
        if len(items) > kept:
            record.children_omitted = len(items) - kept

        async def one(index: int, item: Any) -> Any:
            child = children[index] if index < kept else None
            async with limit, self.tracked(step, child):
                scope = {**self.scope, "item": item, "index": index}
                return await self.attempts(
                    step, record, scope, item=item, index=index, at=(child, (*path, index))
                )

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, item)) for i, item in enumerate(items)]
        except* StepFailed as failed:
            # TaskGroup wraps an item's failure in an ExceptionGroup, which run_step would
            # not catch: the step fails with the (first) failing item's error instead.
            raise failed.exceptions[0] from None
        finally:
            # Items cancelled before they started (a sibling failed, the run was cancelled)
            for child in children:
                if child.status in (STEP_PENDING, STEP_RUNNING):
                    child.status = STEP_CANCELLED
        return [t.result() for t in tasks]

    async def run_repeat(self, step: CompiledStep, record: StepRecord) -> Any:
        assert step.repeat is not None
        previous: Any = None
        path = self.step_path(step.id)
        record.children = []
        for iteration in range(step.repeat.max):
            if iteration:
                self.budget.charge()
            made = _child(step, path, iteration)
            child = made if record.add_child(made, self.limits.max_trace_children) else None
            scope = {**self.scope, "iteration": iteration, "previous": previous}
            async with self.tracked(step, child):
                output = await self.attempts(step, record, scope, at=(child, (*path, iteration)))
            record.iterations = iteration + 1
            if await self.control(
                step, "repeat.until", step.repeat.until, {**scope, "output": output}
            ):
                record.until_met = True
                return output
            previous = output
        # The output is the last pass's, which did not meet `until`: say so in the trace
        # (the summariser's summary still too long, a search still without an answer).
        record.until_met = False
        log.info("repeat_stopped_at_max", run_id=self.run_id, step_id=step.id, max=step.repeat.max)
        return previous

    @contextlib.asynccontextmanager
    async def tracked(self, step: CompiledStep, child: StepRecord | None) -> AsyncIterator[None]:
        """Time one for_each item or repeat pass in its child record, with its events
        (nothing for an item or pass beyond trace_max_children: `child` None)."""
        if child is None:
            yield
            return
        assert child.path is not None
        where = {"step_id": step.id, "path": list(child.path), "index": child.index}
        started = time.perf_counter()
        child.started_at = utc_iso()
        child.status = STEP_RUNNING
        self.emit("step_started", {**where, "type": step.type})
        try:
            yield
            child.status = COMPLETED
        except asyncio.CancelledError:
            child.status = STEP_CANCELLED
            raise
        except Exception as exc:
            child.status = FAILED
            child.error = str(exc) if isinstance(exc, StepFailed) else f"internal error: {exc!r}"
            raise
        finally:
            child.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            self.emit(
                "step_finished",
                {
                    **where,
                    "status": child.status,
                    "duration_ms": child.duration_ms,
                    "error": child.error,
                },
            )

    def where(self, sid: str) -> dict[str, Any]:
        """The `path` of step `sid`'s events: none for the top run's own steps."""
        return {"path": [*self.prefix, sid]} if self.prefix else {}

    async def attempts(
        self,
        step: CompiledStep,
        record: StepRecord,
        scope: Mapping[str, Any],
        item: Any = None,
        index: int | None = None,
        at: tuple[StepRecord | None, TracePath] | None = None,
    ) -> Any:
        """Run the step's attempts. `at`: for a for_each item or repeat pass, its child
        record (None beyond trace_max_children) and path; otherwise the step's own."""
        target, path = at if at is not None else (record, self.step_path(step.id))
        where = {"path": list(path)} if len(path) > 1 else {}
        try:
            params = await render(step.params, scope, self.limits.render, step.timeout_s)
        except TemplateRenderError as exc:
            raise StepFailed(f"parameters: {exc}") from None
        if target is not None:
            target.input = params  # the rendered parameters: what the step was given
        if not isinstance(step.params, Literal):
            errors = list(self.runner.validator(step).iter_errors(params))
            if errors:
                error = best_match(errors)
                if error.instance is None and list(error.absolute_path) == [
                    step.plugin.model_param
                ]:
                    raise StepFailed(
                        f"parameter {step.plugin.model_param} is null: no model is bound to "
                        f"the role it names (load one, pass the role's model, or mock "
                        f"step '{step.id}')"
                    )
                raise StepFailed(f"parameter {dotted(tuple(error.absolute_path))}: {error.message}")
        if step.plugin.model_param:
            model = params.get(step.plugin.model_param)
            if record.model is None:
                record.model = model
            if target is not None and target is not record:
                target.model = model
        error = "no attempt made"
        for attempt in range(1, step.retry.attempts + 1):
            record.attempts += 1
            if target is not None:
                if target is not record:
                    target.attempts += 1
                # A retried step's (item's, pass's) children: its last attempt's sub-run.
                target.children = target.children_omitted = None
            ctx = StepContext(
                step_id=step.id,
                attempt=attempt,
                services=self.runner.services,
                emit=lambda event, data: self.emit(event, {"step_id": step.id, **where, **data}),
                run_workflow=self.child_runner(target, path),
                item=item,
                index=index,
            )
            try:
                call = step.plugin.run(params, ctx, step.prepared)
                output = await (asyncio.wait_for(call, step.timeout_s) if step.timeout_s else call)
                if target is not None:
                    target.output = output  # run_step sets a top step's own final output
                return output
            except TimeoutError as exc:
                # wait_for's own timeout, or one the plugin raised itself
                error = (
                    f"timed out after {step.timeout_s}s" if step.timeout_s else f"timed out: {exc}"
                )
            except InvalidRequest as exc:  # the same parameters fail the same way
                raise StepFailed(exc.message) from None
            except FusionError as exc:
                error = exc.message
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < step.retry.attempts:
                await asyncio.sleep(step.retry.delay(attempt))
        raise StepFailed(error)

    def child_runner(self, parent: StepRecord | None, path: TracePath) -> Callable[..., Any]:
        """A step's `run_workflow`: the sub-run's steps become children of `parent` at
        `path`, and their events go to this run's sink with their path (no step events
        where `parent` is None: an item or pass beyond trace_max_children)."""
        forward: EventSink | None = None
        if self.on_event is not None:
            sink = self.on_event

            def forward(event: dict[str, Any]) -> None:
                name = event.get("event")
                if name in _RUN_EVENTS or (parent is None and name in _STEP_EVENTS):
                    return
                sink({**event, "run_id": self.run_id})  # the top run's id, not the sub-run's

        async def run_workflow(
            target: str | CompiledWorkflow,
            input: Any = None,
            models: Mapping[str, Any] | None = None,
            config: Mapping[str, Any] | None = None,
        ) -> RunResult:
            return await self.runner.run_child(
                target,
                input,
                models=models,
                config=config,
                parent_models=self.scope["models"],
                depth=self.depth + 1,
                on_event=forward,
                budget=self.budget,
                trace_path=path,
                trace_parent=parent,
            )

        return run_workflow


def _child(step: CompiledStep, path: Sequence[str | int], index: int) -> StepRecord:
    """The trace record of a for_each item or repeat pass."""
    return StepRecord(step.id, step.type, path=[*path, index], index=index)
