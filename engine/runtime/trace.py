"""What a run records: one entry per step and the run's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

COMPLETED, FAILED, PARTIAL = "completed", "failed", "partial"
STEP_PENDING, STEP_RUNNING, STEP_SKIPPED, STEP_CANCELLED = (
    "pending",
    "running",
    "skipped",
    "cancelled",
)


@dataclass
class StepRecord:
    step_id: str
    type: str
    status: str = STEP_PENDING
    model: str | None = None
    attempts: int = 0
    started_at: str | None = None
    duration_ms: float | None = None
    error: str | None = None
    items: int | None = None  # for_each: how many items ran
    iterations: int | None = None  # repeat: how many passes ran
    # repeat: whether `until` was met (false: the passes stopped at `max` without it)
    until_met: bool | None = None
    mocked: bool | None = None  # true: the output was given (a mock), the step did not run
    # A child's place from the top run: step ids and for_each item / repeat pass indexes
    # (["passes", 0, "summarize_piece", 3]); None for the top run's own steps.
    path: list[str | int] | None = None
    index: int | None = None  # a for_each item's index or a repeat pass's number (from 0)
    # A `workflow` step's sub-run steps, a for_each step's items, a repeat step's passes
    # (each pass's or item's own children: its sub-run steps); None where there are none.
    children: list[StepRecord] | None = None
    # Children beyond the setting trace_max_children: counted, not recorded.
    children_omitted: int | None = None
    # The step's (item's, pass's) parameters as rendered for its last attempt (None until
    # rendered; a for_each or repeat step's own record has none: its children do) and its
    # output (for a top step: what later steps see, a default after a skip or failure).
    # In memory only: the §3.1 body, to_dict and the stored trace leave them out; they are
    # asked for (GET .../runs/{id}?include=io) and stored apart (engine/fusion/runs.py).
    input: Any = field(default=None, repr=False, compare=False)
    output: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _IO_FIELDS:
                continue
            value = getattr(self, f.name)
            if f.name == "children" and value is not None:
                value = [child.to_dict() for child in value]
            elif f.name == "path" and value is not None:
                value = list(value)
            if value is not None or f.name == "error":
                out[f.name] = value
        return out

    def add_child(self, child: StepRecord, limit: int) -> bool:
        """Record `child` unless this record already holds `limit` children (then count it
        in children_omitted): whether it was recorded."""
        if self.children is None:
            self.children = []
        if len(self.children) >= limit:
            self.children_omitted = (self.children_omitted or 0) + 1
            return False
        self.children.append(child)
        return True


_IO_FIELDS = frozenset({"input", "output"})


@dataclass
class RunResult:
    run_id: str
    workflow_id: str
    workflow_version: int | str | None
    status: str
    output: Any
    trace: list[StepRecord] = field(default_factory=list)
    error: str | None = None
    created_at: str = ""
    completed_at: str = ""
    total_latency_ms: float = 0.0

    @property
    def step_outputs(self) -> dict[str, Any]:
        """Step id -> its output (None for a step that did not run), for `fusion test`'s
        expect.steps.<id>.output: the top steps' records' outputs (not part of to_dict)."""
        return {record.step_id: record.output for record in self.trace}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow_id": self.workflow_id,
            "workflow_version": self.workflow_version,
            "status": self.status,
            "output": self.output,
            "trace": [r.to_dict() for r in self.trace],
            "error": self.error,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "total_latency_ms": self.total_latency_ms,
        }
