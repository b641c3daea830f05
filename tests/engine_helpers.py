"""Compile workflows from YAML strings and run them with test-only step types.

The test step types are real plugins registered programmatically on a copy of the default
registry. They coordinate with the test through a `Lab` passed to the runner in its
services' `extra` as "lab": named asyncio events, counters and logs, so a test can prove
that steps overlap (or don't) without sleeping. Every wait is bounded, so a scheduling bug fails a
test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any, ClassVar

from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.source import load_text
from engine.errors import InvalidRequest
from engine.runtime.executor import Runner
from engine.runtime.trace import RunResult, StepRecord
from engine.steps.base import StepContext, StepPlugin, StepServices
from engine.steps.registry import StepRegistry, default_registry

WAIT_S = 5.0  # upper bound of any wait in these tests; only reached when something is wrong


class Lab:
    """Shared state between a test and the test step types it runs."""

    def __init__(self) -> None:
        self._events: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.log: list[tuple[str, str]] = []  # (what, name): ("start", "a"), ("end", "a") ...
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled: list[str] = []  # names of hang steps whose coroutine was cancelled
        self.seen_params: list[dict[str, Any]] = []

    def event(self, name: str) -> asyncio.Event:
        return self._events[name]

    def is_set(self, name: str) -> bool:
        return self._events[name].is_set()

    def set(self, name: str) -> None:
        self._events[name].set()

    async def wait(self, name: str) -> None:
        try:
            await asyncio.wait_for(self._events[name].wait(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"event '{name}' was not set within {WAIT_S}s") from None

    def enter(self, name: str) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log.append(("start", name))

    def leave(self, name: str) -> None:
        self.in_flight -= 1
        self.log.append(("end", name))
        self.set(f"finished:{name}")

    def order(self, what: str) -> list[str]:
        return [name for kind, name in self.log if kind == what]


def _lab(ctx: StepContext) -> Lab:
    return ctx.services.extra["lab"]


def _name(params: Mapping[str, Any], ctx: StepContext) -> str:
    name = params.get("name") or ctx.step_id
    return f"{name}[{ctx.index}]" if ctx.index is not None and "name" not in params else name


class RecordStep(StepPlugin):
    """Log start and end, return `value`."""

    type_name = "record"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"value": {}, "name": {"type": "string"}, "model": {"type": "string"}},
    }
    model_param = "model"

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        lab, name = _lab(ctx), _name(params, ctx)
        lab.enter(name)
        lab.seen_params.append(params)
        lab.leave(name)
        return params.get("value")


class RendezvousStep(StepPlugin):
    """Set event `set`, then wait for event `wait`: two of these waiting for each other
    complete only if they run at the same time."""

    type_name = "rendezvous"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"set": {"type": "string"}, "wait": {"type": "string"}},
        "required": ["set", "wait"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        lab = _lab(ctx)
        lab.set(params["set"])
        try:
            await asyncio.wait_for(lab.event(params["wait"]).wait(), WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"rendezvous: '{params['wait']}' never arrived") from None
        return params["set"]


class GateStep(StepPlugin):
    """Count itself in flight, announce `started:<name>`, block until the test sets
    `release:<name>` (or `release:all`), then return `value` (default: the name)."""

    type_name = "gate"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "value": {}},
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        lab, name = _lab(ctx), _name(params, ctx)
        lab.enter(name)
        try:
            lab.set(f"started:{name}")
            release = [
                asyncio.ensure_future(lab.event(f"release:{name}").wait()),
                asyncio.ensure_future(lab.event("release:all").wait()),
            ]
            try:
                done, _ = await asyncio.wait(
                    release, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in release:
                    waiter.cancel()
            if not done:
                raise RuntimeError(f"gate '{name}' was never released")
        finally:
            lab.leave(name)
        return params.get("value", name)


class FlakyStep(StepPlugin):
    """Fail the first `failures` calls (counted per `key`, each announced as `called:<key>`),
    then return the call count."""

    type_name = "flaky"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"key": {"type": "string"}, "failures": {"type": "integer"}},
        "required": ["key", "failures"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        lab = _lab(ctx)
        lab.counts[params["key"]] += 1
        calls = lab.counts[params["key"]]
        lab.log.append(("attempt", str(ctx.attempt)))
        lab.set(f"called:{params['key']}")
        if calls <= params["failures"]:
            raise RuntimeError(f"flaky failure {calls}")
        return calls


class HangStep(StepPlugin):
    """Announce `started:<name>` and wait forever; record a cancellation in `lab.cancelled`
    from a finally block (proof that the coroutine was really cancelled)."""

    type_name = "hang"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        lab, name = _lab(ctx), _name(params, ctx)
        lab.enter(name)
        cancelled = False
        try:
            lab.set(f"started:{name}")
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            lab.leave(name)
            if cancelled:
                lab.cancelled.append(name)
                lab.set(f"cancelled:{name}")


class BoomStep(StepPlugin):
    """Raise with `message`: a RuntimeError, or with `invalid: true` an InvalidRequest (a
    request error, which retrying cannot fix)."""

    type_name = "boom"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"message": {"type": "string"}, "invalid": {"type": "boolean"}},
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        _lab(ctx).counts[f"boom:{ctx.step_id}"] += 1
        message = params.get("message", "boom")
        if params.get("invalid"):
            raise InvalidRequest(message, param="message")
        raise RuntimeError(message)


class TypedStep(StepPlugin):
    """An integer parameter `n` and an optional enum `mode`; returns them."""

    type_name = "typed"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0},
            "mode": {"enum": ["fast", "slow"]},
        },
        "required": ["n"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        return {"n": params["n"], "mode": params.get("mode")}


class MutateStep(StepPlugin):
    """Mutate its parameters in place (appends to `items`, sets `extra.touched`), returning a
    snapshot of what it received before mutating."""

    type_name = "mutate"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"items": {"type": "array"}, "extra": {"type": "object"}},
        "required": ["items"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        before = {"items": list(params["items"]), "extra": dict(params.get("extra") or {})}
        params["items"].append("mutated")
        if isinstance(params.get("extra"), dict):
            params["extra"]["touched"] = True
        return before


TEST_STEPS: tuple[type[StepPlugin], ...] = (
    RecordStep,
    RendezvousStep,
    GateStep,
    FlakyStep,
    HangStep,
    BoomStep,
    TypedStep,
    MutateStep,
)


def make_registry() -> StepRegistry:
    """The installed step types plus the test-only ones above."""
    registry = default_registry()
    for plugin in TEST_STEPS:
        registry.register(plugin)
    return registry


def compile_yaml(
    text: str,
    *,
    registry: StepRegistry | None = None,
    workflow_ids: list[str] | None = None,
) -> CompiledWorkflow:
    """Compile a YAML workflow (dedented); raises WorkflowInvalid like the loader does."""
    doc = load_text(textwrap.dedent(text), file="<test>")
    return compile_document(doc, registry or make_registry(), workflow_ids=workflow_ids)


def lab_services(lab: Lab) -> StepServices:
    """No engine services, and the lab for the test step types."""
    return StepServices(extra={"lab": lab})


def make_runner(
    lab: Lab | None = None, *, catalog: WorkflowCatalog | None = None, **kwargs: Any
) -> Runner:
    return Runner(catalog=catalog, services=lab_services(lab or Lab()), **kwargs)


async def run_yaml(
    text: str,
    input: Any = None,
    *,
    lab: Lab | None = None,
    runner: Runner | None = None,
    **run_kwargs: Any,
) -> RunResult:
    """Compile and run a workflow, failing (not hanging) if it takes longer than WAIT_S."""
    wf = compile_yaml(text)
    runner = runner or make_runner(lab)
    return await asyncio.wait_for(runner.run(wf, input, **run_kwargs), WAIT_S)


def trace(result: RunResult) -> dict[str, StepRecord]:
    return {record.step_id: record for record in result.trace}


def statuses(result: RunResult) -> dict[str, str]:
    return {record.step_id: record.status for record in result.trace}


def catalog_of(*texts: str, registry: StepRegistry | None = None) -> WorkflowCatalog:
    """A catalog of the given workflows, compiled knowing each other's ids."""
    registry = registry or make_registry()
    docs = [load_text(textwrap.dedent(t), file="<test>") for t in texts]
    ids = [d.data["id"] for d in docs]
    catalog = WorkflowCatalog(registry)
    for doc in docs:
        catalog.add(compile_document(doc, registry, workflow_ids=ids))
    return catalog
