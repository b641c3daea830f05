"""Workflow runs, stored in the `runs` table once they end, and fetched by id.

A run row keeps the run's result (status, output, execution trace, error, timings) and
what it was asked (input, model bindings, config, and the definition of an inline "custom"
workflow), plus the workflow's id, version and source, so a run can be explained after the
workflow has changed or been deleted. The store deals in StoredRun; how a run is answered
over HTTP is server/routes/fusion.py's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.errors import ErrorCode, NotFound, RecordTooLarge, StorageBusy
from engine.runtime.trace import RunResult, StepRecord
from engine.store import Store, register_migration

# Migration 1 typed workflow_version INTEGER, but a workflow's `version` may be a string
# ("2026.11"); STRICT tables take ANY for that. The table is rebuilt (SQLite cannot change
# a column's type) with the request's context appended.
register_migration(
    2,
    "runs_version_any_and_request",
    """
    CREATE TABLE runs_v2 (
        id TEXT PRIMARY KEY,
        workflow_id TEXT NOT NULL,
        workflow_version ANY,
        status TEXT NOT NULL,
        input TEXT CHECK (input IS NULL OR json_valid(input)),
        result TEXT CHECK (result IS NULL OR json_valid(result)),
        trace TEXT CHECK (trace IS NULL OR json_valid(trace)),
        error TEXT,
        created_at TEXT NOT NULL,
        completed_at TEXT,
        total_latency_ms REAL,
        workflow_source TEXT,
        models TEXT CHECK (models IS NULL OR json_valid(models)),
        config TEXT CHECK (config IS NULL OR json_valid(config)),
        definition TEXT CHECK (definition IS NULL OR json_valid(definition))
    ) STRICT;
    INSERT INTO runs_v2 (id, workflow_id, workflow_version, status, input, result, trace,
                         error, created_at, completed_at, total_latency_ms)
        SELECT id, workflow_id, workflow_version, status, input, result, trace,
               error, created_at, completed_at, total_latency_ms FROM runs;
    DROP TABLE runs;
    ALTER TABLE runs_v2 RENAME TO runs;
    CREATE INDEX runs_by_workflow ON runs (workflow_id, created_at);
    CREATE INDEX runs_by_status ON runs (status, created_at);
    """,
)

# The run history's listing (engine/fusion/run_history.py) finds a page from indexes alone:
# each filter's index also holds the sort columns, and each sort column has its own index
# for unfiltered listings (and the age-based purge), so no listing reads the rows of runs
# outside its page (their summary columns sit after the large JSON ones).
register_migration(
    5,
    "runs_history_indexes",
    """
    DROP INDEX runs_by_workflow;
    DROP INDEX runs_by_status;
    CREATE INDEX runs_by_workflow
        ON runs (workflow_id, created_at, status, completed_at, total_latency_ms);
    CREATE INDEX runs_by_status
        ON runs (status, created_at, workflow_id, completed_at, total_latency_ms);
    CREATE INDEX runs_by_created ON runs (created_at, completed_at, total_latency_ms);
    CREATE INDEX runs_by_completed ON runs (completed_at);
    CREATE INDEX runs_by_latency ON runs (total_latency_ms);
    """,
)

# Each step's rendered input and output (StepRecord.input/output, children included), kept
# apart from the trace so that reading a run (or its history's step counts) does not read
# them unless asked (GET .../runs/{id}?include=io). Appended as the row's last column: the
# listing's summary columns are read without walking past it. Written with the run's end
# only (not in its running-trace updates); deleted with its row (count bound, purge).
register_migration(
    6,
    "runs_steps_io",
    "ALTER TABLE runs ADD COLUMN io TEXT CHECK (io IS NULL OR json_valid(io));",
)

_COLUMNS = (
    "id, workflow_id, workflow_version, status, input, result, trace, error, created_at, "
    "completed_at, total_latency_ms, workflow_source, models, config, definition"
)
_WRITTEN = f"{_COLUMNS}, io"  # a row as written: the columns read by `get`, then io
_INSERT = f"INSERT INTO runs ({_WRITTEN}) VALUES ({', '.join('?' * 16)})"
_JSON_COLUMNS = ("input", "result", "trace", "models", "config", "definition")


def _encode_fallback(value: Any) -> Any:
    return str(value)  # anything JSON has no type for (a YAML date, a set) as text


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return msgspec.json.encode(value, enc_hook=_encode_fallback).decode()


# A stored input or result larger than the field limit is replaced by this marker
# (docs/api.md): the run stays stored, and the answer of the call that ran it carried it whole.
TRUNCATED = "$truncated"
PREVIEW_CHARS = 1000


def _bounded_json(value: Any, max_bytes: int) -> str | None:
    """`_json(value)`, or the truncation marker when that is over `max_bytes` bytes."""
    text = _json(value)
    if text is None:
        return None
    size = _utf8_bytes(text)
    if size <= max_bytes:
        return text
    marker = {TRUNCATED: True, "bytes": size, "preview": text[:PREVIEW_CHARS]}
    return msgspec.json.encode(marker).decode()


@dataclass(frozen=True)
class RunRequest:
    """What a run was asked: the caller's input (as given), config, and the definition of
    an inline "custom" workflow."""

    input: Any
    config: dict[str, Any] | None
    definition: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredRun:
    """A run as it is kept: its result and trace, the workflow's source (None for runs
    stored before sources were), the model bound to each role, and what it was asked.
    `io_omitted`: read with its steps' IO (`RunStore.get(io=True)`) but it has none, and
    why (too large to store, or stored before IO was)."""

    result: RunResult
    workflow_source: str | None
    models: dict[str, Any]
    request: RunRequest
    io_omitted: str | None = None


# The io column: {"steps": [node per trace entry]}, a node {"input", "output"} (each the
# value or the truncation marker) plus "children" (nodes in the trace's children's order)
# where the record has children; or {"omitted": why} for a run stored without its IO.
IO_TOO_LARGE = (
    "not stored: the steps' inputs and outputs (more than the {room} bytes left to the run's "
    "record) would take it over the limit of {limit} bytes (setting runs_max_stored_bytes)"
)
IO_NOT_RECORDED = "not recorded: the run was stored without its steps' inputs and outputs"


class _IOBudget:
    """Bytes of IO text the record has room for: encoding stops once they are spent (the
    run is then stored without IO), so a run of many large outputs costs its end write
    no more than the record's bound in encoding."""

    def __init__(self, room: int) -> None:
        self.left = room

    def value(self, value: Any, max_field_bytes: int) -> str:
        text = _bounded_json(value, max_field_bytes) or "null"
        self.left -= _utf8_bytes(text)
        if self.left < 0:
            raise _IOTooLarge
        return text


class _IOTooLarge(Exception):
    """The steps' IO does not fit in the record."""


def _io_node(record: StepRecord, max_field_bytes: int, budget: _IOBudget) -> str:
    """`record`'s IO node as JSON text, built from each value's bounded encoding (encoded
    once, not decoded again)."""
    parts = [
        '{"input":',
        budget.value(record.input, max_field_bytes),
        ',"output":',
        budget.value(record.output, max_field_bytes),
    ]
    if record.children is not None:
        nodes = ",".join(_io_node(child, max_field_bytes, budget) for child in record.children)
        parts += [',"children":[', nodes, "]"]
    parts.append("}")
    return "".join(parts)


def _io_text(trace: list[StepRecord], max_field_bytes: int, room: int, limit: int) -> str | None:
    """The io column's text for `trace`, or the omitted marker when it would take more
    than `room` bytes (of the record's `limit`); None when not even the marker fits."""
    budget = _IOBudget(room)
    try:
        text = '{"steps":[' + ",".join(_io_node(r, max_field_bytes, budget) for r in trace) + "]}"
        if _utf8_bytes(text) > room:  # the values fit, not with the JSON around them
            raise _IOTooLarge
    except _IOTooLarge:
        # The run is kept, its IO not: a run's record matters more than its details.
        marker = _json({"omitted": IO_TOO_LARGE.format(room=room, limit=limit)})
        return marker if marker is not None and _utf8_bytes(marker) <= room else None
    return text


def _attach_io(records: list[StepRecord], nodes: list[dict[str, Any]]) -> None:
    """Put the stored IO `nodes` back on the trace's `records` (the same tree)."""
    for record, node in zip(records, nodes, strict=False):
        record.input, record.output = node.get("input"), node.get("output")
        if record.children and node.get("children"):
            _attach_io(record.children, node["children"])


# The trace column keeps one object per step under these names (those of §3.1's trace,
# which it has held since runs were first stored); items/iterations and a child's
# path/index/children/children_omitted only when they apply.
def _trace_item(record: StepRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "step": record.step_id,
        "type": record.type,
        "model": record.model,
        "status": record.status,
        "duration_ms": record.duration_ms,
        "attempts": record.attempts,
        "error": record.error,
        "started_at": record.started_at,
    }
    if record.items is not None:
        item["items"] = record.items
    if record.iterations is not None:
        item["iterations"] = record.iterations
    if record.until_met is not None:
        item["until_met"] = record.until_met
    if record.path is not None:
        item["path"] = record.path
    if record.index is not None:
        item["index"] = record.index
    if record.children is not None:
        item["children"] = [_trace_item(child) for child in record.children]
    if record.children_omitted is not None:
        item["children_omitted"] = record.children_omitted
    return item


def _step_record(item: dict[str, Any]) -> StepRecord:
    return StepRecord(
        step_id=item["step"],
        type=item["type"],
        model=item["model"],
        status=item["status"],
        duration_ms=item["duration_ms"],
        attempts=item["attempts"],
        error=item["error"],
        started_at=item["started_at"],
        items=item.get("items"),
        iterations=item.get("iterations"),
        until_met=item.get("until_met"),
        path=item.get("path"),
        index=item.get("index"),
        children=None
        if item.get("children") is None
        else [_step_record(child) for child in item["children"]],
        children_omitted=item.get("children_omitted"),
    )


# A run as the runs table's columns (_COLUMNS' order), its JSON already encoded.
RunRow = tuple[Any, ...]


def _row(run: StoredRun, *, max_bytes: int, max_field_bytes: int, io: bool) -> RunRow:
    """`run`'s row; `io`: with its steps' IO (the run's end), which is left out (the io
    column then says why) when it would take the record over `max_bytes`."""
    result, request = run.result, run.request
    version = result.workflow_version
    if version is not None and not isinstance(version, int | str):
        version = str(version)
    row = (
        result.run_id,
        result.workflow_id,
        version,
        result.status,
        _bounded_json(request.input, max_field_bytes),
        _bounded_json(result.output, max_field_bytes),
        _json([_trace_item(r) for r in result.trace]),
        result.error,
        result.created_at,
        result.completed_at,
        result.total_latency_ms,
        run.workflow_source,
        _json(run.models),
        _json(request.config),
        _json(request.definition),
    )
    size = sum(_utf8_bytes(v) for v in row if isinstance(v, str))
    if size > max_bytes:
        raise RecordTooLarge(
            f"the run's record ({size} bytes of input, result, trace and definition) exceeds "
            f"the limit of {max_bytes} bytes a stored run may have (setting runs_max_stored_bytes)",
            param="run",
        )
    room = max_bytes - size
    steps_io = _io_text(result.trace, max_field_bytes, room, max_bytes) if io else None
    return (*row, steps_io)


def _utf8_bytes(text: str) -> int:
    # An ASCII check is a scan without a copy; only other text pays for the encoding.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# The oldest runs beyond the retention limit; rowids grow with each insert.
_PRUNE = "DELETE FROM runs WHERE rowid <= (SELECT max(rowid) FROM runs) - ?"


class RunStore:
    """Runs in the engine's database: one small INSERT per run, after it has ended (WAL,
    synchronous=NORMAL: no fsync per commit)."""

    def __init__(
        self,
        store: Store,
        *,
        max_runs: int = 10_000,
        max_run_bytes: int = 33_554_432,
        max_field_bytes: int = 1_048_576,
    ) -> None:
        """max_runs: runs kept, oldest deleted first (setting runs_max_stored);
        max_run_bytes: largest record stored (setting runs_max_stored_bytes);
        max_field_bytes: largest input or result stored whole, a larger one is stored as
        a truncation marker (setting runs_max_field_bytes)."""
        self.store = store
        self.max_runs = max_runs
        self.max_run_bytes = max_run_bytes
        self.max_field_bytes = max_field_bytes

    def encode(self, run: StoredRun, *, io: bool = True) -> RunRow:
        """The run's row, JSON encoded once: RecordTooLarge when it exceeds the limit.
        Pass it to `try_insert`, then (if that returns False) to `insert`. `io`: with its
        steps' inputs and outputs (an ended run's; a running run's first row has none)."""
        return _row(run, max_bytes=self.max_run_bytes, max_field_bytes=self.max_field_bytes, io=io)

    def try_save(self, run: StoredRun) -> bool:
        """Save now, on this thread, if the database is free: False, having written
        nothing, when another connection holds the write lock. Lets the event loop write
        without ever waiting for a lock (it would stall every request). A full or
        read-only database raises engine.errors.StorageError, like `save`."""
        return self.try_insert(self.encode(run))

    def save(self, run: StoredRun) -> None:
        self.insert(self.encode(run))

    def try_insert(self, row: RunRow) -> bool:
        """`try_save` for a row from `encode`: the insert and the pruning commit together
        or not at all (a busy database then has nothing of this run, and `insert` writes
        it whole)."""
        return try_now(self, lambda: self.insert(row))

    def insert(self, row: RunRow) -> None:
        """`save` for a row from `encode`: waits for the write lock (within the
        connection's busy timeout)."""
        with self.store.transaction() as conn:
            conn.execute(_INSERT, row)
            conn.execute(_PRUNE, (self.max_runs,))

    def get(self, run_id: str, *, io: bool = False) -> StoredRun:
        """The stored run (404 run_not_found); `io`: its trace records with their stored
        inputs and outputs (or `io_omitted` saying why there are none)."""
        columns = _WRITTEN if io else _COLUMNS
        rows = self.store.query(f"SELECT {columns} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise NotFound(
                f"run '{run_id}' not found", param="run_id", code=ErrorCode.RUN_NOT_FOUND
            )
        names = [c.strip() for c in columns.split(",")]
        row = dict(zip(names, rows[0], strict=True))
        for key in _JSON_COLUMNS:
            if row[key] is not None:
                row[key] = msgspec.json.decode(row[key])
        result = RunResult(
            run_id=row["id"],
            workflow_id=row["workflow_id"],
            workflow_version=row["workflow_version"],
            status=row["status"],
            output=row["result"],
            trace=[_step_record(item) for item in row["trace"] or []],
            error=row["error"],
            created_at=row["created_at"],
            completed_at=row["completed_at"],
            total_latency_ms=row["total_latency_ms"],
        )
        request = RunRequest(input=row["input"], config=row["config"], definition=row["definition"])
        omitted: str | None = None
        if io:
            stored_io = None if row["io"] is None else msgspec.json.decode(row["io"])
            if isinstance(stored_io, dict) and isinstance(stored_io.get("steps"), list):
                _attach_io(result.trace, stored_io["steps"])
            else:
                omitted = stored_io.get("omitted") if isinstance(stored_io, dict) else None
                omitted = omitted or IO_NOT_RECORDED
        return StoredRun(result, row["workflow_source"], row["models"] or {}, request, omitted)


# -- live runs (engine/fusion/live.py) -------------------------------------------------------
# A run's row is written as it starts (status running, with `encode` and `insert`), its
# trace rewritten as steps finish (`progress_row`, `update_progress`: a no-op once the run
# has ended, so a late progress write never undoes the end), and written whole at its end
# (`save_end`). A server that stops mid-run leaves rows `running`: the next start marks
# them failed (`fail_interrupted`).
INTERRUPTED = "interrupted: the server stopped during the run"
_NAMES = [c.strip() for c in _WRITTEN.split(",")]
_PROGRESS = "UPDATE runs SET trace = ? WHERE id = ? AND status = 'running'"
_END = f"{_INSERT} ON CONFLICT (id) DO UPDATE SET " + ", ".join(
    f"{name} = excluded.{name}" for name in _NAMES[1:]
)
_FAIL_INTERRUPTED = (
    "UPDATE runs SET status = 'failed', error = ?, completed_at = ? WHERE status = 'running'"
)
ProgressRow = tuple[str | None, str]


def progress_row(result: RunResult) -> ProgressRow:
    """The UPDATE parameters of a running run's trace, encoded now (on the loop, where the
    executor changes the records)."""
    return (_json([_trace_item(r) for r in result.trace]), result.run_id)


def try_now(runs: RunStore, write: Callable[[], None]) -> bool:
    """Run `write` now if the database is free: False, having written nothing, when
    another connection holds the write lock (then run it on a worker thread, where
    waiting for the lock stalls nobody). Storage errors other than busy raise."""
    conn = runs.store.connection()
    if conn.in_transaction:
        return False  # a caller's open transaction: do not write into it
    conn.set_busy_timeout(0)
    try:
        write()
    except StorageBusy:
        return False
    finally:
        conn.set_busy_timeout(runs.store.busy_timeout_ms)
    return True


def update_progress(runs: RunStore, row: ProgressRow) -> None:
    with runs.store.transaction() as conn:
        conn.execute(_PROGRESS, row)


def save_end(runs: RunStore, row: RunRow) -> None:
    """The ended run's row (from `encode`), over its running one, or new if that one was
    never written."""
    with runs.store.transaction() as conn:
        conn.execute(_END, row)


def forget(runs: RunStore, run_id: str) -> None:
    """Delete a run's row: one that could not be stored whole at its end."""
    with runs.store.transaction() as conn:
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))


def fail_interrupted(runs: RunStore, now: str) -> int:
    """Mark the runs a stopped server left `running` failed; how many there were."""
    with runs.store.transaction() as conn:
        conn.execute(_FAIL_INTERRUPTED, (INTERRUPTED, now))
        return int(conn.changes())
