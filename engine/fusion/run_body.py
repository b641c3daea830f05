"""The §3.1 body of a run: what orchestrate answers (JSON and the stream's `result`), a
workflow job's result, and what `fusion run` prints, so each names the same fields.

`workflow_id` is the run's id (as §3.1 shows it, "wf-..."); the workflow itself is
`workflow`, with its version and source. Only the runtime's RunResult is needed (no store),
so a run made without the server's services is described the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from engine.errors import ErrorDetail, FusionError, InvalidRequest
from engine.runtime.trace import RunResult, StepRecord

if TYPE_CHECKING:
    from engine.fusion import service
    from engine.fusion.service import RunOutcome


class TraceEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    step: str
    type: str
    model: str | None
    status: str
    duration_ms: float | None
    attempts: int
    error: str | None
    started_at: str | None
    items: int | None = None  # for_each: how many items ran
    iterations: int | None = None  # repeat: how many passes ran
    until_met: bool | None = None  # repeat: false when the passes stopped at max
    mocked: bool | None = None  # `fusion run --mock`: the step was given its output
    # Child entries (docs/api.md "Child steps"): a workflow step's sub-run steps, a for_each
    # step's items, a repeat step's passes, each with its path from the top run; absent
    # for a step without any (a flat workflow's body is as before).
    path: list[str | int] | None = None
    index: int | None = None  # an item's index or a pass's number, from 0
    children: list[TraceEntry] | None = None
    children_omitted: int | None = None  # children beyond the setting trace_max_children
    # Only when asked for (GET /api/fusion/runs/{id}?include=io): the step's rendered
    # parameters and its output; UNSET (left out) otherwise, so bodies stay as they were.
    input: Any | msgspec.UnsetType = msgspec.UNSET
    output: Any | msgspec.UnsetType = msgspec.UNSET


# What GET /api/fusion/runs/{id}?include= may add to the body (docs/api.md).
INCLUDE_IO = "io"
INCLUDES = (INCLUDE_IO,)


def parse_include(values: Sequence[str] | None) -> frozenset[str]:
    """`include` given repeated and/or comma-separated; an unknown value is 400 naming the
    parameter."""
    found: set[str] = set()
    for value in values or ():
        for part in value.split(","):
            part = part.strip()
            if part not in INCLUDES:
                raise InvalidRequest(
                    f"unknown include {part!r}: expected one of {', '.join(INCLUDES)}",
                    param="include",
                )
            found.add(part)
    return frozenset(found)


class RequestWarning(msgspec.Struct):
    code: str
    message: str
    param: str


class RunFields(msgspec.Struct, kw_only=True):
    """What a run answers, run or fetched."""

    workflow_id: str
    status: str
    result: Any
    execution_trace: list[TraceEntry]
    total_latency_ms: float | None
    created_at: str
    completed_at: str | None
    workflow: str
    workflow_version: int | str | None
    workflow_source: str | None
    models: dict[str, str | None]
    error: str | None


class RunResponse(RunFields, kw_only=True, omit_defaults=True):
    stored: bool  # False: not stored (a full or read-only database: `warning` says why)
    warning: ErrorDetail | None = None
    warnings: list[RequestWarning] = []  # about the request (a deprecated role name)


def trace_entry(record: StepRecord, *, io: bool = False) -> TraceEntry:
    """`record`'s trace entry; `io`: with its `input` and `output` (its children's too)."""
    return TraceEntry(
        step=record.step_id,
        type=record.type,
        model=record.model,
        status=record.status,
        duration_ms=record.duration_ms,
        attempts=record.attempts,
        error=record.error,
        started_at=record.started_at,
        items=record.items,
        iterations=record.iterations,
        until_met=record.until_met,
        mocked=record.mocked,
        path=record.path,
        index=record.index,
        children=None
        if record.children is None
        else [trace_entry(c, io=io) for c in record.children],
        children_omitted=record.children_omitted,
        input=record.input if io else msgspec.UNSET,
        output=record.output if io else msgspec.UNSET,
    )


def run_fields(
    result: RunResult, *, source: str | None, models: Mapping[str, Any], io: bool = False
) -> dict[str, Any]:
    """The fields of RunFields for `result`; `source`: where the workflow came from,
    `models`: the model bound to each role; `io`: trace entries with their input and
    output."""
    return {
        "workflow_id": result.run_id,
        "status": result.status,
        "result": result.output,
        "execution_trace": [trace_entry(r, io=io) for r in result.trace],
        "total_latency_ms": result.total_latency_ms,
        "created_at": result.created_at,
        "completed_at": result.completed_at,
        "workflow": result.workflow_id,
        "workflow_version": result.workflow_version,
        "workflow_source": source,
        "models": dict(models),
        "error": result.error,
    }


def run_response(
    result: RunResult,
    *,
    source: str | None,
    models: Mapping[str, Any],
    stored: bool,
    storage_error: FusionError | None = None,
    warnings: Sequence[service.RequestWarning] = (),
) -> RunResponse:
    return RunResponse(
        **run_fields(result, source=source, models=models),
        stored=stored,
        warning=storage_error.detail() if storage_error else None,
        warnings=[RequestWarning(w.code, w.message, w.param) for w in warnings],
    )


def outcome_response(outcome: RunOutcome) -> RunResponse:
    """A run of the Fusion service, as stored (or not, and why)."""
    return run_response(
        outcome.result,
        source=outcome.run.workflow_source,
        models=outcome.run.models,
        stored=outcome.stored,
        storage_error=outcome.storage_error,
        warnings=outcome.warnings,
    )


def run_body(outcome: RunOutcome) -> dict[str, Any]:
    """The §3.1 body of a service run as JSON values: a workflow job's result."""
    return as_json(outcome_response(outcome))


def as_json(response: RunResponse) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(response)
    return body
